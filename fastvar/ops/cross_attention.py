"""Packed variable-length cross-attention (Infinity's attention from image tokens to the text): functional
API, argument checks and backend choice.

See :func:`fastvar.reference.infinity.varlen_attention` for the definition. Sequence ``i`` is the q rows
``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` attending, without a mask, to the k/v rows
``[cu_seqlens_k[i], cu_seqlens_k[i+1])`` (flash-attn's ``varlen`` layout, no flash-attn needed).
Backends (``CROSS_ATTENTION_IMPLS``): ``eager`` (the reference, a loop over sequences) and ``triton``
(:mod:`fastvar.triton_kernels.cross_attention`, through the ``fastvar::varlen_cross_attention`` custom op).
Forward only (sampling and teacher-forced evaluation); no autograd.
"""
# No ``from __future__ import annotations``: torch.library reads the custom op's annotations as types.
from typing import Optional

import torch

from fastvar.ops._backend import select, warn_once
from fastvar.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same, check_tensor
from fastvar.reference import infinity as ref



def _eager(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, max_seqlen_q, max_seqlen_k):
    return ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


@torch.library.custom_op("fastvar::varlen_cross_attention", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    """The Triton varlen cross-attention as one graph node (no autograd)."""
    from fastvar.triton_kernels.cross_attention import varlen_cross_attention_fwd
    return varlen_cross_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, max_seqlen_q, max_seqlen_k):
    return q.new_empty(q.shape)


def _triton_unsupported(q: torch.Tensor) -> Optional[str]:
    from fastvar.triton_kernels.cross_attention import MAX_HEAD_DIM
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if q.dtype == torch.float64:
        return "float64 (the kernel computes in float32)"
    return None


def _triton(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, max_seqlen_q, max_seqlen_k):
    why = _triton_unsupported(q)
    if why is not None:
        warn_once(("varlen_cross_attention", why), f"fastvar: varlen_cross_attention falls back to eager: {why}")
        return _eager(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, max_seqlen_q, max_seqlen_k)
    return _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, max_seqlen_q, max_seqlen_k)


CROSS_ATTENTION_IMPLS = {"eager": _eager, "triton": _triton}


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device) -> None:
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold B + 1 >= 2 offsets, got {cu.numel()}")


def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, softmax_scale: Optional[float] = None, *,
                           max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                           validate: bool = True) -> torch.Tensor:
    """``softmax(q k^T * softmax_scale) v`` per packed sequence.

    Args:
        q: ``(Nq, H, c)``; k, v: ``(Nk, H, c)``; one float dtype and device; any strides with unit stride
            along ``c`` preferred (others are copied).
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 offsets, from 0 to ``Nq`` / ``Nk``, non-decreasing;
            every key sequence non-empty.
        softmax_scale: default ``1 / sqrt(c)``.
        max_seqlen_q, max_seqlen_k: the longest sequences (computed when not given; the Triton launch grid
            uses ``max_seqlen_q``).
        validate: check the offsets' values (one device-to-host read); False skips it (CUDA graphs).
    Returns:
        ``(Nq, H, c)`` in q's dtype; float16/bfloat16 are computed in float32 and rounded once.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k and v must have shape (Nk, H={q.shape[1]}, c={q.shape[2]}) like q's (Nq, H, c); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences; got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    softmax_scale = check_finite_scalar("softmax_scale", softmax_scale)
    if validate or max_seqlen_q is None or max_seqlen_k is None:
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        cq0, cq1, ck0, ck1 = (int(cu_seqlens_q[0]), int(cu_seqlens_q[-1]), int(cu_seqlens_k[0]), int(cu_seqlens_k[-1]))
        if cq0 != 0 or cq1 != q.shape[0] or min(lq) < 0:
            raise ValueError(f"cu_seqlens_q must rise from 0 to Nq={q.shape[0]}, got {cu_seqlens_q.tolist()}")
        if ck0 != 0 or ck1 != k.shape[0] or min(lk) < 1:
            raise ValueError(f"cu_seqlens_k must rise strictly from 0 to Nk={k.shape[0]} (every sequence needs a "
                             f"key), got {cu_seqlens_k.tolist()}")
        for name, given, real in (("max_seqlen_q", max_seqlen_q, max(lq)), ("max_seqlen_k", max_seqlen_k, max(lk))):
            if given is not None and int(given) != real:
                raise ValueError(f"{name} must be the longest sequence of the offsets ({real}), got {given}")
        max_seqlen_q, max_seqlen_k = max(lq), max(lk)
    impl = select("varlen_cross_attention", CROSS_ATTENTION_IMPLS, q.device)
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, float(softmax_scale), int(max_seqlen_q), int(max_seqlen_k))


OPS = {"varlen_cross_attention": CROSS_ATTENTION_IMPLS}
__all__ = ["varlen_cross_attention"]
