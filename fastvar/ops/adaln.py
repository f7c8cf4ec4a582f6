"""Adaptive LayerNorm steps of VAR's blocks, fused for sampling (functional API and backend choice).

See :mod:`fastvar.reference.adaln` for the definitions. Inference only: no autograd (training runs
the modules' eager path).
"""
from __future__ import annotations

from typing import Tuple

import torch

from fastvar.reference import adaln as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import check_finite_scalar, check_same, check_tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(N, l, C)`` -> ``(N*l, C)`` with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _mod_rows(*mods: torch.Tensor):
    """``(N, 1, C)`` modulation tensors -> ``(N, C)`` views sharing one row stride."""
    views = [m.reshape(m.shape[0], m.shape[-1]) for m in mods]
    if any(v.stride(-1) != 1 or v.stride(0) != views[0].stride(0) for v in views):
        views = [v.contiguous() for v in views]
    return views


@torch.library.custom_op("fastvar::adaln_modulate", mutates_args=())
def _adaln_modulate_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    from fastvar.triton_kernels.adaln import adaln_fwd
    xr = _rows(x)
    s, sh = _mod_rows(scale, shift)
    h = torch.empty_like(xr, dtype=scale.dtype)
    adaln_fwd(xr, s, sh, eps, h=h)
    return h.view(x.shape)


@_adaln_modulate_triton.register_fake
def _(x, scale, shift, eps):
    return torch.empty_like(x, dtype=scale.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastvar::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_triton(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor,
                                 shift: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    from fastvar.triton_kernels.adaln import adaln_fwd
    xr, yr = _rows(x), _rows(y)
    g, s, sh = _mod_rows(gamma, scale, shift)
    h, x_new = torch.empty_like(xr, dtype=scale.dtype), torch.empty_like(xr)
    adaln_fwd(xr, s, sh, eps, y=yr, gamma=g, h=h, x_new=x_new)
    return x_new.view(x.shape), h.view(x.shape)


@_gated_residual_adaln_triton.register_fake
def _(x, y, gamma, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, dtype=scale.dtype, memory_format=torch.contiguous_format))


def _triton_adaln(x, y, gamma, scale, shift, eps):
    if y is None:
        return None, _adaln_modulate_triton(x, scale, shift, eps)
    return _gated_residual_adaln_triton(x, y, gamma, scale, shift, eps)


def _eager_adaln(x, y, gamma, scale, shift, eps):
    if y is None:
        return None, ref.adaln_modulate(x, scale, shift, eps)
    return ref.gated_residual_adaln(x, y, gamma, scale, shift, eps)


ADALN_IMPLS = {"eager": _eager_adaln, "triton": _triton_adaln}


def _check(x, mods, names):
    """``x``: the residual stream, float32 or the compute dtype; the modulation: the compute dtype."""
    check_tensor("x", x, ndim=3, dtypes=_DTYPES)
    N, _, C = x.shape
    compute = mods[0].dtype
    if x.dtype not in (torch.float32, compute):
        raise TypeError(f"x must be float32 or the modulation's dtype {compute}, got {x.dtype}")
    for name, m in zip(names, mods):
        check_tensor(name, m, dtypes=(compute,))
        if m.numel() != N * C or m.shape[0] != N or m.shape[-1] != C:
            raise ValueError(f"{name} must have shape (N={N}, 1, C={C}), got {tuple(m.shape)}")
    check_same(("x",) + tuple(names), (x,) + tuple(mods), what="device")


def _check_eps(eps) -> float:
    """LayerNorm's epsilon: finite and > 0 (a row of equal values has variance 0: eps <= 0 divides by zero or
    takes the root of a negative number, and a NaN eps makes every output NaN). A host float: no sync."""
    eps = check_finite_scalar("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (LayerNorm's epsilon), got {eps}")
    return eps


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``. ``x`` ``(N, l, C)`` (float32 or the modulation's dtype);
    ``scale``, ``shift`` ``(N, 1, C)`` (e.g. views of one ``(N, 1, 6, C)`` AdaLN projection), one dtype.
    ``eps``: LayerNorm's epsilon, finite and > 0. Returns a new ``(N, l, C)`` in the modulation's dtype."""
    _check(x, (scale, shift), ("scale", "shift"))
    eps = _check_eps(eps)
    return select("adaln", ADALN_IMPLS, x.device)(x, None, None, scale, shift, eps)[1]


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + y * gamma`` and ``h = LayerNorm(x_new) * (1 + scale) + shift`` in one pass.
    ``x`` ``(N, l, C)``, the residual stream (float32 or the compute dtype); ``y`` ``(N, l, C)`` and
    ``gamma``, ``scale``, ``shift`` ``(N, 1, C)`` in the compute dtype. Returns new ``(x_new, h)``:
    ``x_new`` in ``x``'s dtype, ``h`` in the compute dtype. ``eps`` as in :func:`adaln_modulate`."""
    _check(x, (gamma, scale, shift), ("gamma", "scale", "shift"))
    check_tensor("y", y, dtypes=(scale.dtype,), shape=tuple(x.shape))
    check_same(("x", "y"), (x, y), what="device")
    eps = _check_eps(eps)
    return select("adaln", ADALN_IMPLS, x.device)(x, y, gamma, scale, shift, eps)


OPS = {"adaln": ADALN_IMPLS}
__all__ = ["adaln_modulate", "gated_residual_adaln"]
