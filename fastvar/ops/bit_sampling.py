"""Infinity's bit sampler: temperature, CFG mix, top-k/top-p over the two values of each bit, the draw, and
the +/- codes in the official latent layout (functional API, the ``torch.library`` custom op, backend choice).

See :mod:`fastvar.reference.infinity` (``cfg_mix``, ``bit_top_k_top_p_``, ``sample_bits_with_noise``,
``bits_to_codes``) for the official semantics and :mod:`fastvar.triton_kernels.bit_sampling` for the kernel.

The draw consumes the caller's generator as the official ``torch.multinomial`` over ``(B * n, 2)``
probabilities does: one ``(B * n, 2)`` float32 ``exponential_`` draw ``E``, bit = ``argmax(p / E)``. Given
the same generator state (or the same ``noise``) the eager path gives the official bits; the Triton path
differs only where ``p_0 / E_0`` and ``p_1 / E_1`` agree to float32 rounding (or a probability sits within
rounding of the top-p threshold): measured (CPU, Triton interpreter) 0 differences over the 6 golden
Infinity runs and over 7 x 2^20 random rows (the 7 settings of tests/test_bit_sampling.py, logits ~ 3 N(0, 1)).
GPU rates: owed (tests/test_bit_sampling.py::test_gpu_exact_mode_rate bounds them by 1e-5).

Ties of the two logits under top-p (``p = 0.5 <= 1 - top_p``, i.e. ``top_p <= 0.5``): value 0 is removed
(the order of a stable ascending sort); the official CPU sort leaves the order of equal values unspecified.
"""
# No ``from __future__ import annotations``: torch.library reads the custom op's annotations as types.
import functools
from typing import Optional, Tuple

import numpy as np
import torch

from fastvar.ops._backend import select
from fastvar.ops._checks import (FLOAT_DTYPES, capturing as _capturing, check_finite_scalar, check_tensor,
                                 raise_for_sample_errors, sample_error_codes)
from fastvar.ops.sampling import check_top_k_top_p
from fastvar.reference import infinity as ref


def _fp32(x: float) -> float:
    return float(np.float32(x))


@functools.lru_cache(maxsize=64)
def code_magnitude(d: int) -> float:
    """The magnitude of every official BSQ code of ``d`` bits: ``normalize(±1/sqrt(d))`` over the d bits,
    computed by the reference itself (so the Triton path writes the same float)."""
    return float(ref.bits_to_codes(torch.ones(1, 1, 1, 1, d, dtype=torch.int64)).reshape(-1)[0])


def _mixed(logits, B, cfg, inv_tau):
    """The official ``head(x).mul(1 / tau)`` then ``cfg * x[:B] + (1 - cfg) * x[B:]``, as ``(B, n, 2)`` float32."""
    x = (logits if logits.dtype == torch.float64 else logits.float()).mul(inv_tau)
    return ref.cfg_mix(x, cfg) if cfg is not None else x


def _eager_impl(logits, B, cfg, inv_tau, top_k, top_p, noise, layout, validate):
    x = _mixed(logits, B, cfg, inv_tau)
    err, bad = sample_error_codes(x), None
    if validate and not _capturing(x):
        raise_for_sample_errors(err, cfg is not None, bits=True)
    else:
        bad = err != 0
    bits = ref.sample_bits_with_noise(x.contiguous(), top_k, top_p, noise).to(torch.uint8)
    if bad is not None:
        bits = torch.where(bad, 255, bits)
    codes = None
    if layout is not None:
        (h, w), patchify = layout
        codes = ref.bits_to_codes(ref.tokens_to_vae_bits(bits.reshape(B, h, w, -1), patchify))
    return bits, codes


