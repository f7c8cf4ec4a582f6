"""Interpolations and the per-scale accumulate step of VAR's residual quantizer, bit-compatible with
PyTorch's ``F.interpolate``.

Kernels (shapes: latent ``(B, C, H, W)``, a scale's map ``(B, C, h, w)``, next scale ``(nh, nw)``):

- ``_bicubic_upsample_fwd_kernel``: ``out = bicubic(src -> (H, W))`` (``align_corners=False``, a = -0.75,
  taps clamped to the border), where ``src`` is a float map or ``codebook[idx]`` gathered on the fly
  from ``(B, h, w)`` token indices (no code map is materialised).
- ``_area_downsample_fwd_kernel``: ``out = area(x -> (nh, nw))`` (adaptive average pooling).
- ``_phi_accumulate_fwd_kernel``: the step after the 3x3 convolution of Phi: ``h = (1-r) u + r cv``;
  ``f_hat += h`` and/or ``f_rest -= h``; then ``next = area(f_hat or f_rest -> (nh, nw))`` — one pass
  over the latent for everything but the convolution.
- ``_upsample_phi_accumulate_fwd_kernel``: the sampling step's ``f_hat += Phi(up(codes))`` with the 3x3
  convolution computed in the kernel (``tl.dot`` per tap): one launch instead of upsample, ``F.conv2d``
  and ``_phi_accumulate_fwd_kernel``, at the price of the convolution's bits (its summation order is
  Triton's, not cuDNN's / oneDNN's); the next scale's map is then one ``_area_downsample_fwd_kernel``.

Bit-compatibility. PyTorch's kernels are C++/CUDA whose compilers contract ``a * b + c`` into FMAs; the
rounding sequence below reproduces theirs op by op, and these kernels are compiled with
``enable_fp_fusion=False`` so that only the explicit ``tl.fma`` calls fuse:

- bicubic source index ``real = fma(in/out, o + 0.5, -0.5)``; ``i = floor(real)``; ``t = real - i``;
  weights ``(cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))`` with ``cc1(x) = ((A+2)x - (A+3))x x + 1`` and
  ``cc2(x) = ((A x - 5A) x + 8A) x - 4A``; each 4-tap sum (along x, then along y) is
  ``fma(v3, w3, fma(v2, w2, fma(v0, w0, v1 * w1)))``.
  ``TORCH_CPU=True`` reproduces ATen's CPU kernel (x86-64 build: bit-identical on all 272 size pairs tested,
  1..33 -> 1..64, up and down), where the compiler leaves the last step of each polynomial unfused;
  ``TORCH_CPU=False`` is the CUDA kernel's contraction as assumed (all polynomial steps fused) — to be
  confirmed on a GPU (tests/test_upsample.py::test_interpolations_gpu_against_cuda_aten).
- area: the window is summed in row-major order from 0, then divided by ``kh`` and then by ``kw``
  (IEEE division), as ATen's CPU and CUDA adaptive-average-pool kernels do. Output ``(1, 1)`` is
  ``mean()`` in ATen (a reduction tree): callers use torch for it.
- Phi: ``(u * (1-r)) + (cv * r)``, three roundings, as ``h.mul(1-r) + conv(h).mul_(r)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from fastvar.triton_kernels._device import on_tensor_device

# Integer arguments Triton must not specialise on (by default a 1 becomes a constant and a multiple of 16 gets a
# divisibility hint, each a separate compiled kernel): the sizes and strides of a scale's token map change every
# scale (1x1, 2x2, ... 16x16: h = w = 1 and then 16 are both specialised), so they recompiled kernels mid-sample.
# They only bound masks and index gathers, which no hint speeds up. Fixed per model and kept: C, H, W, the
# codebook's, f_hat's and the outputs' strides (unit strides give vector loads).
# The layout of a scale's maps is not fixed either: ATen picks the memory format of the code map (hence of the
# upsampled map and the conv's output) from its shape, contiguous for B = 1 or a 1x1 map, channels-last else,
# so their strides (1 in one layout, C or H*W in the other) are not specialised either. Per-pixel gathers and
# a 256-pixel plane per program gain little from a unit-stride hint.
_SCALE_ARGS_UP = ["h", "w", "s_b", "s_c", "s_y", "s_x", "i_b", "i_y", "o_b", "o_c", "o_y", "o_x"]
_SCALE_ARGS_AREA = ["nh", "nw", "x_b", "x_c", "x_y", "x_x", "o_b", "o_c", "o_y", "o_x"]
_SCALE_ARGS_PHI = ["nh", "nw", "n_off", "n_b", "n_c", "n_y", "n_x", "u_b", "u_c", "u_y", "u_x",
                   "cv_b", "cv_c", "cv_y", "cv_x"]


# ----------------------------------------------------------------------------------- bicubic helpers
@triton.jit
def _cc1(x, TORCH_CPU: tl.constexpr):
    """``((A + 2) x - (A + 3)) x x + 1`` for A = -0.75, in the rounding sequence of ATen's build."""
    p = tl.fma(x, 1.25, -2.25)
    if TORCH_CPU:
        return (p * x) * x + 1.0
    else:
        return tl.fma(p * x, x, 1.0)


