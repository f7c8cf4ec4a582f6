"""Eager definitions of VAR's multi-scale residual quantizer pieces.

Shapes: latents are ``(B, C, H, W)`` (``C = Cvae`` = 32 for VAR); a scale's token map is
``(B, C, h, w)``; the codebook is ``(V, C)``. ``H, W`` is the last scale of the schedule.

- :func:`rq_lookup`: nearest code of every row, the official float32 formula, ties to the lowest index.
- :func:`area_downsample` / :func:`bicubic_upsample`: the official interpolations.
- :func:`phi`: the residual 3x3 convolution ``(1 - r) * h + r * conv(h)``.
- :func:`phi_index`: which Phi a scale uses (the official float64 tick rule).
- :func:`upsample_accumulate`: the sampling step between scales (``get_next_autoregressive_input``).
- :func:`encode_multiscale`: the per-scale encode loop (``f_to_idxBl_or_fhat``).
- :func:`phi_fn_from_params` / :func:`upsample_accumulate_step`: the same with Phi given by its parameters
  (what ``fastvar.ops`` takes), and the sampling step from token indices or a code map.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def rq_lookup(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for every row of ``z``.

    Args:
        z: ``(N, C)`` float32.
        codebook: ``(V, C)`` float32.
    Returns:
        ``(N,)`` int64: ``argmin_v ||z||^2 + ||e_v||^2 - 2 z.e_v``, computed in float32 exactly as the
        official code does (sum of squares, then one ``addmm_``); ties go to the lowest index.
    """
    d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
    d.addmm_(z, codebook.T, alpha=-2, beta=1)
    return torch.argmin(d, dim=1)


def area_downsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)``: ``F.interpolate(mode='area')`` (adaptive average pooling)."""
    return F.interpolate(x, size=tuple(size), mode="area")


def bicubic_upsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)``: ``F.interpolate(mode='bicubic', align_corners=False)``, a = -0.75."""
    return F.interpolate(x, size=tuple(size), mode="bicubic")


def phi(h: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], resi_ratio: float) -> torch.Tensor:
    """The residual convolution Phi: ``h * (1 - r) + conv3x3(h) * r``; identity when ``weight`` is None."""
    if weight is None:
        return h
    return h.mul(1 - resi_ratio) + F.conv2d(h, weight, bias, stride=1, padding=1).mul_(resi_ratio)


def scale_ratio(si: int, num_scales: int) -> float:
    """``si / (S - 1)``, the position of scale ``si`` in [0, 1] (0 for a one-scale schedule)."""
    return si / (num_scales - 1) if num_scales > 1 else 0.0


def phi_ticks(num_phis: int) -> np.ndarray:
    """The official ticks: ``linspace(1/12, 11/12, 4)`` for 4 Phis, else ``linspace(1/2K, 1 - 1/2K, K)``."""
    K = num_phis
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index_at(ratio: float, num_phis: int) -> int:
    """Which of ``num_phis`` Phi layers the position ``ratio`` in [0, 1] uses: the nearest tick,
    ``argmin(|ticks - ratio|)`` in float64 numpy like the official code (first index on a tie)."""
    if num_phis == 1:
        return 0
    return int(np.argmin(np.abs(phi_ticks(num_phis) - ratio)).item())


def phi_index(si: int, num_scales: int, num_phis: int) -> int:
    """Which of ``num_phis`` Phi layers scale ``si`` uses: :func:`phi_index_at` of ``si / (S - 1)``.

    For 10 scales and 4 Phis this gives 0,0,1,1,1,2,2,3,3,3, where scales 2 and 7 are exact ties
    that float64 rounding settles.
    """
    return phi_index_at(scale_ratio(si, num_scales), num_phis)


PhiFn = Callable[[int, torch.Tensor], torch.Tensor]   # (scale index, h) -> Phi_si(h)
PhiParams = Optional[Tuple[torch.Tensor, Optional[torch.Tensor], float]]   # (weight, bias, resi_ratio) or None


def phi_fn_from_params(phis: Sequence[PhiParams]) -> PhiFn:
    """A :data:`PhiFn` from per-scale Phi parameters: ``phis[si]`` is ``(weight, bias, resi_ratio)``
    (:func:`phi`) or None (identity)."""
    def phi_fn(si: int, h: torch.Tensor) -> torch.Tensor:
        p = phis[si]
        return h if p is None else phi(h, p[0], p[1], p[2])
    return phi_fn


