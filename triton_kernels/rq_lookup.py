"""Codebook lookup of the residual quantizer: fused squared distance + argmin, tiled over the codebook.

``idx[n] = argmin_v d[n, v]`` with ``d[n, v] = (zz[n] + ee[v]) - 2 * (z[n] . e[v])`` in float32, ties to
the lowest index, without ever holding the ``N x V`` distance matrix in memory.

Exactness (what the official ``addmm_`` formula computes, see ``fastvar.reference.quantize.rq_lookup``):

- ``zz = sum(z**2, 1)`` and ``ee = sum(E**2, 1)`` come in from the caller, computed by ``torch.sum`` on the
  same tensors as the eager reference, so they carry the eager bits whatever reduction order torch uses.
- ``zz[n] + ee[v]`` is one float32 addition, as the reference's broadcast add.
- ``z . e`` is accumulated by one FMA per channel in channel order, starting from 0 (``acc = fma(z_k, e_k, acc)``,
  k = 0 .. C-1). That is the association order of a GEMM micro-kernel (MKL ``sgemm``, cuBLAS SIMT ``sgemm``)
  when ``K = C`` fits one K block, so ``d`` is then bit-identical to ``addmm_(z, E^T, alpha=-2, beta=1)``
  (``-2 * acc`` is exact; the GEMM epilogue adds it to ``zz + ee`` with one rounding). On the GPU this is
  ``tl.dot(..., input_precision="ieee")``, which Triton lowers to exactly that FMA chain (no TF32, no
  tensor cores); the interpreter spells the chain out (``LOOP_DOT``).
- The kernel is compiled with ``enable_fp_fusion=False``: only the explicit ``tl.fma`` fuses.
- Ties (equal float32 ``d``) go to the lowest index: inside a tile by a min over the tied column indices,
  across tiles by a strict ``<``, across codebook splits by an ``atomic_min`` on ``(ordered d bits, index)``.

Measured (x86-64 CPU, MKL; V = 4096, C = 32): the distance matrix of this order equals ``addmm_``'s bit for bit
for every N >= 2 tried (N up to 1000, C in 8..64, V up to 16384); MKL's single-row GEMV path (N = 1) and a few
tiny shapes (V <= 3) sum in another order and differ in the last bit of some distances, yet 0 of 3000
single-row lookups changed index; 0 of 32768 random / near-code rows differ from eager; the golden indices
(both files, every scale, through the interpreter) are identical. How rare order-sensitive rows are: the
float32 official argmin equals the float64 exact one on 262144 of 262144 random rows. Against cuBLAS on a
GPU: to be measured (tests/test_rq_lookup.py::test_lookup_gpu_against_eager_cuda, bench/bench_rq_lookup.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvar.triton_kernels._device import on_tensor_device

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@triton.jit
def _dot_chunk(z_ptr, et_ptr, rows, rmask, cols, cmask, k0, C, stride_zn, stride_zc, stride_ec, stride_ev, acc,
               KC: tl.constexpr):
    """``acc + z[rows, k0:k0+KC] @ E^T[k0:k0+KC, cols]`` as one FMA chain (channels past C read as 0)."""
    k = k0 + tl.arange(0, KC)
    kmask = k < C
    a = tl.load(z_ptr + rows[:, None] * stride_zn + k[None, :] * stride_zc, mask=rmask[:, None] & kmask[None, :],
                other=0.0)
    b = tl.load(et_ptr + k[:, None] * stride_ec + cols[None, :] * stride_ev, mask=kmask[:, None] & cmask[None, :],
                other=0.0)
    return tl.dot(a, b, acc, input_precision="ieee")


# N (rows: B*h*w) changes with every scale and batch size; it only bounds the row mask (no hint helps).
@triton.jit(do_not_specialize=["N"])
def _rq_lookup_fwd_kernel(
    z_ptr, et_ptr, zz_ptr, ee_ptr,            # z (N, C); E^T (C, V); zz (N,); ee (V,)
    idx_ptr, key_ptr, codes_ptr, cb_ptr,      # idx (N,) int64; keys (N,) int64; codes (N, C); codebook (V, C)
    N, V,
    stride_zn, stride_zc, stride_ec, stride_ev,
    stride_cbv, stride_cbc, stride_on, stride_oc,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    SPLIT: tl.constexpr, WRITE_CODES: tl.constexpr, LOOP_DOT: tl.constexpr, TILES: tl.constexpr,
    KC: tl.constexpr = 16,
):
    """One program: ``BLOCK_N`` rows of z against codes ``[pid_s, pid_s + 1) * TILES * BLOCK_V``.

    ``SPLIT=False``: writes ``idx`` (and, with ``WRITE_CODES``, ``codes = codebook[idx]``).
    ``SPLIT=True``: ``atomic_min`` of the key ``(ordered_bits(d) << 32) | idx`` into ``key_ptr`` (pre-filled
    with int64 max); the caller decodes ``idx = key & 0xffffffff``.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cc = tl.arange(0, BLOCK_C)
    ccmask = cc < C
    zz = tl.load(zz_ptr + rows, mask=rmask, other=0.0)
    best_d = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int64)
    v_begin = pid_s * (TILES * BLOCK_V)
    for t in range(TILES):          # a constexpr trip count (Triton 3.6's interpreter cannot loop to a tensor)
        cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        if LOOP_DOT:
            # the FMA chain spelled out (interpreter: its tl.dot is numpy's matmul, of another order)
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k in tl.static_range(C):
                zk = tl.load(z_ptr + rows * stride_zn + k * stride_zc, mask=rmask, other=0.0)
                ek = tl.load(et_ptr + k * stride_ec + cols * stride_ev, mask=cmask, other=0.0)
                acc = tl.fma(zk[:, None], ek[None, :], acc)
        else:
            # fp32 "ieee" dot = Triton's FMA lowering: acc = fma(a_k, b_k, acc) for k in order, continuing from
            # the accumulator it is given, so chunks of 16 channels chained through ``acc`` are the same chain
            # (zero-padded channels add exact zeros). Chunks keep the operands of one dot in registers (all 32
            # channels at once spill); an explicit per-channel loop would get a 1-column-per-thread layout.
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k0 in tl.static_range(0, C, KC):
                acc = _dot_chunk(z_ptr, et_ptr, rows, rmask, cols, cmask, k0, C, stride_zn, stride_zc, stride_ec,
                                 stride_ev, acc, KC)
        ee = tl.load(ee_ptr + cols, mask=cmask, other=0.0)
        d = (zz[:, None] + ee[None, :]) - acc * 2.0
        d = tl.where(cmask[None, :], d, float("inf"))
        m = tl.min(d, axis=1)
        tile_i = tl.min(tl.where(d == m[:, None], cols[None, :], V), axis=1)
        better = m < best_d                      # strict: an earlier tile keeps a tie
        best_i = tl.where(better, tile_i, best_i)
        best_d = tl.where(better, m, best_d)
    if SPLIT:
        bits = best_d.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)   # float order as signed int order (d is never NaN)
        key = (ordered.to(tl.int64) << 32) | best_i
        tl.atomic_min(key_ptr + rows, key, mask=rmask)
    else:
        tl.store(idx_ptr + rows, best_i, mask=rmask)
        if WRITE_CODES:
            m2 = rmask[:, None] & ccmask[None, :]
            code = tl.load(cb_ptr + best_i[:, None] * stride_cbv + cc[None, :] * stride_cbc, mask=m2, other=0.0)
            tl.store(codes_ptr + rows[:, None] * stride_on + cc[None, :] * stride_oc, code, mask=m2)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@on_tensor_device
