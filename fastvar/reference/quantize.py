"""Eager definitions of VAR's multi-scale residual quantizer pieces.

Shapes: latents are ``(B, C, H, W)`` (``C = Cvae`` = 32 for VAR); a scale's token map is
``(B, C, h, w)``; the codebook is ``(V, C)``. ``H, W`` is the last scale of the schedule.

- :func:`rq_lookup`: nearest code of every row, the official float32 formula, ties to the lowest index.
- :func:`area_downsample` / :func:`bicubic_upsample`: the official interpolations.
- :func:`phi`: the residual 3x3 convolution ``(1 - r) * h + r * conv(h)``, given by :data:`PhiParams`.
- :func:`phi_index`: which Phi a scale uses (the official float64 tick rule).
- :func:`rq_step`: the step between scales (upsample the codes, Phi, accumulate, downsample the next input),
  the one definition every loop below and ``fastvar.ops.upsample_accumulate_`` use.
- :func:`residual_quantize` / :func:`encode_multiscale`: the per-scale encode loop (``f_to_idxBl_or_fhat``).
- :func:`idx_to_var_input`: the teacher-forcing input (``idxBl_to_var_input``).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

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


PhiParams = Optional[Tuple[torch.Tensor, Optional[torch.Tensor], float]]   # (weight, bias, resi_ratio) or None


def phi(h: torch.Tensor, params: PhiParams) -> torch.Tensor:
    """The residual convolution Phi: ``h * (1 - r) + conv3x3(h) * r`` for ``params = (weight, bias, r)``;
    identity when ``params`` is None."""
    if params is None:
        return h
    weight, bias, resi_ratio = params
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


def code_map(idx_Bl: torch.Tensor, codebook: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A scale's code vectors as the official code lays them out: ``(B, h*w)`` token indices -> embedding
    ``(B, h*w, C)`` -> a transposed ``(B, C, h, w)`` view. Its strides decide how ATen's CPU interpolate /
    conv round: channels-last, except at B = 1, where the batch stride is C and ATen picks the contiguous
    format (a permuted gather differs there by ~3e-7)."""
    B = idx_Bl.shape[0]
    return F.embedding(idx_Bl, codebook).transpose(1, 2).reshape(B, codebook.shape[1], h, w)