@triton.jit
def _cc2(x, TORCH_CPU: tl.constexpr):
    """``((A x - 5 A) x + 8 A) x - 4 A`` for A = -0.75."""
    q = tl.fma(tl.fma(x, -0.75, 3.75), x, -6.0)
    if TORCH_CPU:
        return q * x + 3.0
    else:
        return tl.fma(q, x, 3.0)


@triton.jit
def _cubic_taps(o, scale, TORCH_CPU: tl.constexpr):
    """Source index ``floor(real)`` (int32) and the 4 weights of output coordinate ``o`` (int32 vector)."""
    real = tl.fma(o.to(tl.float32) + 0.5, scale, -0.5)
    fl = tl.floor(real)
    t = real - fl
    x2 = 1.0 - t
    w0 = _cc2(t + 1.0, TORCH_CPU)
    w1 = _cc1(t, TORCH_CPU)
    w2 = _cc1(x2, TORCH_CPU)
    w3 = _cc2(x2 + 1.0, TORCH_CPU)
    return fl.to(tl.int32), w0, w1, w2, w3


@triton.jit
def _sum4(v0, v1, v2, v3, w0, w1, w2, w3):
    """``v0 w0 + v1 w1 + v2 w2 + v3 w3`` as the C++/CUDA compilers contract it."""
    s = v1 * w1
    s = tl.fma(v0, w0, s)
    s = tl.fma(v2, w2, s)
    return tl.fma(v3, w3, s)


@triton.jit
def _load_src(src_ptr, idx_ptr, cb_ptr, b, c, yy, xx, mask2, pmask,
              s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX: tl.constexpr):
    """``src[b, c, yy, xx]`` as a ``[BLOCK_C, BLOCK_P]`` tile; with ``FROM_IDX`` it is
    ``codebook[idx[b, yy, xx], c]``."""
    if FROM_IDX:
        code = tl.load(idx_ptr + b * i_b + yy.to(tl.int64) * i_y + xx.to(tl.int64) * i_x, mask=pmask, other=0)
        return tl.load(cb_ptr + code[None, :] * cb_v + c[:, None] * cb_c, mask=mask2, other=0.0)
    else:
        off = b * s_b + c[:, None] * s_c + yy.to(tl.int64)[None, :] * s_y + xx.to(tl.int64)[None, :] * s_x
        return tl.load(src_ptr + off, mask=mask2, other=0.0)


@triton.jit
def _bicubic_row(src_ptr, idx_ptr, cb_ptr, b, c, yy, ix, h, w, wx0, wx1, wx2, wx3, mask2, pmask,
                 s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX: tl.constexpr):
    """The 4-tap sum along x of source row ``yy`` (already clamped)."""
    x0 = tl.minimum(tl.maximum(ix - 1, 0), w - 1)
    x1 = tl.minimum(tl.maximum(ix, 0), w - 1)
    x2 = tl.minimum(tl.maximum(ix + 1, 0), w - 1)
    x3 = tl.minimum(tl.maximum(ix + 2, 0), w - 1)
    v0 = _load_src(src_ptr, idx_ptr, cb_ptr, b, c, yy, x0, mask2, pmask, s_b, s_c, s_y, s_x, i_b, i_y, i_x,
                   cb_v, cb_c, FROM_IDX)
    v1 = _load_src(src_ptr, idx_ptr, cb_ptr, b, c, yy, x1, mask2, pmask, s_b, s_c, s_y, s_x, i_b, i_y, i_x,
                   cb_v, cb_c, FROM_IDX)
    v2 = _load_src(src_ptr, idx_ptr, cb_ptr, b, c, yy, x2, mask2, pmask, s_b, s_c, s_y, s_x, i_b, i_y, i_x,
                   cb_v, cb_c, FROM_IDX)
    v3 = _load_src(src_ptr, idx_ptr, cb_ptr, b, c, yy, x3, mask2, pmask, s_b, s_c, s_y, s_x, i_b, i_y, i_x,
                   cb_v, cb_c, FROM_IDX)
    return _sum4(v0, v1, v2, v3, wx0[None, :], wx1[None, :], wx2[None, :], wx3[None, :])


