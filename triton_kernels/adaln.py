"""Fused adaptive LayerNorm for VAR's sampling step.

One program per token row ``r`` of ``(R, C)`` rows, sample ``n = r // l`` (``l`` tokens per sample):

    x_new[r] = x[r] + y[r] * gamma[n]                     (HAS_RESIDUAL)
    h[r]     = (x_new[r] - mean) * rstd * (1 + scale[n]) + shift[n]
    mean, rstd over the C channels of the row, in float32; rstd = 1 / sqrt(var + eps)

One read of x (and y) and one write of h (and x_new) instead of the 4-6 passes of the eager chain
(layer_norm, add, mul, add, and for the residual mul, add). The whole row sits in registers:
C <= 16384 (VAR: 1024-2304).
"""
import triton
import triton.language as tl

from fastvar.triton_kernels._device import on_tensor_device


# ``l`` (tokens per sample) changes every scale and is 1 at the first: Triton would compile a second kernel for
# it (a 1 becomes a constant). It only divides the row index.
@triton.jit(do_not_specialize=["l"])
def _adaln_fwd_kernel(
    X, Y, GAMMA, SCALE, SHIFT, H, XNEW,
    stride_x, stride_y, stride_h, stride_xnew, stride_mod,
    C, l, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // l
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GAMMA + n * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + y * g
        tl.store(XNEW + row * stride_xnew + cols, x.to(XNEW.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / C
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    scale = tl.load(SCALE + n * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + n * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
    h = diff * rstd * (1.0 + scale) + shift
    tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)


@on_tensor_device
def adaln_fwd(x, scale, shift, eps, y=None, gamma=None, h=None, x_new=None):
    """Launch on row-major views: ``x``, ``y``, ``h``, ``x_new`` ``(R, C)`` with unit column stride,
    ``scale``, ``shift``, ``gamma`` ``(N, C)`` sharing one row stride; ``R = N * l``."""
    R, C = x.shape
    N = scale.shape[0]
    has_res = y is not None
    block = triton.next_power_of_2(C)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _adaln_fwd_kernel[(R,)](
        x, y if has_res else x, gamma if has_res else scale, scale, shift, h, x_new if has_res else h,
        x.stride(0), (y if has_res else x).stride(0), h.stride(0), (x_new if has_res else h).stride(0),
        scale.stride(0), C, R // N, float(eps),
        HAS_RESIDUAL=has_res, BLOCK_C=block, num_warps=num_warps,
    )
    return h, x_new