def rq_lookup(
    z: torch.Tensor,
    codebook: torch.Tensor,
    zz: torch.Tensor,
    ee: torch.Tensor,
    codebook_t: Optional[torch.Tensor] = None,
    return_codes: bool = False,
    split: Optional[int] = None,
    block_n: Optional[int] = None,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
    loop_dot: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the lookup. No argument checks here (``fastvar.ops.rq_lookup`` does them).

    Args:
        z: ``(N, C)`` float32, any strides.
        codebook: ``(V, C)`` float32 (read for the returned codes).
        zz: ``(N,)`` float32 ``sum(z**2, 1)``; ee: ``(V,)`` float32 ``sum(codebook**2, 1)``, contiguous.
        codebook_t: ``(C, V)`` contiguous ``codebook.T`` (made here if None; callers may cache it).
        return_codes: also return ``codebook[idx]`` ``(N, C)``.
        split: number of codebook splits (None: enough programs to fill the GPU; 1: no atomics).
        block_n, block_v, num_warps: tile sizes and warps (None: defaults for the device).
        loop_dot: the explicit FMA chain (default in the interpreter) instead of the chunked ``tl.dot``
            (default on the GPU); both are the same chain on a GPU, the interpreter's ``tl.dot`` is numpy's.
    Returns:
        ``(idx (N,) int64, codes (N, C) or None)``.
    """
    N, C = z.shape
    V = codebook.shape[0]
    interp = _interpreting(z)
    if codebook_t is None:
        codebook_t = codebook.t().contiguous()
    # interpreter: big tiles (numpy per tile op). GPU (sm_90, ptxas): 64 x 128 over 8 warps = 32 accumulators and
    # 1024 FMAs per thread per tile, 181 registers, no spill; one dot over all 32 channels, or an explicit
    # per-channel loop, spilled (255 registers + 13 KB of stack). Tuning on the GPU is owed.
    block_n = block_n or (min(128, max(16, triton.next_power_of_2(N))) if interp else 64)
    block_v = block_v or (min(1024, max(16, triton.next_power_of_2(V))) if interp else 128)
    num_warps = num_warps or 8
    n_blocks = triton.cdiv(N, block_n)
    v_blocks = triton.cdiv(V, block_v)
    if split is None:
        split = 1 if interp else min(v_blocks, max(1, triton.cdiv(2 * _sm_count(z.device), n_blocks)))
        if not interp:
            # tiles per split rounded up to a power of two: TILES is a constexpr (a compiled kernel each), and N
            # changes with every scale and batch size; V = 4096 then compiles at most 6 variants, not 9
            split = triton.cdiv(v_blocks, triton.next_power_of_2(triton.cdiv(v_blocks, split)))
    split = max(1, min(int(split), v_blocks))
    v_per_split = triton.cdiv(v_blocks, split) * block_v
    split = triton.cdiv(V, v_per_split)
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    codes = torch.empty(N, C, dtype=codebook.dtype, device=z.device) if return_codes else None
    keys = torch.full((N,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=z.device) if split > 1 else idx
    out_codes = codes if codes is not None else codebook
    _rq_lookup_fwd_kernel[(n_blocks, split)](
        z, codebook_t, zz, ee, idx, keys, out_codes, codebook,
        N, V,
        z.stride(0), z.stride(1), codebook_t.stride(0), codebook_t.stride(1),
        codebook.stride(0), codebook.stride(1), out_codes.stride(0), out_codes.stride(1),
        C=C, BLOCK_C=max(16, triton.next_power_of_2(C)), BLOCK_N=block_n, BLOCK_V=block_v,
        SPLIT=split > 1, WRITE_CODES=bool(return_codes and split == 1),
        LOOP_DOT=interp if loop_dot is None else bool(loop_dot),
        TILES=v_per_split // block_v,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    if split > 1:
        idx = keys & 0xFFFFFFFF
        if return_codes:
            codes = torch.nn.functional.embedding(idx, codebook)
    return idx, codes