@triton.jit
def _code_tile(src_ptr, idx_ptr, cb_ptr, b, c, oy, ox, mask2, pmask, h, w, scale_y, scale_x,
               s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c,
               FROM_IDX: tl.constexpr, UPSAMPLE: tl.constexpr, TORCH_CPU: tl.constexpr):
    """The upsampled code map at output pixels ``(oy, ox)`` as a ``[BLOCK_C, BLOCK_P]`` tile (0 where
    ``mask2`` is off): ``sum_{j,i} wy_j(oy) wx_i(ox) src[b, c, clamp(iy+j-1), clamp(ix+i-1)]``, or a plain
    gather when ``UPSAMPLE`` is False (``h, w == H, W``)."""
    if UPSAMPLE:
        iy, wy0, wy1, wy2, wy3 = _cubic_taps(oy, scale_y, TORCH_CPU)
        ix, wx0, wx1, wx2, wx3 = _cubic_taps(ox, scale_x, TORCH_CPU)
        y0 = tl.minimum(tl.maximum(iy - 1, 0), h - 1)
        y1 = tl.minimum(tl.maximum(iy, 0), h - 1)
        y2 = tl.minimum(tl.maximum(iy + 1, 0), h - 1)
        y3 = tl.minimum(tl.maximum(iy + 2, 0), h - 1)
        r0 = _bicubic_row(src_ptr, idx_ptr, cb_ptr, b, c, y0, ix, h, w, wx0, wx1, wx2, wx3, mask2, pmask,
                          s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX)
        r1 = _bicubic_row(src_ptr, idx_ptr, cb_ptr, b, c, y1, ix, h, w, wx0, wx1, wx2, wx3, mask2, pmask,
                          s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX)
        r2 = _bicubic_row(src_ptr, idx_ptr, cb_ptr, b, c, y2, ix, h, w, wx0, wx1, wx2, wx3, mask2, pmask,
                          s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX)
        r3 = _bicubic_row(src_ptr, idx_ptr, cb_ptr, b, c, y3, ix, h, w, wx0, wx1, wx2, wx3, mask2, pmask,
                          s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX)
        return _sum4(r0, r1, r2, r3, wy0[None, :], wy1[None, :], wy2[None, :], wy3[None, :])
    else:
        return _load_src(src_ptr, idx_ptr, cb_ptr, b, c, oy, ox, mask2, pmask, s_b, s_c, s_y, s_x,
                         i_b, i_y, i_x, cb_v, cb_c, FROM_IDX)