@torch.library.custom_op("fastvar::sample_bits", mutates_args=())
def _sample_bits_op(logits: torch.Tensor, noise: torch.Tensor, B: int, has_cfg: bool, cfg: float, inv_tau: float,
                    top_k: int, top_p: float, h: int, w: int, d: int, patchify: bool, write_codes: bool,
                    validate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton bit sampler as one graph node: ``(bits (B * n,) uint8, codes)`` with ``codes`` the
    ``B * n`` float32 code values in ``(B, h', w', d)`` order (an empty tensor without ``write_codes``)."""
    from fastvar.triton_kernels import bit_sampling as kernels

    n = logits.shape[1]
    bits = torch.empty(B * n, dtype=torch.uint8, device=logits.device)
    err = torch.empty(B * n, dtype=torch.int32, device=logits.device)
    codes = torch.empty(B * n if write_codes else 0, dtype=torch.float32, device=logits.device)
    kernels.bit_sampling_fwd(
        logits, noise, bits, err, B, _fp32(inv_tau), _fp32(cfg), _fp32(1 - cfg), _fp32(1 - top_p),
        has_cfg=has_cfg, top_k1=top_k == 1, has_top_p=top_p > 0, codes=codes if write_codes else None,
        code=code_magnitude(d) if write_codes else 1.0, w=w, d_t=n // (h * w), d=d, patchify=patchify)
    if validate and not _capturing(logits):
        raise_for_sample_errors(err, has_cfg, bits=True)
    return bits, codes


@_sample_bits_op.register_fake
def _(logits, noise, B, has_cfg, cfg, inv_tau, top_k, top_p, h, w, d, patchify, write_codes, validate):
    n = logits.shape[1]
    return logits.new_empty(B * n, dtype=torch.uint8), logits.new_empty(B * n if write_codes else 0,
                                                                       dtype=torch.float32)


def _triton_impl(logits, B, cfg, inv_tau, top_k, top_p, noise, layout, validate):
    (h, w), patchify = layout if layout is not None else ((1, 1), False)
    n = logits.shape[1]
    d = n // (h * w) // (4 if patchify else 1)
    bits, codes = _sample_bits_op(logits, noise, B, cfg is not None, 1.0 if cfg is None else float(cfg),
                                  float(inv_tau), top_k, top_p, h, w, d, bool(patchify), layout is not None, validate)
    bits = bits.view(B, n)
    if layout is None:
        return bits, None
    H, W = (2 * h, 2 * w) if patchify else (h, w)
    return bits, codes.view(B, H, W, d).permute(0, 3, 1, 2).unsqueeze(2)


BIT_SAMPLING_IMPLS = {"eager": _eager_impl, "triton": _triton_impl}


def sample_bits(logits: torch.Tensor, B: int, *, cfg: Optional[float] = None, tau: float = 1.0, top_k: int = 0,
                top_p: float = 0.0, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None, patchify: bool = False, validate: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One Infinity sampling step after the head: the bits of a scale and (with ``grid``) their codes.

    Args:
        logits: ``(N, n, 2)`` float head output viewed as pairs (score of bit 0, of bit 1), any strides;
            ``N = 2B`` with ``cfg`` (conditional rows first), else ``N = B``.
        B: images.
        cfg: guidance on the logits, ``cfg * x[:B] + (1 - cfg) * x[B:]``; None: no mix (no guidance, or
            guidance on a hidden state).
        tau: temperature; the logits are multiplied by ``1 / tau`` first (before the mix, as officially).
        top_k: ``k >= 2`` (or 0) keeps both values; ``k = 1`` the larger (both on a tie).
        top_p: the less likely value is removed when its probability is ``<= 1 - top_p`` (0 disables).
        generator: the generator of the draw (one ``(B * n, 2)`` Exp(1) draw, as ``torch.multinomial``);
            ``noise`` ``(B * n, 2)`` float32 gives the draw instead (e.g. a buffer refilled before a CUDA-graph
            replay).
        grid: ``(h, w)`` token grid of the scale: also return the codes; ``patchify``: tokens carry the 2 x 2
            latent pixels of their cell (``d_t = 4d``).
        validate: raise ``ValueError`` on NaN / ``+inf`` / all ``-inf`` bits (one read back); False marks
            such bits 255 without a sync.
    Returns:
        ``bits`` ``(B, n)`` uint8 and ``codes``: ``(B, d, 1, h', w')`` float32 with channels-last strides, the
        official ``lfq.indices_to_codes(bits, 'bit_label')`` of the un-patchified bits, or None without ``grid``.
    """
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    if logits.shape[-1] != 2:
        raise ValueError(f"logits must be (N, n, 2) bit pairs, got shape {tuple(logits.shape)}")
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"B must be a positive int, got {B!r}")
    want_N = 2 * B if cfg is not None else B
    if logits.shape[0] != want_N:
        raise ValueError(f"logits must have N = {'2B' if cfg is not None else 'B'} = {want_N} rows "
                         f"({'with' if cfg is not None else 'without'} cfg), got {logits.shape[0]}")
    if cfg is not None:
        cfg = check_finite_scalar("cfg", cfg)
    tau = check_finite_scalar("tau", tau)
    if tau == 0:
        raise ValueError("tau must be non-zero (the logits are multiplied by 1 / tau)")
    top_k, top_p = check_top_k_top_p(top_k, top_p)
    n = logits.shape[1]
    layout = None
    if grid is not None:
        h, w = (int(v) for v in grid)
        dt = n // max(h * w, 1)
        if h < 1 or w < 1 or h * w * dt != n or (patchify and dt % 4):
            raise ValueError(f"grid (h, w) = {tuple(grid)} must divide the n = {n} bits per image into h * w tokens "
                             f"of d_t bits{' (a multiple of 4 with patchify)' if patchify else ''}")
        layout = ((h, w), bool(patchify))
    if noise is None:
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != logits.device.type:
                raise ValueError(f"generator must be on the device of logits ({logits.device}), got one on "
                                 f"{generator.device}")
        noise = ref.bit_noise(B * n, generator, logits.device)
    else:
        check_tensor("noise", noise, ndim=2, dtypes=(torch.float32,), shape=(B * n, 2))
        if noise.device != logits.device:
            raise ValueError(f"noise must be on the device of logits ({logits.device}), got {noise.device}")
        if noise.stride(-1) != 1:
            noise = noise.contiguous()
    impl = select("sample_bits", BIT_SAMPLING_IMPLS, logits.device)
    if impl is _triton_impl and logits.dtype == torch.float64:
        impl = _eager_impl                 # the kernel computes in float32; float64 is the reference's dtype
    return impl(logits, B, cfg, 1 / tau, top_k, top_p, noise, layout, validate)


OPS = {"sample_bits": BIT_SAMPLING_IMPLS}
__all__ = ["sample_bits", "code_magnitude"]
