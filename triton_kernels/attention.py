"""Triton kernels of VAR's block-causal multi-scale attention and of its KV-cached sampling step.

Definitions (see :mod:`fastvar.reference.attention`): ``q, k, v`` are ``(B, L, H, D)`` with any strides,
``scale_lens`` the token count of every scale (``sum == L``), ``end(i)`` the end of the scale of token
``i``. Query ``i`` attends to keys ``[0, end(i))``::

    z_ij = softmax_scale * qt_i . kt_j        out_i = sum_{j < end(i)} softmax_j(z_ij) v_j

with ``qt = q, kt = k``, or with VAR's L2 norm (``NORM``)
``qt = exp(min(scale_mul_h, ln 100)) * q / max(|q|, eps)`` and ``kt = k / max(|k|, eps)`` per head.

Tiling (FlashAttention-2, online softmax in base 2, scores never leave registers):

* forward and dQ: one program per (query tile, batch*head). Every row of a query tile sees at least
  ``[0, end(first row))`` and at most ``[0, end(last row))`` (``end`` never decreases along the sequence).
  Key tiles below ``end(first row)`` are full: no mask arithmetic. Tiles up to ``end(last row)`` get the
  per-row mask ``key < end(row)``. Tiles beyond are never visited.
* dK/dV: one program per (key tile, batch*head). Queries that see any key of the tile start at
  ``begin(scale of the first key)``; from ``begin(scale of the last key)`` on they see all of it. Query
  tiles before that are masked, the rest are full (a ragged last query tile, and all query tiles of a
  ragged last key tile, are masked too).
* The bounds come from two ``(L,)`` int32 tables ``begin(i)``, ``end(i)`` built once per
  ``(scale_lens, device)`` on the host (:func:`scale_bounds`): a program reads two scalars, no search,
  and the tables do not depend on the tile sizes, so any tile size can be pinned (see ``_HOPPER_CONFIGS``).
* The L2 norm is fused: the scores of raw q and k tiles are scaled in fp32 per row (``c_h / |q_i|``) and
  per column (``1 / |k_j|``), the norms taken from the registers the tiles are loaded into. No separate
  normalisation pass, no normalised copy in memory (the KV step writes the normalised new keys, which the
  cache must hold).

Backward (gradients of ``q, k, v`` and ``scale_mul``; ``dz = p * (dp - delta)``, ``delta_i = dO_i . O_i``):
the forward saves every row's score max and log2 softmax denominator (kept apart, see the forward kernel)
and, with NORM, its score factor; the backward rebuilds ``p`` from them tile by tile.
``_bwd_preprocess`` writes ``delta``; ``_bwd_dkdv`` accumulates ``dv_j = sum_i p_ij dO_i`` and
``dkt_j = softmax_scale * sum_i dz_ij qt_i`` over the query tiles that see key tile ``j``; ``_bwd_dq``
accumulates ``dqt_i = softmax_scale * sum_j dz_ij kt_j``. With ``NORM`` the chain rule through the
normalisation is applied in registers at the end (``dq = (c dqt - q^ (q^ . c dqt)) / |q|`` with
``q^ = q/|q|``) and ``dL/dscale_mul_h = c_h [scale_mul_h <= ln 100] sum_i q^_i . dqt_i`` is written per
row and summed on the host. Both gradient kernels are deterministic (no atomics).

Launchers here are plain functions on tensors: no autograd, no custom ops (``fastvar.ops.attention``).
"""
import functools

import numpy as np
import torch
import triton
import triton.language as tl

from fastvar.reference.attention import MAX_SCALE_MUL
from fastvar.triton_kernels._device import on_tensor_device

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
NORM_EPS = tl.constexpr(1e-12)
# Integer arguments Triton must not specialise on (by default a 1 becomes a constant and a multiple of 16 gets
# a divisibility hint, each a separate compiled kernel). The sequence length L (680, 2240, 10521 for VAR's
# schedules) only bounds loops and masks: a hint on it buys nothing but a second compile per kernel. In the KV
# step, ``cache_len`` (0, 1, 5, 14, ...) and ``l`` (1, 4, 9, ...) change every scale: specialising them
# compiled 3 variants per query tile mid-sample. The head count H only splits the program id into (batch, head):
# a hint on it (H = 16 is a multiple of 16, 30 and 36 are not) compiled d30's and d36's kernels again. Strides
# stay specialised (a unit stride or 16-aligned rows give vector loads).
_SIZE_ARGS = ["L", "H"]
_KV_STEP_ARGS = ["cache_len", "l", "H"]    # F.normalize's eps
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _inv_norm(x, AXIS: tl.constexpr):
    """``1 / max(|x|, eps)`` along ``AXIS`` in fp32, and 1.0 where ``|x| >= eps`` (the norm has a
    gradient there, as torch's ``clamp_min``), else 0.0."""
    xf = x.to(tl.float32)
    nrm = tl.sqrt(tl.sum(xf * xf, AXIS))
    return 1.0 / tl.maximum(nrm, NORM_EPS), tl.where(nrm >= NORM_EPS, 1.0, 0.0)


@triton.jit
def _tile(base, rows, offs_d, stride_l, stride_d):
    """Pointers to the ``(len(rows), D)`` tile ``base[rows, :]`` of a strided ``(L, D)`` slice.

    ``rows * stride_l`` in int64: in int32 it wraps once it passes 2^31 elements, e.g. for a sequence-outer
    view (``stride_l = B*H*D``) at 1024 px (L = 10521) from ``B*H*D >= 204k`` (B = 200 at H = 16, D = 64)."""
    return base + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :] * stride_d


@triton.jit
def _tile_t(base, rows, offs_d, stride_l, stride_d):
    """Pointers to the transposed tile ``base[rows, :]^T`` ``(D, len(rows))``; int64 offsets as :func:`_tile`."""
    return base + rows.to(tl.int64)[None, :] * stride_l + offs_d[:, None] * stride_d


