"""Residual-quantization lookup: the nearest codebook entry (``rq_lookup``) and the multi-scale encode
(``rq_encode``, official ``f_to_idxBl_or_fhat``: a lookup and a step per scale) (functional API, argument
checks, backend choice).

See :mod:`fastvar.reference.quantize` for the definitions and ``fastvar.triton_kernels.rq_lookup`` for the
kernel. The Triton lookup forms the eager float32 distances (``zz + ee - 2 z.e`` with the dot product in GEMM
micro-kernel order). Encode launches per scale: ``sum(z**2)`` (2 small torch launches, for the eager bits),
the lookup (1) and the step of :func:`fastvar.ops.upsample.triton_step` (3), whose area downsample writes the
next scale's rows straight in the lookup's layout; the last scale of an index-only encode is the lookup alone.
``rq_lookup`` is a ``torch.library`` custom op (``fastvar::rq_lookup``) with a fake implementation.

No autograd through the Triton path: when gradients are needed, the ops run the eager reference.
"""
# No ``from __future__ import annotations``: torch.library reads the custom ops' annotations as types.
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastvar.reference import quantize as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import (PhiParams, capturing, check_codebook, check_map, check_phis, check_same,
                                 check_tensor, needs_grad)
from fastvar.ops.upsample import _triton_area_downsample, triton_step
from fastvar.schedule import scale_hws


def _kernels():
    """``fastvar.triton_kernels.rq_lookup``, imported on first use (after ``TRITON_INTERPRET`` is set)."""
    from fastvar.triton_kernels import rq_lookup
    return rq_lookup


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2, 1)`` by the very torch call of the reference, so the float32 bits are the eager ones."""
    return torch.sum(x.square(), dim=1)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not capturing(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")


# ------------------------------------------------------------------------------------------ lookup
@torch.library.custom_op("fastvar::rq_lookup", mutates_args=())
def _rq_lookup_op(z: torch.Tensor, codebook: torch.Tensor, return_codes: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton lookup: ``(idx (N,) int64, codes (N, C))`` (codes empty without ``return_codes``)."""
    idx, codes = _kernels().rq_lookup(z, codebook, _sqnorm(z), _sqnorm(codebook), return_codes=return_codes)
    return idx, (codes if codes is not None else z.new_empty(0))


@_rq_lookup_op.register_fake
def _(z, codebook, return_codes):
    N, C = z.shape
    return z.new_empty(N, dtype=torch.int64), (z.new_empty(N, C) if return_codes else z.new_empty(0))


def _eager_rq_lookup(z, codebook, return_codes):
    idx = ref.rq_lookup(z, codebook)
    return idx, (F.embedding(idx, codebook) if return_codes else None)


def _triton_rq_lookup(z, codebook, return_codes):
    idx, codes = _rq_lookup_op(z, codebook, bool(return_codes))
    return idx, (codes if return_codes else None)


RQ_LOOKUP_IMPLS = {"eager": _eager_rq_lookup, "triton": _triton_rq_lookup}


