"""Packed variable-length cross-attention forward (Infinity's image tokens attending to their prompt's text;
also the attentive text pool, one query per prompt), without flash-attn.

Sequence ``s`` is the q rows ``[cu_q[s], cu_q[s+1])`` of ``q`` ``(Nq, H, D)`` attending, with no mask, to the
k/v rows ``[cu_k[s], cu_k[s+1])`` of ``k``, ``v`` ``(Nk, H, D)`` (any strides; Infinity's k and v are the two
halves of one packed ``(Nk, 2, H, D)`` projection)::

    out_i = sum_j softmax_j(softmax_scale * q_i . k_j) v_j

FlashAttention-2 tiling: one program per (query tile, sequence, head); the key tiles of the sequence are
streamed with an online softmax in base 2, the scores never leave registers; fp32 accumulation, the output
written once in q's dtype. ``P`` is rounded to v's dtype before ``P V`` (as flash-attn does: bf16 tensor cores);
fp32 inputs use true fp32 products (``input_precision="ieee"``). Query tiles past a sequence's end return
at once: the grid covers the longest query sequence. Head dims up to 256 (the 8B text pool has 224), padded
to a power of two in registers.

Forward only (Infinity samples and evaluates with it; no training path uses it yet).
"""
import numpy as np
import torch
import triton
import triton.language as tl

from fastvar.triton_kernels._device import on_tensor_device

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _varlen_cross_attn_fwd_kernel(
    Q, K, V, OUT, CU_Q, CU_K, scale_log2,
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    m_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(CU_Q + seq).to(tl.int64)
    q_end = tl.load(CU_Q + seq + 1).to(tl.int64)
    rows = q_start + m_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    if q_start + m_tile * BLOCK_M >= q_end:
        return
    k_start = tl.load(CU_K + seq).to(tl.int64)
    k_end = tl.load(CU_K + seq + 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < q_end
    q = tl.load(Q + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < k_end
        kt = tl.load(K + cols[None, :] * stride_kn + head * stride_kh + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale_log2            # log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + cols[:, None] * stride_vn + head * stride_vh + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + rows[:, None] * stride_on + head * stride_oh + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _config(head_dim: int, max_seqlen_q: int, max_seqlen_k: int, on_gpu: bool, fp32: bool):
    """(BLOCK_D, BLOCK_M, BLOCK_N, num_warps, num_stages). GPU, 16-bit inputs: 128 x 64 tiles, 8 warps at
    D <= 128 (FA2's choice; Infinity's text has <= 512 keys, so BLOCK_N stays small), 64 x 32 at the D = 256 of
    the 8B pool; fp32 inputs (true fp32 products): 64 x 32 and 16 x 32, 4 warps, which ptxas fits without the
    2-3 KB of spills of the 16-bit tiles (sm_90, Triton 3.9). Short query sequences (the pool: one query)
    take 16-row tiles. The interpreter runs programs one after another, vectorised inside: large tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not on_gpu:
        bm = max(16, min(128, triton.next_power_of_2(max_seqlen_q)))
        bn = max(16, min(128, triton.next_power_of_2(max_seqlen_k)))
        return block_d, bm, bn, 4, 1
    small = block_d > 128
    if fp32:
        bm, bn, warps, stages = (16 if small else 64), 32, 8, (1 if small else 2)
    else:
        bm, bn, warps, stages = (64 if small else 128), (32 if small else 64), 8, (1 if small else 2)
    if max_seqlen_q <= 16:
        bm, warps = 16, (8 if fp32 else 4)
    elif max_seqlen_q <= 64:
        bm = min(bm, 64)
    return block_d, bm, bn, warps, stages


@on_tensor_device
def varlen_cross_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               out=None, config=None, interpret=None):
    """Launch over ``q`` ``(Nq, H, D)``, ``k``, ``v`` ``(Nk, H, D)`` (one dtype: fp32, fp16 or bf16; any strides),
    ``cu_seqlens_q/k`` ``(B + 1,)`` int32 on the device. Returns ``out`` ``(Nq, H, D)`` in q's dtype (allocated
    unless given). ``config``: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (tests); ``interpret``
    (default: not a CUDA tensor) picks the interpreter's tile sizes instead of the GPU's."""
    Nq, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty((Nq, H, D), dtype=q.dtype, device=q.device)
    if Nq == 0 or B == 0 or max_seqlen_q == 0:
        return out
    on_gpu = q.device.type == "cuda" if interpret is None else not interpret
    block_d, bm, bn, warps, stages = _config(D, max_seqlen_q, max_seqlen_k, on_gpu, q.dtype.itemsize == 4)
    if config is not None:
        bm, bn, warps, stages = config
    grid = (triton.cdiv(max_seqlen_q, bm), B, H)
    _varlen_cross_attn_fwd_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, float(np.float32(softmax_scale * LOG2E)),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC="ieee" if q.dtype.itemsize == 4 else "tf32", num_warps=warps, num_stages=stages)
    return out