@triton.jit
def _round_to_tf32(x):
    """``x`` rounded to TF32's 10-bit mantissa, to nearest (ties away from zero): Triton hands raw float32 to the
    tensor cores, which drop the low 13 bits, a rounding toward zero (finite x only)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_scaled_grad(acc, g, x, NORM: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + g @ x^T`` for a gradient tile ``g`` (fp32) and an input tile ``x`` given transposed (``(D, n)``).

    With NORM in fp16, ``g`` holds ``dz * row_scale`` (dK) or ``dz / |k|`` (dQ), which grow as ``1 / |q|`` and
    ``1 / |k|``: cast to fp16 they overflow to inf once that factor passes ~6.5e4 / |dz| (|q| ~ 1e-5 at
    VAR's c = 100). Then the product runs in float32 with TF32 operands (fp16's 10-bit mantissa, float32's
    range), ``g`` rounded to nearest as the fp16 cast would. bf16 has float32's range: its cast stays."""
    if NORM and x.dtype == tl.float16:
        return tl.dot(_round_to_tf32(g), tl.trans(x.to(tl.float32)), acc, input_precision="tf32")
    else:
        return tl.dot(g.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PREC)


@triton.jit
def _head_factor(SCALE_MUL, h, max_log):
    """``c_h = exp(min(scale_mul_h, ln 100))`` and ``dc/dscale_mul_h`` (0 above the clamp)."""
    sm = tl.load(SCALE_MUL + h).to(tl.float32)
    c = tl.exp(tl.minimum(sm, max_log))
    return c, tl.where(sm <= max_log, c, 0.0)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, row_scale, row_end, K, V, stride_kl, stride_kd, stride_vl, stride_vd,
                  lo, hi, offs_n, offs_d,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, NORM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update of one query tile over the key tiles ``[lo, hi)`` of ``K, V`` (pointers
    to key 0 of one batch and head).

    ``MASK``: 0 = every key visible to every row (no mask arithmetic, no load masks: ``hi`` is a
    multiple of ``BLOCK_N`` inside the sequence); 1 = keys ``< hi`` visible (ragged last tile);
    2 = key ``n`` visible to row ``m`` iff ``n < row_end[m]`` (block-causal boundary, ``row_end <= hi``).
    ``q`` (BLOCK_M, D) raw; scores are ``(q @ k^T) * row_scale[:, None]`` in log2 units, with NORM times
    ``1 / |k_j|`` per column: the key tile goes to the tensor cores as loaded (a normalised copy would be
    written back to shared memory every iteration) and the scores stay unrounded fp32.
    """
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kt_ptrs = _tile_t(K, cols, offs_d, stride_kl, stride_kd)
        v_ptrs = _tile(V, cols, offs_d, stride_vl, stride_vd)
        if MASK == 0:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < hi, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < hi, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * row_scale[:, None]
        if NORM:
            rk, _ = _inv_norm(kt, 0)
            s = s * rk[None, :]
        if MASK == 1:
            s = tl.where(cols[None, :] < hi, s, float("-inf"))
        if MASK == 2:
            s = tl.where(cols[None, :] < row_end[:, None], s, float("-inf"))
        # Key 0 is visible to every row and the first tile visited holds it, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(Q, stride_qb, stride_ql, stride_qh, stride_qd, L, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's ``(b, h)`` and query tile, for a grid ``(cdiv(L, BLOCK_M), B*H)`` that launches the
    heaviest query tiles (the finest scale sees the most keys) first. Returns ``bh, b, h``, the tile's first
    row ``m0``, its rows ``offs_m``, ``offs_d``, ``row_ok`` and the ``[BLOCK_M, HEAD_DIM]`` q tile."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    m0 = tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd),
                mask=row_ok[:, None], other=0.0)
    return bh, b, h, m0, offs_m, offs_d, row_ok, q


@triton.jit
def _query_tile_keys(BEGIN_END, m0, offs_m, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys of the query tile at row ``m0``: ``[0, n_full)`` (whole key tiles) are seen by every row,
    ``[n_full, kv_end)`` by some rows; ``row_end`` (BLOCK_M,) is every row's end (1 past L: key 0 only)."""
    ENDS = BEGIN_END + L
    full_end = tl.load(ENDS + m0)                              # end(scale of the first row)
    kv_end = tl.load(ENDS + tl.minimum(m0 + BLOCK_M, L) - 1)   # end(scale of the last row)
    row_end = tl.load(ENDS + offs_m, mask=offs_m < L, other=1)
    return (full_end // BLOCK_N) * BLOCK_N, kv_end, row_end


@triton.jit
def _query_row_scale(q, SCALE_MUL, h, qk_scale, max_log, BLOCK_M: tl.constexpr, NORM: tl.constexpr):
    """Per-row factor of the log2-unit scores: ``softmax_scale * log2(e)``, times ``c_h / |q_i|`` with NORM."""
    if NORM:
        rq, _ = _inv_norm(q, 1)
        c, _ = _head_factor(SCALE_MUL, h, max_log)
        return rq * (c * qk_scale)
    else:
        return tl.full([BLOCK_M], qk_scale, tl.float32)


# ------------------------------------------------------------------------------------------ forward
@triton.jit(do_not_specialize=_SIZE_ARGS)
def _block_causal_attn_fwd_kernel(
        Q, K, V, O, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, BEGIN_END, SCALE_MUL, qk_scale, max_log, L, H,
        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol, stride_oh, stride_od,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
        DOT_PREC: tl.constexpr):
    """Block-causal attention forward.

    Grid ``(cdiv(L, BLOCK_M), B*H)``. ``O`` (B, L, H, D) = softmax(z) v per row. With ``s = z log2(e)``,
    ``ROW_MAX`` (B, H, L) fp32 = ``max_j s_ij`` and ``ROW_LOG2SUM`` = ``log2 sum_j 2^(s_ij - max)``: the
    backward rebuilds ``p = 2^((s - max) - log2sum)``. Kept apart rather than summed into one log-sum-exp:
    at VAR's clamp ``|s|`` reaches 144, where one fp32 rounding of ``max + log2sum`` (8e-6) makes the
    rebuilt ``p`` sum to ``1 +- 5e-6``, which a saturated head's small gradients amplify past fp32 tolerance
    (dq error 1.7e-4 with the sum vs 2e-6 apart, CPU interpreter, c = 100). With NORM, ``ROW_SCALE``
    (B, H, L) fp32 = every row's score factor ``qk_scale * c_h / |q_i|``: the backward loads the forward's
    exact factor instead of re-normalising every query tile it visits (that cost registers: dQ with 128x32
    tiles at D=64 spilled 104 B for sm_90, none with the stored factor).
    ``BEGIN_END`` (2, L) int32: begin and end of every token's scale. ``qk_scale = softmax_scale * log2(e)``.
    """
    bh, b, h, m0, offs_m, offs_d, row_ok, q = _query_tile(Q, stride_qb, stride_ql, stride_qh, stride_qd, L, H,
                                                          HEAD_DIM, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_scale = _query_row_scale(q, SCALE_MUL, h, qk_scale, max_log, BLOCK_M, NORM)
    n_full, kv_end, row_end = _query_tile_keys(BEGIN_END, m0, offs_m, L, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    K = K + b * stride_kb + h * stride_kh
    V = V + b * stride_vb + h * stride_vh
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, row_end, K, V, stride_kl, stride_kd,
                                  stride_vl, stride_vd, 0, n_full, offs_n, offs_d, BLOCK_N, 0, NORM, DOT_PREC)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, row_end, K, V, stride_kl, stride_kd,
                                  stride_vl, stride_vd, n_full, kv_end, offs_n, offs_d, BLOCK_N, 2, NORM, DOT_PREC)
    out = acc / l_i[:, None]
    tl.store(_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, stride_od),
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(ROW_MAX + bh * L + offs_m, m_i, mask=row_ok)
    tl.store(ROW_LOG2SUM + bh * L + offs_m, tl.math.log2(l_i), mask=row_ok)
    if NORM:
        tl.store(ROW_SCALE + bh * L + offs_m, row_scale, mask=row_ok)


# ------------------------------------------------------------------------------------------ backward
@triton.jit(do_not_specialize=_SIZE_ARGS)
def _block_causal_attn_bwd_preprocess_kernel(
        O, DO, DELTA, L, H, stride_ob, stride_ol, stride_oh, stride_od,
        stride_dob, stride_dol, stride_doh, stride_dod, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``DELTA`` (B, H, L) fp32 = ``sum_d O * dO``. Grid ``(cdiv(L, BLOCK_M), B*H)``."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < L
    o = tl.load(_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, stride_od),
                mask=row_ok, other=0.0)
    do = tl.load(_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dol, stride_dod),
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _dkdv_tiles(dk, dv, k, rk, v, cols, Q, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, ENDS, qk_scale, L,
                stride_ql, stride_qd, stride_dol, stride_dod, lo, hi, offs_m, offs_d,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, NORM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one key tile's ``dv`` and ``sum_i dz_ij q_i`` (times the row factor with NORM) over the
    query tiles ``[lo, hi)``.

    Works on transposed scores ``(BLOCK_N, BLOCK_M)``. ``MASKED``: rows ``>= L`` and keys a row does not
    see (keys ``>= L`` included) get ``p = 0``; otherwise all rows and keys are in the sequence and every
    row sees every key of the tile.
    """
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        qt_ptrs = _tile_t(Q, rows, offs_d, stride_ql, stride_qd)
        do_ptrs = _tile(DO, rows, offs_d, stride_dol, stride_dod)
        if MASKED:
            row_ok = rows < L
            qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            row_max = tl.load(ROW_MAX + rows, mask=row_ok, other=0.0)
            log2sum = tl.load(ROW_LOG2SUM + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            row_end = tl.load(ENDS + rows, mask=row_ok, other=0)   # rows past L see nothing
            if NORM:
                row_scale = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            do = tl.load(do_ptrs)
            row_max = tl.load(ROW_MAX + rows)
            log2sum = tl.load(ROW_LOG2SUM + rows)
            delta = tl.load(DELTA + rows)
            if NORM:
                row_scale = tl.load(ROW_SCALE + rows)
        if not NORM:
            row_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * row_scale[None, :]
        if NORM:
            st = st * rk[:, None]               # as the forward's scores, multiplied in the same order
        if MASKED:
            st = tl.where(cols[:, None] < row_end[None, :], st, float("-inf"))
        pt = tl.math.exp2((st - row_max[None, :]) - log2sum[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if NORM:
            # dz/dkt_j = softmax_scale * qt_i = softmax_scale c q_i / |q_i| = ln(2) row_scale_i q_i
            dst = dst * row_scale[None, :]
        dk = _dot_scaled_grad(dk, dst, qt, NORM, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _block_causal_attn_bwd_dkdv_kernel(
        Q, K, V, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, DK, DV, BEGIN_END, qk_scale, softmax_scale, L, H,
        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
        stride_dkb, stride_dkl, stride_dkh, stride_dkd, stride_dvb, stride_dvl, stride_dvh, stride_dvd,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
        DOT_PREC: tl.constexpr):
    """dK, dV of block-causal attention. Grid ``(cdiv(L, BLOCK_N), B*H)``: one program per key tile
    (``BLOCK_N`` keys) iterates the query tiles (``BLOCK_M`` rows) that see it. ``DK, DV`` (B, L, H, D)."""
    tile = tl.program_id(0)            # key tile 0 is seen by every query: heaviest, launched first
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    n0 = tile * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols[:, None] < L
    k = tl.load(_tile(K + b * stride_kb + h * stride_kh, cols, offs_d, stride_kl, stride_kd),
                mask=col_ok, other=0.0)
    v = tl.load(_tile(V + b * stride_vb + h * stride_vh, cols, offs_d, stride_vl, stride_vd),
                mask=col_ok, other=0.0)
    if NORM:
        rk, k_keep = _inv_norm(k, 1)
    else:
        rk = cols       # unused
    # Query rows [lo_row, L) see some key of the tile, rows [full_row, L) see all of them.
    lo_row = tl.load(BEGIN_END + n0)
    full_row = tl.load(BEGIN_END + tl.minimum(n0 + BLOCK_N, L) - 1)
    m_lo = (lo_row // BLOCK_M) * BLOCK_M
    m_even = (L // BLOCK_M) * BLOCK_M                       # tiles below lie inside the sequence
    m_full = tl.minimum(tl.cdiv(full_row, BLOCK_M) * BLOCK_M, m_even)
    if n0 + BLOCK_N > L:
        m_full = m_even         # a ragged key tile: its keys past L need the mask everywhere
    m_hi = tl.cdiv(L, BLOCK_M) * BLOCK_M

    Q = Q + b * stride_qb + h * stride_qh
    DO = DO + b * stride_dob + h * stride_doh
    ROW_MAX = ROW_MAX + bh * L
    ROW_LOG2SUM = ROW_LOG2SUM + bh * L
    ROW_SCALE = ROW_SCALE + bh * L
    DELTA = DELTA + bh * L
    ENDS = BEGIN_END + L
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, rk, v, cols, Q, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, ENDS, qk_scale,
                         L, stride_ql, stride_qd, stride_dol, stride_dod, m_lo, m_full, offs_m, offs_d,
                         BLOCK_M, True, NORM, DOT_PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, rk, v, cols, Q, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, ENDS, qk_scale,
                         L, stride_ql, stride_qd, stride_dol, stride_dod, m_full, m_even, offs_m, offs_d,
                         BLOCK_M, False, NORM, DOT_PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, rk, v, cols, Q, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, ENDS, qk_scale,
                         L, stride_ql, stride_qd, stride_dol, stride_dod, m_even, m_hi, offs_m, offs_d,
                         BLOCK_M, True, NORM, DOT_PREC)
    tl.store(_tile(DV + b * stride_dvb + h * stride_dvh, cols, offs_d, stride_dvl, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=col_ok)
    dk = dk * (LN2 if NORM else softmax_scale)      # = dL/dkt
    if NORM:
        # kt = k / |k|: dk = (dkt - k^ (k^ . dkt)) / |k|, the projection only where |k| >= eps.
        kn = k.to(tl.float32) * rk[:, None]
        dk = rk[:, None] * (dk - kn * (tl.sum(kn * dk, 1) * k_keep)[:, None])
    tl.store(_tile(DK + b * stride_dkb + h * stride_dkh, cols, offs_d, stride_dkl, stride_dkd),
             dk.to(DK.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_tiles(dq, q, do, row_max, log2sum, delta, row_scale, row_end, K, V, stride_kl, stride_kd, stride_vl,
              stride_vd, lo, hi, offs_n, offs_d, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, NORM: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Accumulate ``sum_j dz_ij kt_j`` of one query tile over the key tiles ``[lo, hi)`` (masks as in
    :func:`_attend_tiles` with ``MASK`` 0 / 2)."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kt_ptrs = _tile_t(K, cols, offs_d, stride_kl, stride_kd)
        vt_ptrs = _tile_t(V, cols, offs_d, stride_vl, stride_vd)
        if MASKED:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < hi, other=0.0)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < hi, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * row_scale[:, None]
        if NORM:
            rk, _ = _inv_norm(kt, 0)
            s = s * rk[None, :]
        if MASKED:
            s = tl.where(cols[None, :] < row_end[:, None], s, float("-inf"))
        p = tl.math.exp2((s - row_max[:, None]) - log2sum[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if NORM:
            ds = ds * rk[None, :]               # dz_ij kt_j = (dz_ij / |k_j|) k_j
        dq = _dot_scaled_grad(dq, ds, kt, NORM, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _block_causal_attn_bwd_dq_kernel(
        Q, K, V, DO, ROW_MAX, ROW_LOG2SUM, ROW_SCALE, DELTA, DQ, DSM_ROWS, BEGIN_END, SCALE_MUL, qk_scale,
        softmax_scale, max_log, L, H,
        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
        stride_dqb, stride_dql, stride_dqh, stride_dqd,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
        DOT_PREC: tl.constexpr):
    """dQ of block-causal attention (and, with NORM, ``DSM_ROWS`` (B, H, L) fp32: every row's share of
    ``dL/dscale_mul_h``). Grid ``(cdiv(L, BLOCK_M), B*H)``, key tiles as in the forward."""
    bh, b, h, m0, offs_m, offs_d, row_ok, q = _query_tile(Q, stride_qb, stride_ql, stride_qh, stride_qd, L, H,
                                                          HEAD_DIM, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    do = tl.load(_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dol, stride_dod),
                 mask=row_ok[:, None], other=0.0)
    row_max = tl.load(ROW_MAX + bh * L + offs_m, mask=row_ok, other=0.0)
    log2sum = tl.load(ROW_LOG2SUM + bh * L + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    if NORM:
        row_scale = tl.load(ROW_SCALE + bh * L + offs_m, mask=row_ok, other=0.0)
    else:
        row_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
    n_full, kv_end, row_end = _query_tile_keys(BEGIN_END, m0, offs_m, L, BLOCK_M, BLOCK_N)

    K = K + b * stride_kb + h * stride_kh
    V = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, row_max, log2sum, delta, row_scale, row_end, K, V, stride_kl, stride_kd,
                   stride_vl, stride_vd, 0, n_full, offs_n, offs_d, BLOCK_N, False, NORM, DOT_PREC)
    dq = _dq_tiles(dq, q, do, row_max, log2sum, delta, row_scale, row_end, K, V, stride_kl, stride_kd,
                   stride_vl, stride_vd, n_full, kv_end, offs_n, offs_d, BLOCK_N, True, NORM, DOT_PREC)
    dq = dq * softmax_scale                     # = dL/dqt
    if NORM:
        # qt = c q / |q|: dL/dc = sum_i q^_i . dqt_i; dq = c (dqt - q^ (q^ . dqt)) / |q|.
        rq, q_keep = _inv_norm(q, 1)
        c, dc = _head_factor(SCALE_MUL, h, max_log)
        qn = q.to(tl.float32) * rq[:, None]
        t = tl.sum(qn * dq, 1)
        tl.store(DSM_ROWS + bh * L + offs_m, t * dc, mask=row_ok)
        dq = (rq * c)[:, None] * (dq - qn * (t * q_keep)[:, None])
    tl.store(_tile(DQ + b * stride_dqb + h * stride_dqh, offs_m, offs_d, stride_dql, stride_dqd),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------ KV-cached step
@triton.jit(do_not_specialize=_KV_STEP_ARGS)
def _kv_cached_attn_fwd_kernel(
        Q, K, V, KC, VC, O, SCALE_MUL, cache_len, qk_scale, max_log, l, H,
        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd, stride_kcb, stride_kcl, stride_kch, stride_kcd,
        stride_vcb, stride_vcl, stride_vch, stride_vcd, stride_ob, stride_ol, stride_oh, stride_od,
        ROPE_T, stride_rc, stride_rl, stride_rd,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
        DOT_PREC: tl.constexpr, ROPE: tl.constexpr = False):
    """One sampling step: ``KC[:, cache_len + r] = kt_r``, ``VC[:, cache_len + r] = v_r`` for the ``l`` new
    rows, and ``O`` (B, l, H, D) = attention of the new queries over the ``cache_len + l`` cached keys.

    Grid ``(cdiv(l, BLOCK_M), B*H)``. Race-free by construction: no program reads a cache row that this
    launch writes. The prefix ``[0, cache_len)`` is read from the cache (written by earlier launches,
    ordered by the stream); the new keys and values are read from ``K, V`` (their norms taken in
    registers), never from the rows being written. Program ``t`` writes new rows
    ``[t*BLOCK_M, (t+1)*BLOCK_M)`` of its (batch, head), so every row is written exactly once and the
    append is spread over all programs. Reading the new rows back from the cache instead would need a
    grid-wide barrier (or one writer program per head that the others wait for); recomputing the new
    keys' norms per query tile costs ``l*D`` flops next to the ``BLOCK_M*(cache_len+l)*D`` of its dots.

    ``ROPE`` (Infinity's 2D RoPE; ``ROPE_T`` the ``(2, l, D/2)`` cos/sin rows of the new tokens): the new keys were
    rotated, normalised and appended by :func:`_kv_append_rope_kernel` (launched just before, on the same stream),
    so this kernel rotates the query tile in its prologue (fp32, rounded once to the input dtype) and attends over
    the cache alone, ``[0, cache_len + l)``: rotating every new key tile again in every query program would
    triple the loads of the new keys (the pair partner and the cos/sin rows), an append launch reads them once.
    """
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < l
    K = K + b * stride_kb + h * stride_kh
    V = V + b * stride_vb + h * stride_vh
    KC = KC + b * stride_kcb + h * stride_kch
    VC = VC + b * stride_vcb + h * stride_vch

    # 1. this program's share of the cache append (with ROPE: done by the append kernel)
    if not ROPE:
        k_new = tl.load(_tile(K, offs_m, offs_d, stride_kl, stride_kd), mask=row_ok, other=0.0)
        if NORM:
            rk, _ = _inv_norm(k_new, 1)
            k_new = (k_new.to(tl.float32) * rk[:, None]).to(k_new.dtype)
        dst = cache_len + offs_m
        tl.store(_tile(KC, dst, offs_d, stride_kcl, stride_kcd), k_new.to(KC.dtype.element_ty),
                 mask=row_ok)
        v_new = tl.load(_tile(V, offs_m, offs_d, stride_vl, stride_vd), mask=row_ok, other=0.0)
        tl.store(_tile(VC, dst, offs_d, stride_vcl, stride_vcd), v_new.to(VC.dtype.element_ty),
                 mask=row_ok)

    # 2. attention over the cached prefix, then over the new keys (from the inputs)
    Qh = Q + b * stride_qb + h * stride_qh
    q = tl.load(_tile(Qh, offs_m, offs_d, stride_ql, stride_qd), mask=row_ok, other=0.0)
    if ROPE:
        q = _rope_rotate(q, Qh, offs_m, row_ok, offs_d, stride_ql, stride_qd, ROPE_T, stride_rc, stride_rl,
                         stride_rd).to(q.dtype)
    row_scale = _query_row_scale(q, SCALE_MUL, h, qk_scale, max_log, BLOCK_M, NORM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if ROPE:        # every key (rotated, normalised) is in the cache
        end = cache_len + l
        e_full = (end // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, KC, VC, stride_kcl, stride_kcd,
                                      stride_vcl, stride_vcd, 0, e_full, offs_n, offs_d, BLOCK_N, 0, False, DOT_PREC)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, KC, VC, stride_kcl, stride_kcd,
                                      stride_vcl, stride_vcd, e_full, end, offs_n, offs_d, BLOCK_N, 1, False,
                                      DOT_PREC)
    else:
        c_full = (cache_len // BLOCK_N) * BLOCK_N
        n_full = (l // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, KC, VC, stride_kcl, stride_kcd,
                                      stride_vcl, stride_vcd, 0, c_full, offs_n, offs_d, BLOCK_N, 0, False, DOT_PREC)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, KC, VC, stride_kcl, stride_kcd,
                                      stride_vcl, stride_vcd, c_full, cache_len, offs_n, offs_d, BLOCK_N, 1, False,
                                      DOT_PREC)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, K, V, stride_kl, stride_kd,
                                      stride_vl, stride_vd, 0, n_full, offs_n, offs_d, BLOCK_N, 0, NORM, DOT_PREC)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, row_scale, offs_m, K, V, stride_kl, stride_kd,
                                      stride_vl, stride_vd, n_full, l, offs_n, offs_d, BLOCK_N, 1, NORM, DOT_PREC)
    out = acc / l_i[:, None]
    tl.store(_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, stride_od),
             out.to(O.dtype.element_ty), mask=row_ok)


@triton.jit
def _rope_rotate(x, base, rows, row_ok, offs_d, stride_l, stride_d, ROPE_T, stride_rc, stride_rl, stride_rd):
    """The ``(BLOCK, D)`` tile ``x`` (rows ``rows`` of ``base``) rotated pairwise, in fp32:
    ``out_d = cos_p x_d + s_d sin_p x_{d^1}`` with ``p = d // 2``, ``s = -1`` for even ``d`` and +1 for odd, the
    angles of row ``r`` in ``ROPE_T[0 / 1, r, p]``. The pair partner is loaded again (``d ^ 1``, from cache)
    rather than shuffled across registers."""
    partner = tl.load(_tile(base, rows, offs_d ^ 1, stride_l, stride_d), mask=row_ok, other=0.0).to(tl.float32)
    angle = ROPE_T + rows[:, None] * stride_rl + (offs_d // 2)[None, :] * stride_rd
    cos = tl.load(angle, mask=row_ok, other=1.0)
    sin = tl.load(angle + stride_rc, mask=row_ok, other=0.0)
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    return x.to(tl.float32) * cos + sign[None, :] * (partner * sin)


@triton.jit(do_not_specialize=_KV_STEP_ARGS)
def _kv_append_rope_kernel(
        K, V, KC, VC, ROPE_T, cache_len, l, H,
        stride_kb, stride_kl, stride_kh, stride_kd, stride_vb, stride_vl, stride_vh, stride_vd,
        stride_kcb, stride_kcl, stride_kch, stride_kcd, stride_vcb, stride_vcl, stride_vch, stride_vcd,
        stride_rc, stride_rl, stride_rd,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NORM: tl.constexpr):
    """The cache append of a RoPE step: ``KC[:, cache_len + r] = normalize(rot(k_r))`` (``NORM``; else ``rot(k_r)``),
    ``VC[:, cache_len + r] = v_r`` for the ``l`` new rows, rotated and normalised in fp32 and rounded once to the
    cache's dtype (a rotation keeps the norm, so this is the official normalise-then-rotate up to rounding).
    Grid ``(cdiv(l, BLOCK_M), B*H)``."""
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < l
    K = K + b * stride_kb + h * stride_kh
    k = tl.load(_tile(K, offs_m, offs_d, stride_kl, stride_kd), mask=row_ok, other=0.0)
    k = _rope_rotate(k, K, offs_m, row_ok, offs_d, stride_kl, stride_kd, ROPE_T, stride_rc, stride_rl, stride_rd)
    if NORM:
        rk, _ = _inv_norm(k, 1)
        k = k * rk[:, None]
    dst = cache_len + offs_m
    tl.store(_tile(KC + b * stride_kcb + h * stride_kch, dst, offs_d, stride_kcl, stride_kcd),
             k.to(KC.dtype.element_ty), mask=row_ok)
    v = tl.load(_tile(V + b * stride_vb + h * stride_vh, offs_m, offs_d, stride_vl, stride_vd), mask=row_ok, other=0.0)
    tl.store(_tile(VC + b * stride_vcb + h * stride_vch, dst, offs_d, stride_vcl, stride_vcd),
             v.to(VC.dtype.element_ty), mask=row_ok)


# ------------------------------------------------------------------------------------------ configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, dtype class, head dim). The FIRST entry is the tile
# every launch on a GPU uses: pinned, so the choice is deterministic (the same gradient bits in every
# process) and safe inside CUDA-graph capture (no benchmark runs on first use of a new L). The other entries
# are candidates for offline tuning (``python tests/sm90_compile.py --all`` compiles them,
# ``bench/bench_attention.py --tiles`` times them). Chosen without a GPU, from ptxas's reports for sm_90
# (tests/sm90_compile.py: q/k/v strided as VAR's qkv view, NORM on and off, on Triton 3.6 = the GPU image's,
# and 3.9): registers per thread "3.6/3.9" below, no spill unless said. fp32 uses true fp32 products (no
# tensor cores) and small tiles. Timings on H100/H200 are owed.
_HOPPER_CONFIGS = {
    # forward: query tile x key tile (iterated). half: 255/233 registers (NORM, D=64), 216/203 (D=128)
    ("fwd", "half", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    ("fwd", "half", 128): [(128, 64, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2)],    # the last spills 8 B
    # fp32 D=64: 16 x 32, 8 warps: 80/68 registers; 32 x 32 spilled 8 B on 3.9 (255 registers)
    ("fwd", "fp32", 64): [(16, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("fwd", "fp32", 128): [(16, 32, 8, 2), (32, 16, 8, 2)],                        # 78/78
    # dK/dV: query tile (iterated) x key tile. D=64: 228/236 registers (fp16, NORM); with 4 warps and 128-key
    # tiles it spilled 456 B, with 8 none.
    ("dkdv", "half", 64): [(32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3)],     # the last spills 96 B
    # D=128: bf16 236/245; fp16 with NORM (its float32 TF32 products, see _dot_scaled_grad) 255/255 and 8 B of
    # spill on 3.9 only (documented in tests/test_sm90_compile.py); every other candidate spills 48-208 B
    ("dkdv", "half", 128): [(32, 64, 8, 3), (16, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 2)],
    # fp32 D=64: 16 x 32, 8 warps: 87/88; 32 x 32 spilled 8 B on 3.6 (255 registers)
    ("dkdv", "fp32", 64): [(16, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    # fp32 D=128: 16 x 16: 102/104; 16 x 32 spilled 8 B on 3.6, 16 x 32 with 4 warps 472-504 B
    ("dkdv", "fp32", 128): [(16, 16, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2)],
    # dQ: query tile x key tile (iterated). half NORM: 201/215 (D=64), 226/250 (D=128)
    ("dq", "half", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("dq", "half", 128): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    ("dq", "fp32", 64): [(32, 32, 8, 2)],                                          # 88/84
    ("dq", "fp32", 128): [(16, 32, 8, 2)],                                         # 90/86
}


def _interpret_config(keys: int):
    """The interpreter's tiles for ``keys`` keys. It runs one program at a time, each op one NumPy call on the
    whole tile: 16 x 16 tiles keep the masked, full and ragged paths all exercised on the small shapes of the CPU
    tests; above 256 keys (the golden models: L = 680) 64 x 64 tiles still take all three and run 8x faster (the
    patched d2 model's golden check on the kernels: 320 s -> 67 s on 2 CPU cores)."""
    return (16, 16, 4, 1) if keys <= 256 else (64, 64, 4, 1)


# rows per program of the backward's delta pass on a GPU (64 x D loads of O and dO; no dot)
_GPU_PREPROCESS_M = 64


def _gpu_tiles(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` uses the GPU's tiles (a CUDA tensor) or the interpreter's small ones.
    tests/sm90_compile.py replaces this function to record the GPU's launches from meta tensors."""
    return t.device.type == "cuda"


def _configs(kind, D, dtype, device, L):
    """The tile candidates of ``kind`` for head dim ``D``, ``dtype`` and sequence length ``L`` on ``device`` (the
    first is pinned)."""
    if torch.device(device).type != "cuda":
        return [_interpret_config(L)]
    return _HOPPER_CONFIGS[(kind, "fp32" if dtype == torch.float32 else "half", 128 if D > 64 else 64)]


def _kv_config(l, keys, D, dtype, device):
    """The KV step is launched inside CUDA graphs by the sampler: fixed heuristics, no autotuning
    (an autotune benchmark cannot run while a graph is being captured). The query tile follows the
    scale's token count (1 .. 1024 for VAR); in half precision these compile for sm_90 without spills
    (tests/sm90_compile.py; 4 warps spilled 152 B at 128 x 64, D=64, and 8 B at 16 x 64, D=128), with the RoPE
    prologue too (Infinity, D=128: 206 registers at 128 x 64); fp32 at D=128 spills 110-350 B (360 B with RoPE)."""
    if torch.device(device).type != "cuda":
        return _interpret_config(keys)
    if dtype == torch.float32:
        return (16, 32, 8 if D > 64 else 4, 2) if l <= 16 else (32, 32, 8, 2)
    block_m = 16 if l <= 16 else 32 if l <= 32 else 64 if l <= 64 else 128
    return block_m, 64, 8 if block_m == 128 or D > 64 else 4, 3


def _kv_candidates(l, D, dtype):
    """The KV step's GPU tile for ``l`` new tokens (:func:`_kv_config`, pinned) first, then the alternatives that
    offline tuning times beside it (``bench/bench_attention.py --tiles``): key tiles of 32 and 128, the other
    warp count, 2 and 4 stages, and half the query tile."""
    pinned = _kv_config(l, l, D, dtype, "cuda")
    bm, bn, warps, stages = pinned
    others = [(bm, 32, warps, stages), (bm, 128, warps, stages), (bm, bn, 4 if warps == 8 else 8, stages),
              (bm, bn, warps, 2), (bm, bn, warps, 4)] + ([(bm // 2, bn, warps, stages)] if bm > 16 else [])
    return [pinned] + [c for c in others if c != pinned]


# rows per program of the RoPE append: an fp32 (32, 128) tile and its pair partner, cos and sin rows are
# 4 x 32 registers per thread at 4 warps (64 rows would double that for a copy that is memory-bound anyway)
_KV_APPEND_ROWS = 32


def _device_of(t: torch.Tensor) -> torch.device:
    """The device whose tiles a launch on ``t`` uses (see :func:`_gpu_tiles`)."""
    return torch.device("cuda") if _gpu_tiles(t) else torch.device("cpu")


def _launch(kernel, kind, q, config, grid, args, constexprs):
    """Launch ``kernel`` for ``q``'s head dim, dtype and device with ``config`` (a tile, or ``{kind: tile}`` for
    the kernels it names), else the pinned (first) tile of its table. ``grid(block_m, block_n)`` gives the launch
    grid; tiles are (BLOCK_M, BLOCK_N, warps, stages).

    No run-time autotuning: a benchmark on the first launch of a new L cannot run inside CUDA-graph capture,
    and its pick (timing noise) would change the gradient bits from one process to the next."""
    if isinstance(config, dict):
        if not set(config) <= {"fwd", "dkdv", "dq"}:
            raise ValueError(f"config: tiles are named by kernel, fwd, dkdv or dq; got {sorted(config)}")
        config = config.get(kind)
    bm, bn, warps, stages = config or _configs(kind, q.shape[-1], q.dtype, _device_of(q), q.shape[1])[0]
    kernel[grid(bm, bn)](*args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


# ------------------------------------------------------------------------------------------ launchers
def _f32(x: float) -> float:
    """A Python float rounded to fp32, the precision the kernel sees it in."""
    return float(np.float32(x))


def _dot_precision(dtype):
    # fp32 inputs: true fp32 products (tf32 would cost ~1e-3 relative error on the scores).
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t):
    return tuple(t.stride())


def _scale_bounds(scale_lens, device) -> torch.Tensor:
    """The table by fills on ``device`` (two per scale): no host-to-device copy, which CUDA-graph capture forbids."""
    table = torch.empty((2, sum(scale_lens)), dtype=torch.int32, device=device)
    start = 0
    for n in scale_lens:
        table[0, start:start + n].fill_(start)
        table[1, start:start + n].fill_(start + n)
        start += n
    return table


@functools.lru_cache(maxsize=64)
def _scale_bounds_cached(scale_lens, device):
    return _scale_bounds(scale_lens, device)


def scale_bounds(scale_lens, device) -> torch.Tensor:
    """``(2, L)`` int32 on ``device``: row 0 the first token of every token's scale, row 1 one past its
    last. Cached per ``(scale_lens, device)``, except while a CUDA graph is being captured: its fills are then
    recorded into the graph (redone at every replay) and the table is not kept, since a cached tensor would
    hold what the graph writes only once it replays. A schedule first seen inside a capture is thus fine."""
    lens, device = tuple(int(n) for n in scale_lens), torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _scale_bounds(lens, device)
    return _scale_bounds_cached(lens, device)


def _scale_mul_arg(scale_mul, like):
    """A (H,) fp32 pointer argument (a dummy when there is no L2 norm)."""
    if scale_mul is None:
        return like.new_empty(1, dtype=torch.float32)
    return scale_mul.detach().reshape(-1).to(torch.float32).contiguous()


@on_tensor_device
def block_causal_attention_fwd(q, k, v, scale_lens, softmax_scale, scale_mul=None, config=None):
    """Forward of block-causal attention.

    Args:
        q, k, v: ``(B, L, H, D)`` CUDA (or CPU under ``TRITON_INTERPRET=1``) tensors of one dtype,
            any strides; ``D`` in :data:`SUPPORTED_HEAD_DIMS`.
        scale_lens: token count of every scale, ``sum == L``.
        softmax_scale: float; with ``scale_mul`` (``H`` values) q and k are L2-normalised and q scaled by
            ``exp(min(scale_mul, ln 100))``.
        config: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (tests, tile tuning).
    Returns:
        ``out`` ``(B, L, H, D)`` contiguous, dtype of q; ``stats`` ``(2, B, H, L)`` fp32 (``(3, B, H, L)``
        with ``scale_mul``): every row's max of the log2-unit scores, ``log2`` of its softmax denominator
        and (with ``scale_mul``) its score factor, for the backward.
    """
    B, L, H, D = q.shape
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((2 if scale_mul is None else 3, B, H, L), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, stats[0], stats[1], stats[-1], scale_bounds(scale_lens, q.device),
            _scale_mul_arg(scale_mul, q), _f32(softmax_scale * LOG2E), _f32(MAX_SCALE_MUL), L, H,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out))
    _launch(_block_causal_attn_fwd_kernel, "fwd", q, config, lambda bm, bn: (triton.cdiv(L, bm), B * H), args,
            dict(HEAD_DIM=D, NORM=scale_mul is not None, DOT_PREC=_dot_precision(q.dtype)))
    return out, stats


@on_tensor_device
def block_causal_attention_bwd(dout, q, k, v, out, stats, scale_lens, softmax_scale, scale_mul=None,
                               config=None):
    """Backward of :func:`block_causal_attention_fwd`.

    Args: as the forward, plus ``dout`` (B, L, H, D) any strides and the forward's ``out`` and ``stats``.
    ``config``: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for both gradient kernels, or
    ``{"dkdv": tile, "dq": tile}`` for the ones it names (tile tuning times each kernel's candidates alone).
    Returns:
        ``dq, dk, dv`` ``(B, L, H, D)`` contiguous in q's dtype; ``dscale_mul`` ``(H,)`` fp32 (None
        without ``scale_mul``).
    """
    B, L, H, D = q.shape
    norm = scale_mul is not None
    bounds = scale_bounds(scale_lens, q.device)
    sm = _scale_mul_arg(scale_mul, q)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty((B, L, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    dsm_rows = torch.empty((B, H, L) if norm else (1,), dtype=torch.float32, device=q.device)
    pre_m = _GPU_PREPROCESS_M if _gpu_tiles(q) else _interpret_config(L)[0]
    _block_causal_attn_bwd_preprocess_kernel[(triton.cdiv(L, pre_m), B * H)](
        out, dout, delta, L, H, *_strides(out), *_strides(dout), HEAD_DIM=D, BLOCK_M=pre_m)
    scales = (_f32(softmax_scale * LOG2E), _f32(softmax_scale))
    constexprs = dict(HEAD_DIM=D, NORM=norm, DOT_PREC=_dot_precision(q.dtype))
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    _launch(_block_causal_attn_bwd_dkdv_kernel, "dkdv", q, config, lambda bm, bn: (triton.cdiv(L, bn), B * H),
            (q, k, v, dout, stats[0], stats[1], stats[-1], delta, dk, dv, bounds, *scales, L, H, *common,
             *_strides(dk), *_strides(dv)), constexprs)
    _launch(_block_causal_attn_bwd_dq_kernel, "dq", q, config, lambda bm, bn: (triton.cdiv(L, bm), B * H),
            (q, k, v, dout, stats[0], stats[1], stats[-1], delta, dq, dsm_rows, bounds, sm, *scales,
             _f32(MAX_SCALE_MUL), L, H, *common, *_strides(dq)), constexprs)
    dsm = dsm_rows.sum(dim=(0, 2)) if norm else None
    return dq, dk, dv, dsm


@on_tensor_device
def kv_cached_attention_fwd(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul=None, config=None,
                            rope=None):
    """One KV-cached sampling step in one launch (two with ``rope``: the append, then the attention).

    Args:
        q, k, v: ``(B, l, H, D)`` any strides; k_cache, v_cache: ``(B, L_max, H, D)`` any strides, not
            overlapping q, k, v. ``k`` (rotated with ``rope``, normalised with ``scale_mul``) and ``v`` are written
            in place at ``[cache_len, cache_len + l)``; nothing else of the caches is written.
        config: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (tests, tile tuning).
        rope: optional ``(2, l, D/2)`` fp32 cos/sin rows of the new tokens (any strides): q and k rotated pairwise.
    Returns:
        ``(B, l, H, D)`` contiguous: every new query attends to all ``cache_len + l`` keys.
    """
    B, l, H, D = q.shape
    out = torch.empty((B, l, H, D), dtype=q.dtype, device=q.device)
    keys = int(cache_len) + l
    bm, bn, warps, stages = config or _kv_config(l, keys, D, q.dtype, _device_of(q))
    norm = scale_mul is not None
    rope_arg = (rope, *_strides(rope)) if rope is not None else (q.new_empty(1, dtype=torch.float32), 0, 0, 0)
    if rope is not None:
        am = _KV_APPEND_ROWS if _gpu_tiles(q) else _interpret_config(keys)[0]
        _kv_append_rope_kernel[(triton.cdiv(l, am), B * H)](
            k, v, k_cache, v_cache, rope, int(cache_len), l, H, *_strides(k), *_strides(v), *_strides(k_cache),
            *_strides(v_cache), *_strides(rope), HEAD_DIM=D, BLOCK_M=am, NORM=norm, num_warps=4)
    _kv_cached_attn_fwd_kernel[(triton.cdiv(l, bm), B * H)](
        q, k, v, k_cache, v_cache, out, _scale_mul_arg(scale_mul, q), int(cache_len),
        _f32(softmax_scale * LOG2E), _f32(MAX_SCALE_MUL), l, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(k_cache), *_strides(v_cache), *_strides(out),
        *rope_arg, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, NORM=norm, DOT_PREC=_dot_precision(q.dtype),
        ROPE=rope is not None, num_warps=warps, num_stages=stages)
    return out