def code_map(idx_Bl: torch.Tensor, codebook: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A scale's code vectors as the official code lays them out: ``(B, h*w)`` token indices -> embedding
    ``(B, h*w, C)`` -> a transposed ``(B, C, h, w)`` view. Its strides decide how ATen's CPU interpolate /
    conv round: channels-last, except at B = 1, where the batch stride is C and ATen picks the contiguous
    format (a permuted gather would differ there by ~3e-7, seen in bench_quantizer)."""
    B = idx_Bl.shape[0]
    return F.embedding(idx_Bl, codebook).transpose(1, 2).reshape(B, codebook.shape[1], h, w)


def upsample_accumulate_step(
    f_hat: torch.Tensor,
    codes: torch.Tensor,
    phi_weight: Optional[torch.Tensor],
    phi_bias: Optional[torch.Tensor],
    resi_ratio: float,
    next_hw: Optional[Tuple[int, int]],
    codebook: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One sampling step with explicit Phi parameters (the definition of ``fastvar.ops.upsample_accumulate_``).

    Args:
        f_hat: ``(B, C, H, W)`` float32, updated **in place**.
        codes: a ``(B, C, h, w)`` code map, or ``(B, h, w)`` int64 indices into ``codebook`` ``(V, C)``
            (gathered as the official sampler does: embedding, then a channels-last ``(B, C, h, w)`` view).
        phi_weight, phi_bias, resi_ratio: Phi (:func:`phi`; identity when ``phi_weight`` is None).
        next_hw: the next scale's size, or None at the last scale.
    Returns:
        ``area_downsample(f_hat, next_hw)`` after ``f_hat += Phi(bicubic(h -> H x W))`` (no upsample when
        ``h`` already is ``H x W``), or ``f_hat`` when ``next_hw`` is None.
    """
    if codes.dtype == torch.int64:
        B, h_, w_ = codes.shape
        h = code_map(codes.reshape(B, h_ * w_), codebook, h_, w_)
    else:
        h = codes
    H, W = f_hat.shape[-2:]
    if tuple(h.shape[-2:]) != (H, W):
        h = bicubic_upsample(h, (H, W))
    f_hat.add_(phi(h, phi_weight, phi_bias, resi_ratio))
    return f_hat if next_hw is None else area_downsample(f_hat, next_hw)


def upsample_accumulate(
    f_hat: torch.Tensor,
    h: torch.Tensor,
    si: int,
    patch_hws: Sequence[Tuple[int, int]],
    phi_fn: PhiFn,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step between two sampling scales (official ``get_next_autoregressive_input``).

    Args:
        f_hat: ``(B, C, H, W)`` float32 accumulated latent, updated **in place**.
        h: ``(B, C, h_si, w_si)`` the codes chosen at scale ``si``.
        si: the scale just sampled.
        patch_hws: the schedule as ``(h, w)`` pairs; ``(H, W) = patch_hws[-1]``.
        phi_fn: ``phi_fn(si, x)`` applies Phi of scale ``si``.
    Returns:
        ``(f_hat, next)``: ``f_hat += Phi_si(bicubic(h -> H x W))`` and ``next`` = the area-downsampled
        ``f_hat`` at the next scale's size. At the last scale ``f_hat += Phi_si(h)`` and ``next`` is ``f_hat``.
    """
    S = len(patch_hws)
    if si != S - 1:
        f_hat.add_(phi_fn(si, bicubic_upsample(h, patch_hws[-1])))
        return f_hat, area_downsample(f_hat, patch_hws[si + 1])
    f_hat.add_(phi_fn(si, h))
    return f_hat, f_hat


def encode_multiscale(
    f: torch.Tensor,
    codebook: torch.Tensor,
    patch_hws: Sequence[Tuple[int, int]],
    phi_fn: PhiFn,
    to_fhat: bool,
    lookup: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """Multi-scale residual quantization of a latent (official ``f_to_idxBl_or_fhat``).

    Args:
        f: ``(B, C, H, W)`` float32 latent; ``(H, W)`` must equal ``patch_hws[-1]``.
        codebook: ``(V, C)``.
        patch_hws: the schedule as ``(h, w)`` pairs.
        phi_fn: ``phi_fn(si, x)`` applies Phi of scale ``si``.
        to_fhat: return ``f_hat`` after every scale instead of the indices.
        lookup: ``lookup(z (N, C)) -> idx (N,)``; default :func:`rq_lookup` against ``codebook``.
    Returns:
        per scale, ``(B, h*w)`` int64 indices, or the ``(B, C, H, W)`` ``f_hat`` after that scale.
    """
    B, C, H, W = f.shape
    f_rest = f.detach().clone()
    f_hat = torch.zeros_like(f_rest)
    S = len(patch_hws)
    out: List[torch.Tensor] = []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == S - 1
        z = (f_rest if last else area_downsample(f_rest, (ph, pw))).permute(0, 2, 3, 1).reshape(-1, C)
        idx = rq_lookup(z, codebook) if lookup is None else lookup(z)
        h = F.embedding(idx.view(B, ph, pw), codebook).permute(0, 3, 1, 2)
        h = (h if last else bicubic_upsample(h, (H, W))).contiguous()
        h = phi_fn(si, h)
        f_hat.add_(h)
        f_rest.sub_(h)
        out.append(f_hat.clone() if to_fhat else idx.reshape(B, ph * pw))
    return out


def idx_to_var_input(
    idx_list: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    patch_hws: Sequence[Tuple[int, int]],
    phi_fn: PhiFn,
) -> Optional[torch.Tensor]:
    """Teacher-forcing input from the per-scale indices (official ``idxBl_to_var_input``).

    Returns ``(B, L - first_l, C)`` float32: for scales 1 .. S-1, the area-downsampled ``f_hat`` after
    the previous scale, flattened row-major; None for a one-scale schedule.
    """
    B = idx_list[0].shape[0]
    C = codebook.shape[1]
    H, W = patch_hws[-1]
    S = len(patch_hws)
    f_hat = torch.zeros(B, C, H, W, dtype=torch.float32, device=codebook.device)
    nexts = []
    for si in range(S - 1):
        ph, pw = patch_hws[si]
        h = code_map(idx_list[si], codebook, ph, pw)
        f_hat.add_(phi_fn(si, bicubic_upsample(h, (H, W))))
        nexts.append(area_downsample(f_hat, patch_hws[si + 1]).view(B, C, -1).transpose(1, 2))
    return torch.cat(nexts, dim=1) if nexts else None
