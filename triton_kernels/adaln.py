"""Fused adaptive LayerNorm for VAR's sampling step.

``BLOCK_R`` token rows ``r`` of ``(R, C)`` rows per program, sample ``n = r // l`` (``l`` tokens per sample):

    x_new[r] = x[r] + y[r] * gamma[n]                     (HAS_RESIDUAL)
    h[r]     = (x_new[r] - mean) * rstd * (1 + scale[n]) + shift[n]
    mean, rstd over the C channels of the row, in float32; rstd = 1 / sqrt(var + eps)

One read of x (and y) and one write of h (and x_new) instead of the 4-6 passes of the eager chain
(layer_norm, add, mul, add, and for the residual mul, add). The whole row sits in registers:
C <= 16384 (VAR: 1024-2304). On a GPU a program holds one row (``BLOCK_R = 1``); the interpreter takes 64 rows
per program, which it runs as one numpy step instead of 64 (its cost is per program: the patched official
model's sampling test on the Triton kernels took ~430 s of CPU with one row per program).
"""
import numpy as np
import torch
import triton
import triton.language as tl

from fastvar.triton_kernels._device import on_tensor_device


# ``l`` (tokens per sample) and ``R`` (rows) change every scale: Triton would compile another kernel when one is
# 1 (a constant) or a multiple of 16 (a divisibility hint), e.g. R = 2 * 16 at d16's fourth scale. ``l`` only
# divides the row index and ``R`` only masks the last rows: neither specialisation buys anything.
@triton.jit(do_not_specialize=["l", "R"])
def _adaln_fwd_kernel(
    X, Y, GAMMA, SCALE, SHIFT, H, XNEW,
    stride_x, stride_y, stride_h, stride_xnew, stride_mod,
    R, C, l, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = rows // l
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mod = n[:, None] * stride_mod + cols[None, :]
    if HAS_RESIDUAL:
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GAMMA + mod, mask=mask, other=0.0).to(tl.float32)
        x = x + y * g
        tl.store(XNEW + rows[:, None] * stride_xnew + cols[None, :], x.to(XNEW.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    scale = tl.load(SCALE + mod, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + mod, mask=mask, other=0.0).to(tl.float32)
    h = diff * rstd[:, None] * (1.0 + scale) + shift
    tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@on_tensor_device
def adaln_fwd(x, scale, shift, eps, y=None, gamma=None, h=None, x_new=None):
    """Launch on row-major views: ``x``, ``y``, ``h``, ``x_new`` ``(R, C)`` with unit column stride,
    ``scale``, ``shift``, ``gamma`` ``(N, C)`` sharing one row stride; ``R = N * l``."""
    R, C = x.shape
    N = scale.shape[0]
    has_res = y is not None
    block = triton.next_power_of_2(C)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    block_r = 64 if _interpreting(x) else 1
    _adaln_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, y if has_res else x, gamma if has_res else scale, scale, shift, h, x_new if has_res else h,
        x.stride(0), (y if has_res else x).stride(0), h.stride(0), (x_new if has_res else h).stride(0),
        scale.stride(0), R, C, R // N, float(np.float32(eps)),
        HAS_RESIDUAL=has_res, BLOCK_R=block_r, BLOCK_C=block, num_warps=num_warps,
    )
    return h, x_new
