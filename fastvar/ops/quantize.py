"""Residual-quantization ops: codebook lookup (functional API and backend choice).

See :mod:`fastvar.reference.quantize` for the definitions these ops must reproduce.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

from fastvar.reference import quantize as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import check_same, check_tensor

RQ_LOOKUP_IMPLS = {"eager": ref.rq_lookup}


def rq_lookup(z: torch.Tensor, codebook: torch.Tensor, return_codes: bool = False
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Nearest codebook entry of every row.

    Args:
        z: ``(N, C)`` float32, finite.
        codebook: ``(V, C)`` float32, ``V >= 1``.
        return_codes: also return the chosen code vectors ``codebook[idx]``.
    Returns:
        ``idx`` ``(N,)`` int64 = ``argmin_v ||z||^2 + ||e_v||^2 - 2 z.e_v`` in float32, ties to the lowest
        index; with ``return_codes``, ``(idx, codes)`` with codes ``(N, C)``.
    """
    check_tensor("z", z, ndim=2, dtypes=(torch.float32,))
    check_tensor("codebook", codebook, ndim=2, dtypes=(torch.float32,))
    check_same(("z", "codebook"), (z, codebook), what="device")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one row, got shape (0, C)")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z and codebook must have the same channel count C; got z {tuple(z.shape)}, "
                         f"codebook {tuple(codebook.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z must be finite; it holds NaN or inf")
    idx = select("rq_lookup", RQ_LOOKUP_IMPLS, z.device)(z, codebook)
    return (idx, F.embedding(idx, codebook)) if return_codes else idx


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {"rq_lookup": RQ_LOOKUP_IMPLS}
__all__ = ["rq_lookup"]
