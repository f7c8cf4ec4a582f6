"""Infinity's bit sampler in one kernel: temperature, CFG mix, top-k/top-p over the two values of each bit,
the draw, and the bit written straight as its +/- code in the VAE latent layout.

Rows ``r = b * n + i`` of logits ``(N, n, 2)`` (``n = h * w * d_t`` bits per image; ``N = 2B`` with guidance
on the logits, conditional rows first; ``N = B`` without). Per row, in float32 (FMA contraction off):

    x_j   = l_j * inv_tau                                 (fl32(1 / tau), as the official ``.mul(1 / tau)``)
    x_j   = cfg_a * x_j[cond] + cfg_b * x_j[uncond]       (HAS_CFG; cfg_a = fl32(cfg), cfg_b = fl32(1 - cfg))
    keep  = x_j >= max(x)                                 (TOP_K1: top-k with k = 1; k >= 2 keeps both)
    e_j   = exp(x_j - max(x)) on keep;  p_j = e_j * fl32(1 / (e_0 + e_1))   (``/ (e_0 + e_1)`` on a GPU)
    top-p (HAS_TOP_P): the first value of the ascending order (value 0 first on ties, a stable sort) is
            removed when its p <= thr = fl32(1 - top_p); the larger never is
    bit   = argmax_j p_j / E_j over kept values (E the Exp(1) noise, (rows, 2); first index on ties, NaN first)
    CODES[pos(r)] = bit ? code : -code                    (WRITE_CODES)

``pos`` places the row's bit in the ``(B, h', w', d)`` latent (the memory of the official ``(B, d, 1, h', w')``
channels-last codes): token ``t = i // d_t``, bit ``j = i % d_t`` at grid ``(t // w, t % w)``; under PATCHIFY
``j = 4 ch + 2 si + sk`` goes to pixel ``(2 row + si, 2 col + sk)``, channel ``ch`` (pixel_shuffle(2)).

Exactness (against the official ``softmax`` + ``torch.multinomial`` given the same E): the temperature,
mix and top-k are bit-exact; the probabilities use the same formula as torch's softmax (reciprocal on CPU,
division on CUDA) with libdevice's ``expf`` on a GPU (the interpreter uses NumPy's exp), so a bit can only
differ where the two ratios ``p_j / E_j`` agree to within float32 rounding, or ``p`` sits within rounding of
``thr``. One program handles ``BLOCK`` rows; each row reads 2 (4 with CFG) logits and 2 noise values.

Error codes per row (``ERR``): 1 NaN after the mix, 2 both values ``-inf``, 4 a ``+inf``; the bit is then 255.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastvar.triton_kernels._device import on_tensor_device

ERR_NAN = 1
ERR_ALL_NEG_INF = 2
ERR_POS_INF = 4


# Sizes that change with the scale (the token map's width ``w`` is 1 at the first; rows, bits and the guided
# half's offset grow with h * w): a 1 or a multiple of 16 among them would compile another kernel mid-sample
# (the 1024 px schedule compiled 3). They only index and mask.
@triton.jit(do_not_specialize=["stride_b", "uncond_offset", "n_rows", "n", "w"])
def _bit_sampling_fwd_kernel(
    LOGITS, NOISE, BITS, CODES, ERR,
    stride_b, stride_n, stride_v, uncond_offset, stride_noise,
    n_rows, n, inv_tau, cfg_a, cfg_b, top_p_thr, code, w, d_t, d,
    HAS_CFG: tl.constexpr, TOP_K1: tl.constexpr, HAS_TOP_P: tl.constexpr, WRITE_CODES: tl.constexpr,
    PATCHIFY: tl.constexpr, PRECISE_EXP: tl.constexpr, SOFTMAX_DIV: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = r < n_rows
    b = r // n
    i = r % n
    ptr = LOGITS + b * stride_b + i * stride_n
    x0 = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) * inv_tau
    x1 = tl.load(ptr + stride_v, mask=ok, other=0.0).to(tl.float32) * inv_tau
    if HAS_CFG:
        u0 = tl.load(ptr + uncond_offset, mask=ok, other=0.0).to(tl.float32) * inv_tau
        u1 = tl.load(ptr + uncond_offset + stride_v, mask=ok, other=0.0).to(tl.float32) * inv_tau
        x0 = cfg_a * x0 + cfg_b * u0                     # two rounded products, then the sum (no FMA)
        x1 = cfg_a * x1 + cfg_b * u1

    # ---- bad input
    neg_inf = float("-inf")
    nan = (x0 != x0) | (x1 != x1)
    pos_inf = (x0 == float("inf")) | (x1 == float("inf"))
    all_neg = (x0 == neg_inf) & (x1 == neg_inf)
    err = tl.where(ok, nan.to(tl.int32) * 1 + all_neg.to(tl.int32) * 2 + pos_inf.to(tl.int32) * 4, 0)

    mx = tl.maximum(x0, x1)
    mx = tl.where(mx > neg_inf, mx, 0.0)                 # rows of -inf only (flagged)
    keep0 = x0 > neg_inf
    keep1 = x1 > neg_inf
    if TOP_K1:
        keep0 = keep0 & (x0 >= mx)
        keep1 = keep1 & (x1 >= mx)
    if PRECISE_EXP:
        e0 = tl.where(keep0, libdevice.exp(x0 - mx), 0.0)
        e1 = tl.where(keep1, libdevice.exp(x1 - mx), 0.0)
    else:
        e0 = tl.where(keep0, tl.exp(x0 - mx), 0.0)
        e1 = tl.where(keep1, tl.exp(x1 - mx), 0.0)
    one = tl.full([BLOCK], 1.0, tl.float32)
    s = e0 + e1
    s = tl.where(s > 0.0, s, 1.0)
    if SOFTMAX_DIV:
        p0 = tl.math.div_rn(e0, s)
        p1 = tl.math.div_rn(e1, s)
    else:
        inv = tl.math.div_rn(one, s)
        p0 = e0 * inv
        p1 = e1 * inv
    if HAS_TOP_P:
        # the official rule on the ascending pair: drop its first entry when its probability <= thr
        x0f = tl.where(keep0, x0, neg_inf)
        x1f = tl.where(keep1, x1, neg_inf)
        first0 = x0f <= x1f                               # stable ascending order: value 0 first on ties
        drop = tl.where(first0, p0, p1) <= top_p_thr
        keep0 = keep0 & ~(drop & first0)
        keep1 = keep1 & ~(drop & ~first0)
        e0 = tl.where(keep0, e0, 0.0)
        e1 = tl.where(keep1, e1, 0.0)
        s = e0 + e1
        if SOFTMAX_DIV:
            p0 = tl.math.div_rn(e0, s)
            p1 = tl.math.div_rn(e1, s)
        else:
            inv = tl.math.div_rn(one, s)
            p0 = e0 * inv
            p1 = e1 * inv

    q0 = tl.load(NOISE + r * stride_noise, mask=ok, other=1.0)
    q1 = tl.load(NOISE + r * stride_noise + 1, mask=ok, other=1.0)
    r0 = tl.math.div_rn(p0, q0)                           # IEEE division, as torch divides
    r1 = tl.math.div_rn(p1, q1)
    # torch.argmax: NaN counts as the maximum, the first maximum wins
    bit = tl.where(r0 != r0, 0, tl.where(r1 != r1, 1, (r1 > r0).to(tl.int32)))
    tl.store(BITS + r, tl.where(err == 0, bit, 255).to(tl.uint8), mask=ok)
    tl.store(ERR + r, err, mask=ok)
    if WRITE_CODES:
        t = i // d_t
        j = i % d_t
        row = t // w
        col = t % w
        if PATCHIFY:
            ch = j // 4
            si = (j // 2) % 2
            sk = j % 2
            pos = ((b * (2 * (n // d_t // w)) + 2 * row + si) * (2 * w) + 2 * col + sk) * d + ch
        else:
            pos = ((b * (n // d_t // w) + row) * w + col) * d + j
        tl.store(CODES + pos, tl.where(bit == 1, code, -code), mask=ok & (err == 0))


def _block(n_rows: int, interpret: bool) -> int:
    """Rows per program: 1024 on a GPU (4 warps, 8 rows per thread; the kernel is memory-bound at ~14 B per
    bit); up to 2^16 in the interpreter, which vectorises inside a program."""
    if interpret:
        return max(16, min(triton.next_power_of_2(n_rows), 1 << 16))
    return 1024


@on_tensor_device
def bit_sampling_fwd(logits, noise, bits, err, B, inv_tau, cfg_a=1.0, cfg_b=0.0, top_p_thr=0.0, has_cfg=False,
                     top_k1=False, has_top_p=False, codes=None, code=1.0, w=1, d_t=1, d=1, patchify=False,
                     interpret=None, precise_exp=None, softmax_div=None):
    """Launch on ``logits`` ``(N, n, 2)`` (any strides; fp32/fp16/bf16) and ``noise`` ``(B * n, 2)`` float32
    (unit column stride). Writes ``bits`` ``(B * n,)`` uint8 and ``err`` ``(B * n,)`` int32 and, if given,
    ``codes`` (``B * n`` float32 values laid out as ``(B, h', w', d)``; ``w`` the token grid width).
    Float scalars must already be float32-representable. ``interpret`` (default: not a CUDA tensor) picks the
    interpreter's block size and the CPU's torch semantics (NumPy exp, softmax by reciprocal) instead of the
    GPU's (libdevice expf, softmax by division); ``precise_exp`` / ``softmax_div`` override the latter."""
    N, n, _ = logits.shape
    n_rows = B * n
    if n_rows == 0:
        return
    on_gpu = logits.device.type == "cuda" if interpret is None else not interpret
    block = _block(n_rows, not on_gpu)
    _bit_sampling_fwd_kernel[(triton.cdiv(n_rows, block),)](
        logits, noise, bits, codes if codes is not None else noise, err,
        logits.stride(0), logits.stride(1), logits.stride(2), B * logits.stride(0), noise.stride(0),
        n_rows, n, float(inv_tau), float(cfg_a), float(cfg_b), float(top_p_thr), float(code), int(w), int(d_t),
        int(d),
        HAS_CFG=bool(has_cfg), TOP_K1=bool(top_k1), HAS_TOP_P=bool(has_top_p), WRITE_CODES=codes is not None,
        PATCHIFY=bool(patchify), PRECISE_EXP=on_gpu if precise_exp is None else bool(precise_exp),
        SOFTMAX_DIV=on_gpu if softmax_div is None else bool(softmax_div), BLOCK=block, num_warps=4,
        enable_fp_fusion=False,
    )