def rq_step(
    f_hat: torch.Tensor,
    codes: torch.Tensor,
    phi_params: PhiParams,
    next_hw: Optional[Tuple[int, int]],
    codebook: Optional[torch.Tensor] = None,
    f_rest: Optional[torch.Tensor] = None,
    contiguous: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The step between two scales of residual quantization: the one definition the encoder, the
    teacher-forcing input, the sampler (official ``get_next_autoregressive_input``) and VAE training share.

    Args:
        f_hat: ``(B, C, H, W)`` float32 accumulated latent.
        codes: the scale's codes, a ``(B, C, h, w)`` map (any strides), or ``(B, h, w)`` int64 indices into
            ``codebook`` ``(V, C)``, gathered into the official sampler's view (:func:`code_map`).
        phi_params: Phi of this scale (:func:`phi`).
        next_hw: the next scale's ``(h', w')``, or None after the last scale.
        f_rest: ``(B, C, H, W)`` residual still to quantize (the encoder's), or None.
        contiguous: make the upsampled codes contiguous before Phi, as the official encoder does (the sampler
            does not; on CPU the two layouts round the convolution differently).
    Returns:
        ``(f_hat, next)``: ``f_hat += Phi(u)`` with ``u`` the codes bicubic-upsampled to ``(H, W)`` (unless they
        already have that size), and ``next`` = ``area_downsample(f_rest if given else f_hat, next_hw)`` (None
        without ``next_hw``). ``f_rest -= Phi(u)`` in place. ``f_hat`` is updated in place, except when
        ``Phi(u)`` requires grad (VAE training: autograd keeps the old ``f_hat``, as the official
        ``f_hat = f_hat + h``): then a new tensor is returned.
    """
    if codes.dtype == torch.int64:
        B, h_, w_ = codes.shape
        codes = code_map(codes.reshape(B, h_ * w_), codebook, h_, w_)
    H, W = f_hat.shape[-2:]
    u = codes if tuple(codes.shape[-2:]) == (H, W) else bicubic_upsample(codes, (H, W))
    p = phi(u.contiguous() if contiguous else u, phi_params)
    f_hat = f_hat + p if p.requires_grad and torch.is_grad_enabled() else f_hat.add_(p)
    if f_rest is not None:
        f_rest.sub_(p)
    if next_hw is None:
        return f_hat, None
    return f_hat, area_downsample(f_hat if f_rest is None else f_rest, next_hw)


def residual_quantize(
    f: torch.Tensor,
    codebook: torch.Tensor,
    patch_hws: Sequence[Tuple[int, int]],
    phis: Sequence[PhiParams],
    lookup: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Multi-scale residual quantization of a latent, scale by scale (official ``f_to_idxBl_or_fhat`` and the
    loop of ``VectorQuantizer2.forward``).

    Args:
        f: ``(B, C, H, W)`` float32 latent; ``(H, W)`` must equal ``patch_hws[-1]``.
        codebook: ``(V, C)`` (its rows are the codes; gradients reach it through ``f_hat``).
        patch_hws: the schedule as ``(h, w)`` pairs; phis: Phi of every scale.
        lookup: ``lookup(z (N, C)) -> idx (N,)``; default :func:`rq_lookup` against ``codebook``.
    Yields:
        per scale, ``(z, idx, f_hat)``: the residual rows that were quantized ``(B*h*w, C)``, their code indices
        ``(B*h*w,)`` and the accumulated latent after the scale.
    """
    B, C, H, W = f.shape
    S = len(patch_hws)
    f_rest = f.detach().clone()
    f_hat = torch.zeros_like(f_rest)
    z = f_rest if S == 1 else area_downsample(f_rest, patch_hws[0])
    for si, (ph, pw) in enumerate(patch_hws):
        z_rows = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = rq_lookup(z_rows, codebook) if lookup is None else lookup(z_rows)
        codes = F.embedding(idx.view(B, ph, pw), codebook).permute(0, 3, 1, 2)
        next_hw = patch_hws[si + 1] if si + 1 < S else None
        f_hat, z = rq_step(f_hat, codes, phis[si], next_hw, f_rest=f_rest, contiguous=True)
        yield z_rows, idx, f_hat


def encode_multiscale(f: torch.Tensor, codebook: torch.Tensor, patch_hws: Sequence[Tuple[int, int]],
                      phis: Sequence[PhiParams], to_fhat: bool,
                      lookup: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[torch.Tensor]:
    """:func:`residual_quantize` collected: per scale, ``(B, h*w)`` int64 indices, or (``to_fhat``) a copy of
    the ``(B, C, H, W)`` f_hat after that scale."""
    B = f.shape[0]
    return [f_hat.clone() if to_fhat else idx.view(B, -1)
            for _, idx, f_hat in residual_quantize(f, codebook, patch_hws, phis, lookup)]


def idx_to_var_input(
    idx_list: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    patch_hws: Sequence[Tuple[int, int]],
    phis: Sequence[PhiParams],
) -> Optional[torch.Tensor]:
    """Teacher-forcing input from the per-scale indices (official ``idxBl_to_var_input``).

    Returns ``(B, L - first_l, C)`` float32: for scales 1 .. S-1, the area-downsampled ``f_hat`` after
    the previous scale, flattened row-major; None for a one-scale schedule.
    """
    B = idx_list[0].shape[0]
    C = codebook.shape[1]
    f_hat = torch.zeros(B, C, *patch_hws[-1], dtype=torch.float32, device=codebook.device)
    nexts = []
    for si in range(len(patch_hws) - 1):
        f_hat, nxt = rq_step(f_hat, idx_list[si].view(B, *patch_hws[si]), phis[si], patch_hws[si + 1], codebook)
        nexts.append(nxt.view(B, C, -1).transpose(1, 2))
    return torch.cat(nexts, dim=1) if nexts else None