@triton.jit(do_not_specialize=_SCALE_ARGS_UP)
def _bicubic_upsample_fwd_kernel(
    src_ptr, idx_ptr, cb_ptr, out_ptr,
    C, h, w, H, W,
    s_b, s_c, s_y, s_x,                 # source map (B, C, h, w) strides      (FROM_IDX=False)
    i_b, i_y, i_x,                      # indices (B, h, w) strides             (FROM_IDX=True)
    cb_v, cb_c,                         # codebook (V, C) strides               (FROM_IDX=True)
    o_b, o_c, o_y, o_x,                 # output (B, C, H, W) strides
    scale_y, scale_x,                   # fp32 h / H, w / W
    FROM_IDX: tl.constexpr, UPSAMPLE: tl.constexpr, TORCH_CPU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``out[b, c, y, x] = sum_{j,i} wy_j(y) wx_i(x) src[b, c, clamp(iy+j-1), clamp(ix+i-1)]`` (bicubic,
    ``F.interpolate(mode='bicubic', align_corners=False)``), or a plain gather when ``UPSAMPLE`` is False
    (``h, w == H, W``). Grid ``(cdiv(H*W, BLOCK_P), cdiv(C, BLOCK_C), B)``; a program writes a
    ``[BLOCK_C, BLOCK_P]`` tile of one image."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    oy = p // W
    ox = p % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask2 = cmask[:, None] & pmask[None, :]
    out = _code_tile(src_ptr, idx_ptr, cb_ptr, b, c, oy, ox, mask2, pmask, h, w, scale_y, scale_x,
                     s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX, UPSAMPLE, TORCH_CPU)
    off = b * o_b + c[:, None] * o_c + oy.to(tl.int64)[None, :] * o_y + ox.to(tl.int64)[None, :] * o_x
    tl.store(out_ptr + off, out, mask=mask2)


@triton.jit
def _round_to_tf32(x):
    """``x`` rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (PTX ``cvt.rna.tf32.f32``,
    what cuDNN / CUTLASS apply): Triton hands raw float32 to the tensor cores, which drop the low 13 bits,
    a rounding toward zero that would bias every product (finite x only)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=_SCALE_ARGS_UP)
def _upsample_phi_accumulate_fwd_kernel(
    src_ptr, idx_ptr, cb_ptr, w_ptr, bias_ptr, f_ptr,
    C, h, w, H, W,
    s_b, s_c, s_y, s_x,                 # source map (B, C, h, w) strides      (FROM_IDX=False)
    i_b, i_y, i_x,                      # indices (B, h, w) strides             (FROM_IDX=True)
    cb_v, cb_c,                         # codebook (V, C) strides               (FROM_IDX=True)
    w_o, w_i, w_y, w_x,                 # Phi's conv weight (C, C, 3, 3) strides
    f_b, f_c,                           # f_hat (B, C, H, W), (H, W) contiguous
    scale_y, scale_x, one_minus_r, r,   # fp32
    HAS_CONV: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_IDX: tl.constexpr, UPSAMPLE: tl.constexpr,
    TORCH_CPU: tl.constexpr, TF32: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The sampling step's accumulate with Phi's convolution inside (no ``u`` or ``cv`` in memory):

    ``u = up(codes)`` (as ``_code_tile``); ``cv[o] = bias[o] + sum_{i, dy, dx} W[o, i, dy, dx] u[i, y+dy-1, x+dx-1]``
    (zero padding); ``f_hat += u * (1-r) + cv * r`` (``f_hat += u`` without ``HAS_CONV``). Each of the 9 taps
    recomputes ``u`` at the shifted pixels (a halo costs no extra pass or barrier) and adds
    ``W[:, :, dy, dx] @ u_shifted`` with ``tl.dot``: float32 FMAs, or with ``TF32`` tensor cores on operands
    rounded to TF32 (``_round_to_tf32``). All ``C`` channels per program (``BLOCK_C >= C``, at least 16 for
    ``tl.dot``). Grid ``(cdiv(H*W, BLOCK_P), B)``."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    oy = p // W
    ox = p % W
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask2 = cmask[:, None] & pmask[None, :]
    u = _code_tile(src_ptr, idx_ptr, cb_ptr, b, c, oy, ox, mask2, pmask, h, w, scale_y, scale_x,
                   s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c, FROM_IDX, UPSAMPLE, TORCH_CPU)
    if HAS_CONV:
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        w_mask = cmask[:, None] & cmask[None, :]
        for t in tl.static_range(9):
            if t == 4:
                u_t = u
            else:
                qy = oy + (t // 3 - 1)
                qx = ox + (t % 3 - 1)
                qmask = pmask & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
                u_t = _code_tile(src_ptr, idx_ptr, cb_ptr, b, c, qy, qx, cmask[:, None] & qmask[None, :], qmask,
                                 h, w, scale_y, scale_x, s_b, s_c, s_y, s_x, i_b, i_y, i_x, cb_v, cb_c,
                                 FROM_IDX, UPSAMPLE, TORCH_CPU)
            w_t = tl.load(w_ptr + c[:, None] * w_o + c[None, :] * w_i + (t // 3) * w_y + (t % 3) * w_x,
                          mask=w_mask, other=0.0)                       # [C_out, C_in]
            if TF32:
                acc = tl.dot(_round_to_tf32(w_t), _round_to_tf32(u_t), acc, input_precision="tf32")
            else:
                acc = tl.dot(w_t, u_t, acc, input_precision="ieee")
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + c, mask=cmask, other=0.0)[:, None]
        hh = u * one_minus_r + acc * r
    else:
        hh = u
    f_off = b * f_b + c[:, None] * f_c + p[None, :]
    tl.store(f_ptr + f_off, tl.load(f_ptr + f_off, mask=mask2, other=0.0) + hh, mask=mask2)


# -------------------------------------------------------------------------------------- area helper
@triton.jit
def _area_mean(src_ptr, b, c, cmask, s_b, s_c, s_y, s_x, H, W, nh, nw, o, KH_MAX: tl.constexpr,
               KW_MAX: tl.constexpr):
    """Adaptive average pooling of cells ``o`` (flat index into ``(nh, nw)``) for channels ``c``:
    row-major window sum from 0, then ``/ kh`` then ``/ kw`` (IEEE), as ATen. Returns ``[BLOCK_C, BLOCK_O]``."""
    omask = o < nh * nw
    oy = o // nw
    ox = o % nw
    y0 = (oy * H) // nh
    y1 = ((oy + 1) * H + nh - 1) // nh
    x0 = (ox * W) // nw
    x1 = ((ox + 1) * W + nw - 1) // nw
    kh = y1 - y0
    kw = x1 - x0
    base = src_ptr + b * s_b + c[:, None] * s_c
    s = tl.zeros([c.shape[0], o.shape[0]], dtype=tl.float32)
    for a in range(KH_MAX):             # constexpr trip counts: the largest window of the pair of sizes
        for e in range(KW_MAX):
            m = omask & (a < kh) & (e < kw)
            off = (y0 + a).to(tl.int64) * s_y + (x0 + e).to(tl.int64) * s_x
            s = s + tl.load(base + off[None, :], mask=cmask[:, None] & m[None, :], other=0.0)
    # div_rn: IEEE division as ATen's (Triton's ``/`` and, up to 3.6, ``fdiv(ieee_rounding=True)`` emit div.full)
    s = tl.math.div_rn(s, tl.broadcast_to(kh.to(tl.float32)[None, :], s.shape))
    return tl.math.div_rn(s, tl.broadcast_to(kw.to(tl.float32)[None, :], s.shape))


@triton.jit(do_not_specialize=_SCALE_ARGS_AREA)
def _area_downsample_fwd_kernel(
    x_ptr, out_ptr,
    C, H, W, nh, nw,
    x_b, x_c, x_y, x_x, o_b, o_c, o_y, o_x,
    KH_MAX: tl.constexpr, KW_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """``out = F.interpolate(x, (nh, nw), mode='area')``: x ``(B, C, H, W)`` -> ``(B, C, nh, nw)``.
    Grid ``(cdiv(nh*nw, BLOCK_O), cdiv(C, BLOCK_C), B)``."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    res = _area_mean(x_ptr, b, c, cmask, x_b, x_c, x_y, x_x, H, W, nh, nw, o, KH_MAX, KW_MAX)
    oy = (o // nw).to(tl.int64)
    ox = (o % nw).to(tl.int64)
    off = b * o_b + c[:, None] * o_c + (oy * o_y + ox * o_x)[None, :]
    tl.store(out_ptr + off, res, mask=cmask[:, None] & (o < nh * nw)[None, :])


# ---------------------------------------------------------------------------- Phi + accumulate step
@triton.jit(do_not_specialize=_SCALE_ARGS_PHI)
def _phi_accumulate_fwd_kernel(
    u_ptr, cv_ptr, fin_ptr, fout_ptr, rest_ptr, next_ptr,
    C, H, W, nh, nw,
    u_b, u_c, u_y, u_x, cv_b, cv_c, cv_y, cv_x,
    f_b, f_c,                           # f_hat in / out and f_rest: (B, C, H, W), (H, W) contiguous
    n_off, n_b, n_c, n_y, n_x,          # next: element offset and strides (NCHW map or token-major rows)
    one_minus_r, r,                     # fp32
    HAS_CONV: tl.constexpr, HAS_FIN: tl.constexpr, WRITE_FHAT: tl.constexpr, ENCODE: tl.constexpr,
    DOWN: tl.constexpr, KH_MAX: tl.constexpr, KW_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """One scale's accumulate step for ``BLOCK_C`` channels of one image (all ``H*W`` pixels):

    ``h = u * (1-r) + cv * r`` (``cv`` = conv3x3(u) + bias; ``h = u`` without ``HAS_CONV``);
    ``WRITE_FHAT``: ``f_out = f_in + h`` (``f_in`` = 0 without ``HAS_FIN``; ``f_out`` may be ``f_in``);
    ``ENCODE``: ``f_rest -= h``; ``DOWN``: ``next = area(f_rest if ENCODE else f_out -> (nh, nw))``.
    The area pass re-reads the plane this program just wrote (after a CTA barrier), so the window sums
    run in ATen's order. Grid ``(cdiv(C, BLOCK_C), B)``."""
    pid_c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    p = tl.arange(0, BLOCK_HW)
    pmask = p < H * W
    y = (p // W).to(tl.int64)
    x = (p % W).to(tl.int64)
    mask2 = cmask[:, None] & pmask[None, :]
    u = tl.load(u_ptr + b * u_b + c[:, None] * u_c + (y * u_y + x * u_x)[None, :], mask=mask2, other=0.0)
    if HAS_CONV:
        cv = tl.load(cv_ptr + b * cv_b + c[:, None] * cv_c + (y * cv_y + x * cv_x)[None, :], mask=mask2, other=0.0)
        hh = u * one_minus_r + cv * r
    else:
        hh = u
    f_off = b * f_b + c[:, None] * f_c + p[None, :]
    if WRITE_FHAT:
        if HAS_FIN:
            fh = tl.load(fin_ptr + f_off, mask=mask2, other=0.0) + hh
        else:
            fh = hh + 0.0
        tl.store(fout_ptr + f_off, fh, mask=mask2)
    if ENCODE:
        fr = tl.load(rest_ptr + f_off, mask=mask2, other=0.0) - hh
        tl.store(rest_ptr + f_off, fr, mask=mask2)
    if DOWN:
        tl.debug_barrier()   # the window sums below read pixels other threads of this program stored
        o = tl.arange(0, BLOCK_O)
        if ENCODE:
            res = _area_mean(rest_ptr, b, c, cmask, f_b, f_c, W, 1, H, W, nh, nw, o, KH_MAX, KW_MAX)
        else:
            res = _area_mean(fout_ptr, b, c, cmask, f_b, f_c, W, 1, H, W, nh, nw, o, KH_MAX, KW_MAX)
        oy = (o // nw).to(tl.int64)
        ox = (o % nw).to(tl.int64)
        n_ptrs = next_ptr + n_off + b * n_b + c[:, None] * n_c + (oy * n_y + ox * n_x)[None, :]
        tl.store(n_ptrs, res, mask=cmask[:, None] & (o < nh * nw)[None, :])


@triton.jit
def _fma_probe_kernel(x_ptr, out_ptr):
    x = tl.load(x_ptr)
    tl.store(out_ptr, tl.fma(x, x, -1.0))


_FMA_EXACT: dict = {}


def interpreter_fma_is_exact() -> bool:
    """Whether Triton's CPU interpreter rounds ``tl.fma`` once, as the GPU does (Triton 3.9 does; 3.6's
    interpreter computes ``x * y + z`` with two roundings, so its results are not bit-exact)."""
    if "v" not in _FMA_EXACT:
        x = torch.tensor([1.0 + 2.0 ** -12], dtype=torch.float32)
        out = torch.empty(1, dtype=torch.float32)
        _fma_probe_kernel[(1,)](x, out)
        _FMA_EXACT["v"] = float(out) == 2.0 ** -11 + 2.0 ** -24     # exact (1 + 2^-12)^2 - 1
    return _FMA_EXACT["v"]


# ----------------------------------------------------------------------------------------- launchers
def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _f32(x: float) -> float:
    return float(np.float32(x))


def area_window_max(n_in: int, n_out: int) -> int:
    """Largest adaptive-pooling window along one axis (``ceil((o+1) n_in / n_out) - floor(o n_in / n_out)``)."""
    return max(-((-(o + 1) * n_in) // n_out) - (o * n_in) // n_out for o in range(n_out))


@on_tensor_device
def bicubic_upsample(
    src: Optional[torch.Tensor],
    size: Tuple[int, int],
    idx: Optional[torch.Tensor] = None,
    codebook: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``bicubic(src -> size)``; or, with ``idx`` ``(B, h, w)`` int64 and ``codebook`` ``(V, C)``, of the code
    map ``codebook[idx]`` (``src`` None). Same size: a copy / gather. Returns ``(B, C, *size)`` float32."""
    if idx is not None:
        B, h, w = idx.shape
        C = codebook.shape[1]
        dev = idx.device
    else:
        B, C, h, w = src.shape
        dev = src.device
    H, W = int(size[0]), int(size[1])
    if out is None:
        out = torch.empty(B, C, H, W, dtype=torch.float32, device=dev)
    interp = _interpreting(out)
    block_p = min(triton.next_power_of_2(H * W), 4096 if interp else 256)
    block_c = min(triton.next_power_of_2(C), 64 if interp else 2)
    s = src if src is not None else out
    ii = idx if idx is not None else out
    cb = codebook if codebook is not None else out
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), B)
    _bicubic_upsample_fwd_kernel[grid](
        s, ii, cb, out, C, h, w, H, W,
        *(s.stride() if src is not None else (0, 0, 0, 0)),
        *(ii.stride() if idx is not None else (0, 0, 0)),
        *(cb.stride() if codebook is not None else (0, 0)),
        *out.stride(), _f32(np.float32(h) / np.float32(H)), _f32(np.float32(w) / np.float32(W)),
        FROM_IDX=idx is not None, UPSAMPLE=(h, w) != (H, W), TORCH_CPU=interp,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4, enable_fp_fusion=False,
    )
    return out


@on_tensor_device
def area_downsample(x: torch.Tensor, size: Tuple[int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.interpolate(x, size, mode='area')`` for ``size != (1, 1)`` (ATen uses ``mean()`` there)."""
    B, C, H, W = x.shape
    nh, nw = int(size[0]), int(size[1])
    if out is None:
        out = torch.empty(B, C, nh, nw, dtype=torch.float32, device=x.device)
    interp = _interpreting(x)
    block_o = min(triton.next_power_of_2(nh * nw), 4096 if interp else 256)
    block_c = min(triton.next_power_of_2(C), 64 if interp else 4)
    grid = (triton.cdiv(nh * nw, block_o), triton.cdiv(C, block_c), B)
    _area_downsample_fwd_kernel[grid](
        x, out, C, H, W, nh, nw, *x.stride(), *out.stride(),
        KH_MAX=area_window_max(H, nh), KW_MAX=area_window_max(W, nw), BLOCK_C=block_c, BLOCK_O=block_o,
        num_warps=4, enable_fp_fusion=False,
    )
    return out


@on_tensor_device
def phi_accumulate(
    u: torch.Tensor,
    cv: Optional[torch.Tensor],
    resi_ratio: float,
    f_out: Optional[torch.Tensor],
    f_in: Optional[torch.Tensor] = None,
    f_rest: Optional[torch.Tensor] = None,
    next_size: Optional[Tuple[int, int]] = None,
    next_out: Optional[torch.Tensor] = None,
    next_offset: int = 0,
    next_strides: Optional[Sequence[int]] = None,
) -> None:
    """Launch ``_phi_accumulate_fwd_kernel``; every tensor is written in place.

    Args:
        u: ``(B, C, H, W)`` Phi's input (the upsampled codes); cv: conv3x3(u) + bias, or None (Phi = id).
        resi_ratio: r.
        f_out: ``(B, C, H, W)`` contiguous f_hat to write (None: do not accumulate f_hat).
        f_in: f_hat before this scale (None: zeros); may be ``f_out`` (in place).
        f_rest: ``(B, C, H, W)`` contiguous residual, ``f_rest -= h`` (encode), or None.
        next_size: ``(nh, nw)`` of the next scale, or None.
        next_out, next_offset, next_strides: where ``area(...)[b, c, y, x]`` goes:
            ``next_out.flat[next_offset + b*sb + c*sc + y*sy + x*sx]`` (default: ``next_out`` strides).
    """
    B, C, H, W = u.shape
    interp = _interpreting(u)
    down = next_size is not None
    nh, nw = (int(next_size[0]), int(next_size[1])) if down else (1, 1)
    ref_t = f_out if f_out is not None else f_rest
    if next_strides is None and next_out is not None:
        next_strides = next_out.stride()
    block_c = min(triton.next_power_of_2(C), 64 if interp else 1)
    grid = (triton.cdiv(C, block_c), B)
    dummy = ref_t
    _phi_accumulate_fwd_kernel[grid](
        u, cv if cv is not None else u, f_in if f_in is not None else dummy, f_out if f_out is not None else dummy,
        f_rest if f_rest is not None else dummy, next_out if next_out is not None else dummy,
        C, H, W, nh, nw,
        *u.stride(), *(cv.stride() if cv is not None else u.stride()),
        ref_t.stride(0), ref_t.stride(1),
        int(next_offset), *(next_strides if down else (0, 0, 0, 0)),
        _f32(1.0 - resi_ratio), _f32(resi_ratio),
        HAS_CONV=cv is not None, HAS_FIN=f_in is not None, WRITE_FHAT=f_out is not None,
        ENCODE=f_rest is not None, DOWN=down,
        KH_MAX=area_window_max(H, nh) if down else 0, KW_MAX=area_window_max(W, nw) if down else 0,
        BLOCK_C=block_c, BLOCK_HW=triton.next_power_of_2(H * W), BLOCK_O=triton.next_power_of_2(nh * nw),
        num_warps=4 if H * W <= 256 else 8, enable_fp_fusion=False,
    )


@on_tensor_device
def upsample_phi_accumulate(
    f_hat: torch.Tensor,
    src: Optional[torch.Tensor],
    phi_weight: Optional[torch.Tensor],
    phi_bias: Optional[torch.Tensor],
    resi_ratio: float,
    idx: Optional[torch.Tensor] = None,
    codebook: Optional[torch.Tensor] = None,
    dot_precision: str = "ieee",
    block_p: Optional[int] = None,
) -> None:
    """Launch ``_upsample_phi_accumulate_fwd_kernel``: ``f_hat += Phi(up(codes))`` in place, one launch.

    Args:
        f_hat: ``(B, C, H, W)`` float32, contiguous.
        src: the scale's ``(B, C, h, w)`` float32 code map (any strides), or None with ``idx`` ``(B, h, w)``
            int64 and ``codebook`` ``(V, C)``.
        phi_weight, phi_bias: ``(C, C, 3, 3)`` and ``(C,)``, or None (Phi = identity); resi_ratio: r.
        dot_precision: the convolution's products: ``"ieee"`` (float32 FMAs) or ``"tf32"`` (operands rounded
            to TF32, tensor cores: as cuDNN under ``torch.backends.cudnn.allow_tf32``; in the interpreter the
            rounding is applied and the products are exact, which is what lets the CPU tests check it).
        block_p: pixels per program (a power of two >= 16); default 16 on a GPU, all pixels up to 1024 in
            the interpreter.

    GPU launch: 16 pixels and 8 warps per program, chosen by ptxas spill reports for sm_90 (tests/
    sm90_compile.py, Triton 3.9), not by timing (no GPU yet): with 4 warps, 64 pixels spill 320-496 B
    (C = 32) and 8 KB (C = 64), 16 pixels still 8-176 B; with 8 warps and 16 pixels, C = 32 spills nothing
    and C = 64 with an upsample 24-96 B. A small tile re-reads Phi's weights (9 x C x C floats) per 16
    pixels from L2: the first thing to time.
    """
    B, C, H, W = f_hat.shape
    if C > 64:
        raise ValueError(f"the fused sampling step keeps all channels in one tile: C <= 64, got C={C}")
    if f_hat.stride(3) != 1 or f_hat.stride(2) != W:
        raise ValueError(f"f_hat must be contiguous over (H, W) (the kernel indexes its pixels flat), "
                         f"got strides {f_hat.stride()}")
    if dot_precision not in ("ieee", "tf32"):
        raise ValueError(f"dot_precision must be 'ieee' or 'tf32', got {dot_precision!r}")
    h, w = (idx.shape[1:] if idx is not None else src.shape[2:])
    interp = _interpreting(f_hat)
    block_c = max(16, triton.next_power_of_2(C))
    if block_p is None:
        block_p = max(16, min(triton.next_power_of_2(H * W), 1024)) if interp else 16
    s = src if src is not None else f_hat
    ii = idx if idx is not None else f_hat
    cb = codebook if codebook is not None else f_hat
    wt = phi_weight if phi_weight is not None else f_hat.new_empty(1, 1, 1, 1)
    grid = (triton.cdiv(H * W, block_p), B)
    _upsample_phi_accumulate_fwd_kernel[grid](
        s, ii, cb, wt, phi_bias if phi_bias is not None else f_hat, f_hat,
        C, h, w, H, W,
        *(s.stride() if src is not None else (0, 0, 0, 0)),
        *(ii.stride() if idx is not None else (0, 0, 0)),
        *(cb.stride() if codebook is not None else (0, 0)),
        *wt.stride(), f_hat.stride(0), f_hat.stride(1),
        _f32(np.float32(h) / np.float32(H)), _f32(np.float32(w) / np.float32(W)),
        _f32(1.0 - resi_ratio), _f32(resi_ratio),
        HAS_CONV=phi_weight is not None, HAS_BIAS=phi_bias is not None, FROM_IDX=idx is not None,
        UPSAMPLE=(h, w) != (H, W), TORCH_CPU=interp, TF32=dot_precision == "tf32", BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=8, enable_fp_fusion=False,
    )