def rq_lookup(z: torch.Tensor, codebook: torch.Tensor, return_codes: bool = False
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Nearest codebook entry of every row.

    Args:
        z: ``(N, C)`` float32, finite, any strides.
        codebook: ``(V, C)`` float32, finite, ``V >= 1``.
        return_codes: also return the chosen code vectors ``codebook[idx]``.
    Returns:
        ``idx`` ``(N,)`` int64 = ``argmin_v ||z||^2 + ||e_v||^2 - 2 z.e_v`` in float32, ties to the lowest
        index; with ``return_codes``, ``(idx, codes)`` with codes ``(N, C)``.

    Exactness of the Triton path: the float32 distances are those of the eager formula when the eager
    GEMM accumulates ``z.e`` in channel order with FMAs (MKL / cuBLAS ``sgemm`` do for ``N >= 2``;
    single-row GEMVs may use another order), so the indices are identical, exact ties included; a
    differently ordered eager dot product can only differ on rows whose two best distances are within
    a few float32 ulps of each other (see ``tests/test_rq_lookup.py`` for the measured rates).
    """
    check_tensor("z", z, ndim=2, dtypes=(torch.float32,))
    check_codebook(codebook, z.shape[1])
    check_same(("z", "codebook"), (z, codebook), what="device")
    _check_finite("z", z)
    impl = RQ_LOOKUP_IMPLS["eager"] if needs_grad(z, codebook) or z.shape[0] == 0 else \
        select("rq_lookup", RQ_LOOKUP_IMPLS, z.device)
    idx, codes = impl(z, codebook, return_codes)
    return (idx, codes) if return_codes else idx


# ------------------------------------------------------------------------- multi-scale encode
def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B*h*w, C)``, the reference's ``permute(0, 2, 3, 1).reshape``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _triton_rq_encode(f, codebook, patch_hws, phis, to_fhat):
    lookup = _kernels().rq_lookup
    B, C, H, W = f.shape
    S = len(patch_hws)
    f_rest = f.detach().clone(memory_format=torch.contiguous_format)
    codebook_t, ee = codebook.t().contiguous(), _sqnorm(codebook)
    fh_all = torch.empty(S, B, C, H, W, dtype=torch.float32, device=f.device) if to_fhat else None
    z = _rows(f_rest if S == 1 else _triton_area_downsample(f_rest, patch_hws[0]))
    out: List[torch.Tensor] = []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == S - 1
        idx, _ = lookup(z, codebook, _sqnorm(z), ee, codebook_t=codebook_t)
        if not to_fhat:
            out.append(idx.view(B, ph * pw))
            if last:
                break
        # the next scale's residual goes straight into the rows the next lookup reads
        nxt = None if last else torch.empty(B, *patch_hws[si + 1], C, dtype=torch.float32,
                                            device=f.device).permute(0, 3, 1, 2)
        # the official encoder makes Phi's input contiguous
        triton_step(fh_all[si] if to_fhat else None, fh_all[si - 1] if to_fhat and si > 0 else None,
                    idx.view(B, ph, pw), codebook, phis[si], None if last else patch_hws[si + 1],
                    torch.contiguous_format, f_rest=None if last else f_rest, next_out=nxt)
        if not last:
            z = _rows(nxt)
    return list(fh_all.unbind(0)) if to_fhat else out


def _eager_rq_encode(f, codebook, patch_hws, phis, to_fhat):
    return ref.encode_multiscale(f, codebook, patch_hws, phis, to_fhat)


RQ_ENCODE_IMPLS = {"eager": _eager_rq_encode, "triton": _triton_rq_encode}


def rq_encode(f: torch.Tensor, codebook: torch.Tensor, patch_hws, phis: Sequence[PhiParams],
              to_fhat: bool = False) -> List[torch.Tensor]:
    """Multi-scale residual quantization of a latent (official ``f_to_idxBl_or_fhat``).

    Args:
        f: ``(B, C, H, W)`` float32, finite; ``(H, W)`` must be the last scale.
        codebook: ``(V, C)`` float32.
        patch_hws: the schedule (ints or ``(h, w)`` pairs).
        phis: per scale, Phi's ``(weight, bias, resi_ratio)`` or None (identity).
        to_fhat: return f_hat after every scale instead of the indices.
    Returns:
        per scale, ``(B, h*w)`` int64 indices, or the ``(B, C, H, W)`` f_hat after that scale.
    """
    check_map("f", f)
    hws = scale_hws(patch_hws, "patch_hws")
    B, C, H, W = f.shape
    if tuple(hws[-1]) != (H, W):
        raise ValueError(f"the last scale of patch_hws {tuple(hws[-1])} must equal the latent size (H, W) = {(H, W)}")
    check_codebook(codebook, C)
    check_same(("f", "codebook"), (f, codebook), what="device")
    _check_finite("f", f)
    phis = check_phis(phis, len(hws), C, f)
    params = [t for p in phis if p is not None for t in p[:2]]
    if needs_grad(f, codebook, *params):
        return _eager_rq_encode(f, codebook, hws, phis, to_fhat)
    return select("rq_encode", RQ_ENCODE_IMPLS, f.device)(f, codebook, hws, phis, bool(to_fhat))


OPS = {"rq_lookup": RQ_LOOKUP_IMPLS, "rq_encode": RQ_ENCODE_IMPLS}
__all__ = ["rq_lookup", "rq_encode"]
