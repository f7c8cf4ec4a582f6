"""Fused VAR token sampling: CFG mix, top-k, top-p and the draw in one kernel, one read of the logits.

Rows ``r = b * l + i`` of logits ``(N, l, V)`` (``N = 2B`` with CFG: the B conditional rows first,
then the B unconditional ones; ``N = B`` without). Per row, all in float32:

    x      = a * cond[r] - t * uncond[r]     (HAS_CFG; a = fl32(1 + t), t = fl32(t), two roundings, no FMA)
    keep   = x >= x_(k)                      (HAS_TOP_K, 0 < k < V; x_(k) the k-th largest, ties all kept)
    e      = exp(x - max x) on keep, 0 elsewhere;  p = e * (1 / sum e)
    keep  &= not removed by top-p            (HAS_TOP_P; see below)
    exact: token = argmax_j e_j / q_j over keep, first maximum   (q: Exp(1) noise, (rows, V))
    fast:  token = min { j : cumsum(e * keep)_j > u * sum(e * keep) },  u = tl.rand(seed, offset + r)
    filtered[r] = where(keep, x, -inf)       (WRITE_FILTERED: the official in-place filtered logits)

Selection without a sort: floats are mapped to order-preserving uint32 keys (``-0.0`` as ``+0.0``) and
thresholds are built bit by bit from the most significant one (32 steps, each one masked reduction
over the row held in registers):

- top-k: the largest key ``T`` with ``count(key >= T) >= k`` is the key of the k-th largest value;
  ``key >= T`` is exactly ``x >= x_(k)``.
- top-p: the official rule removes, in the ascending sort, the entries whose cumulative probability is
  ``<= thr = fl32(1 - p)``, never the last (largest). The largest key ``T`` with
  ``sum(p[key < T]) <= thr`` is the key of the first value whose inclusive cumulative mass exceeds
  ``thr``: every key above ``T`` is kept, every key below removed. Ties at ``T`` are ordered as a
  stable ascending sort orders them (lower index first; what torch's sort does on CUDA for
  V > 32): the member of rank ``m`` (1-based, by index) is kept iff ``sum(p[key < T]) + m * p_T > thr``,
  and the last member of the largest value is always kept.

Exactness (exact mode): the CFG mix is bit-exact with torch (FMA contraction off) and so is the
top-k set. The winner is compared as ``e_j / q_j`` (IEEE division; libdevice ``expf`` on a GPU, the
exp of torch's CUDA softmax), which is invariant to the normalisation ``1 / sum e`` that torch applies
before dividing; it differs from torch's ``fl(fl(e_j * s) / q_j)`` argmax only when the two best
ratios lie within a few float32 ulps (relative gap < 2^-20) of each other, or when the top-p boundary
entry's cumulative mass lies within float32 rounding of ``thr`` and that entry wins.
``fastvar/ops/sampling.py`` documents the measured rates.

Cost (ptxas, sm_90, V = 4096, 8 warps): 112 registers, no spills; 2 x 32 masked reductions per row
for the two thresholds, one read of both logit halves and of the noise, one write of the tokens.

Error codes per row (``err``): 1 = NaN after the mix, 2 = every logit ``-inf``, 4 = a ``+inf`` logit;
the row's token is then -1. One program holds ``ROWS`` rows of ``BLOCK_V >= V`` columns in registers
(V <= 32768).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastvar.triton_kernels._device import on_tensor_device

MAX_V = 32768        # one row lives in registers; larger vocabularies use the eager path

ERR_NAN = 1
ERR_ALL_NEG_INF = 2
ERR_POS_INF = 4

# Integer arguments Triton must not specialise on (a 1 becomes a constant, a multiple of 16 gets a hint, each a
# separate compiled kernel): the row count, the scale's token count and the batch-dependent offsets change with
# every scale and batch size (l = 1 and B = 1 were each a new kernel mid-sample), the seed and offset with every
# draw, top_k with the settings (k = 1 too). None of them feeds an address that a hint would vectorise. The seed
# and offset are typed int64 (annotations): by value, Triton types an int i32 below 2^31 and i64 above, so a
# seed past 2^31 compiled a second kernel.
_RUNTIME_ARGS = ["stride_b", "uncond_offset", "n_rows", "l", "top_k", "seed", "offset"]


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _sample_fwd_kernel(
    LOGITS, NOISE, SEED_PTR, TOKENS, FILTERED, ERR,
    stride_b, stride_l, stride_v, uncond_offset, stride_noise,
    n_rows, l, V, cfg_a, cfg_t, top_k, top_p_thr, seed: tl.int64, offset: tl.int64,
    HAS_CFG: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, FAST: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, WRITE_FILTERED: tl.constexpr, PRECISE_EXP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)                 # (ROWS,)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_V)                                        # (BLOCK_V,)
    valid = row_ok[:, None] & (cols < V)[None, :]                       # (ROWS, BLOCK_V)
    base = (rows // l) * stride_b + (rows % l) * stride_l
    ptrs = LOGITS + base[:, None] + cols[None, :].to(tl.int64) * stride_v
    x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(ptrs + uncond_offset, mask=valid, other=0.0).to(tl.float32)
        # the official (1 + t) * cond - t * uncond: two products rounded to fp32, then the difference
        # (the launcher turns FMA contraction off, which would fuse the second product into the subtraction)
        x = cfg_a * x - cfg_t * u

    # ---- bad input: NaN, +inf, or a row of -inf only
    neg_inf = float("-inf")
    is_nan = (x != x) & valid
    has_nan = tl.max(is_nan.to(tl.int32), axis=1)
    has_pos_inf = tl.max(((x == float("inf")) & valid).to(tl.int32), axis=1)
    n_finite = tl.sum(((x > neg_inf) & valid & (x == x)).to(tl.int32), axis=1)
    err = has_nan * 1 + (n_finite == 0).to(tl.int32) * 2 + has_pos_inf * 4
    err = tl.where(row_ok, err, 0)
    x = tl.where(valid & (x == x), x, neg_inf)

    # ---- order-preserving uint32 keys: negative floats -> ~bits, positive -> bits | sign
    x = tl.where(x == 0.0, 0.0, x)                                      # -0.0 -> +0.0
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    key = tl.where(sign != 0, ~bits, bits | 0x80000000)
    key = tl.where(valid, key, 0)                                       # padding below -inf's key

    keep = valid
    if HAS_TOP_K:
        # largest T with count(key >= T) >= k: the key of the k-th largest logit (ties all kept)
        thr_k = tl.zeros([ROWS], dtype=tl.uint32)
        bit = tl.full([ROWS], 0x80000000, tl.uint32)
        for _ in range(32):
            cand = thr_k | bit
            bit = bit >> 1
            cnt = tl.sum(((key >= cand[:, None]) & valid).to(tl.int32), axis=1)
            thr_k = tl.where(cnt >= top_k, cand, thr_k)
        keep = valid & (key >= thr_k[:, None])

    xk = tl.where(keep, x, neg_inf)
    x_max = tl.max(xk, axis=1)
    x_max = tl.where(x_max > neg_inf, x_max, 0.0)                      # rows of -inf only (flagged)
    if PRECISE_EXP:
        # CUDA's expf (<= 2 ulp), the exp torch's softmax uses: tl.exp is ex2.approx(x * log2 e), whose
        # relative error grows to ~1e-6 at x = -20 and would make near-ties of the race disagree more often
        e = tl.where(keep, libdevice.exp(xk - x_max[:, None]), 0.0)
    else:
        e = tl.where(keep, tl.exp(xk - x_max[:, None]), 0.0)

    if HAS_TOP_P:
        z = tl.sum(e, axis=1)                                           # >= 1: the largest has e = 1
        inv_z = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.where(z > 0.0, z, 1.0))
        p = e * inv_z[:, None]
        # largest T with sum(p[key < T]) <= thr (the partial sums grow with T: a monotone predicate)
        thr_p = tl.zeros([ROWS], dtype=tl.uint32)
        bit = tl.full([ROWS], 0x80000000, tl.uint32)
        for _ in range(32):
            cand = thr_p | bit
            bit = bit >> 1
            below = tl.sum(tl.where(key < cand[:, None], p, 0.0), axis=1)
            thr_p = tl.where(below <= top_p_thr, cand, thr_p)
        key_max = tl.max(tl.where(keep, key, 0), axis=1)
        thr_p = tl.minimum(thr_p, key_max)                              # never beyond the largest
        mass_below = tl.sum(tl.where(key < thr_p[:, None], p, 0.0), axis=1)
        in_group = keep & (key == thr_p[:, None])
        p_group = tl.max(tl.where(in_group, p, 0.0), axis=1)
        n_group = tl.sum(in_group.to(tl.int32), axis=1)
        # rank by index among the tied entries at the threshold (a stable ascending sort's order)
        rank = tl.cumsum(in_group.to(tl.int32), axis=1)
        keep_tie = (mass_below[:, None] + rank.to(tl.float32) * p_group[:, None] > top_p_thr) | (
            (thr_p == key_max)[:, None] & (rank == n_group[:, None]))
        keep = keep & ((key > thr_p[:, None]) | (in_group & keep_tie))
        e = tl.where(keep, e, 0.0)

    if FAST:
        if SEED_FROM_PTR:
            seed_v = tl.load(SEED_PTR)
            offs = tl.load(SEED_PTR + 1) + rows
        else:
            seed_v = seed
            offs = offset + rows
        r = tl.rand(seed_v, offs)                                       # (ROWS,) in [0, 1)
        c = tl.cumsum(e, axis=1)
        total = tl.max(c, axis=1)                                       # the last partial sum
        first = tl.min(tl.where((c > (r * total)[:, None]) & keep, cols[None, :], BLOCK_V), axis=1)
        last = tl.max(tl.where(keep & (e > 0.0), cols[None, :], -1), axis=1)
        tok = tl.where(first < BLOCK_V, first, last)                    # r * total rounding up to total
    else:
        q = tl.load(NOISE + rows[:, None] * stride_noise + cols[None, :], mask=valid, other=1.0)
        # IEEE division, as torch divides (Triton's `/` may lower to the 2-ulp div.full.f32 on NVIDIA)
        race = tl.where(keep & (e > 0.0), tl.math.div_rn(e, q), -1.0)
        tok = tl.argmax(race, axis=1, tie_break_left=True)

    tok = tl.where(err == 0, tok.to(tl.int64), -1)
    tl.store(TOKENS + rows, tok, mask=row_ok)
    tl.store(ERR + rows, err, mask=row_ok)
    if WRITE_FILTERED:
        tl.store(FILTERED + rows[:, None] * V + cols[None, :], tl.where(keep, x, neg_inf), mask=valid)


def _launch_config(n_rows: int, block_v: int, interpret: bool, filtered: bool = False):
    """Rows per program and warps: one row per program at VAR's V = 4096 (16 values per thread at 8
    warps); several rows per program for small vocabularies; many in the interpreter, which runs
    programs one after another but vectorises inside one. Writing the filtered logits (``more_smooth``)
    keeps the CFG-mixed row alive to the end: at V = 4096 and 8 warps that spilled 16 B (ptxas, sm_90,
    Triton 3.9); 16 warps halve the values per thread."""
    if interpret:
        rows = max(1, min(triton.next_power_of_2(n_rows), (1 << 18) // block_v, 4096))
        return rows, 4
    rows = max(1, min(triton.next_power_of_2(n_rows), 2048 // block_v))
    elems = rows * block_v
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    if filtered and elems > 2048:
        num_warps = min(2 * num_warps, 32)
    return rows, num_warps


@on_tensor_device
def sample_fwd(logits, tokens, err, n_cond, cfg_a, cfg_t, top_k, top_p_thr, noise=None, seed=0, offset=0,
               seed_offset=None, filtered=None, has_cfg=False, has_top_k=False, has_top_p=False,
               interpret=False, precise_exp=None):
    """Launch on ``logits`` ``(N, l, V)`` (any strides; fp32/fp16/bf16). Rows ``n_cond * l``.

    Writes ``tokens`` ``(rows,)`` int64, ``err`` ``(rows,)`` int32 and, if given, ``filtered``
    ``(rows, V)`` float32 contiguous. ``noise`` ``(rows, V)`` float32 with unit column stride selects
    exact mode; without it fast mode draws ``tl.rand(seed, offset + row)`` (``seed_offset``: an int64
    device tensor ``[seed, offset]`` read by the kernel instead, for CUDA graphs).
    ``cfg_a``, ``cfg_t``, ``top_p_thr`` must already be float32-representable. ``precise_exp`` (default:
    exact mode on a GPU) uses libdevice's expf; the interpreter has no libdevice and uses numpy's exp.
    """
    N, l, V = logits.shape
    n_rows = n_cond * l
    if n_rows == 0:
        return
    block_v = triton.next_power_of_2(V)
    rows_per_prog, num_warps = _launch_config(n_rows, block_v, interpret, filtered is not None)
    fast = noise is None
    if precise_exp is None:
        precise_exp = not fast and not interpret
    grid = (triton.cdiv(n_rows, rows_per_prog),)
    _sample_fwd_kernel[grid](
        logits, noise if not fast else tokens, seed_offset if seed_offset is not None else tokens,
        tokens, filtered if filtered is not None else tokens, err,
        logits.stride(0), logits.stride(1), logits.stride(2), n_cond * logits.stride(0),
        noise.stride(0) if not fast else 0,
        n_rows, l, V, float(cfg_a), float(cfg_t), int(top_k), float(top_p_thr), int(seed), int(offset),
        HAS_CFG=bool(has_cfg), HAS_TOP_K=bool(has_top_k), HAS_TOP_P=bool(has_top_p), FAST=fast,
        SEED_FROM_PTR=seed_offset is not None, WRITE_FILTERED=filtered is not None, PRECISE_EXP=bool(precise_exp),
        ROWS=rows_per_prog, BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=False,
    )
