"""Token sampling ops: top-k / top-p filtering and the categorical draw (functional API, backend choice).

See :mod:`fastvar.reference.sampling` for the official semantics these ops must reproduce.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastvar.reference import sampling as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import check_finite_scalar, check_tensor


def check_top_k_top_p(top_k, top_p, V: Optional[int] = None):
    """Validate and normalise ``top_k`` (int in [0, V]) and ``top_p`` (float in [0, 1])."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) and not (
            isinstance(top_k, float) and top_k.is_integer()):
        raise TypeError(f"top_k must be an int >= 0, got {top_k!r}")
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if V is not None and top_k > V:
        raise ValueError(f"top_k must be <= the vocabulary size V={V}, got {top_k}")
    top_p = check_finite_scalar("top_p", top_p, 0.0, 1.0)
    return top_k, top_p


def check_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``logits`` has NaN or a row that is entirely ``-inf``."""
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits hold NaN; cannot sample")
    if bool(torch.isneginf(logits).all(dim=-1).any()):
        raise ValueError("a row of logits is entirely -inf; cannot sample")


def _eager_sample(logits, top_k, top_p, generator):
    V = logits.shape[-1]
    flat = logits.reshape(1, -1, V).clone()
    return ref.sample_top_k_top_p_(flat, top_k, top_p, generator, num_samples=1).view(logits.shape[:-1])


SAMPLE_IMPLS = {"eager": _eager_sample}


def sample_top_k_top_p(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` restricted to the top-k / top-p support.

    Official semantics (``sample_with_top_k_top_p_`` then ``torch.multinomial``): the same
    ``generator`` state gives the same tokens as the official sampler. ``logits`` is not modified.

    Args:
        logits: ``(..., V)`` float.
        top_k: keep the k largest logits per row (ties at the k-th value kept); 0 disables.
        top_p: then keep the smallest set of largest logits whose probability exceeds p; 0 disables.
        generator: the ``torch.Generator`` the draw consumes (None: the global one).
    Returns:
        int64 tensor of shape ``logits.shape[:-1]``.
    """
    check_tensor("logits", logits, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    top_k, top_p = check_top_k_top_p(top_k, top_p, logits.shape[-1])
    check_logits(logits)
    return select("sample_top_k_top_p", SAMPLE_IMPLS, logits.device)(logits, top_k, top_p, generator)


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {"sample_top_k_top_p": SAMPLE_IMPLS}
__all__ = ["sample_top_k_top_p", "check_top_k_top_p", "check_logits"]
