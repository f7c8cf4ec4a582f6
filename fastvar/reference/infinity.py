"""Eager definitions of Infinity's pieces, in the official op order (INFINITY_SPEC.md), so float32 results
on CPU follow the official code operation by operation.

Shapes: B batch, L tokens, H heads, c head dim, C width, d bits per VAE latent pixel, d_t bits per token
(d, or 4d under spatial patchify). Text is packed: ``kv_compact`` ``(N, C_t5)`` holds the valid tokens of
all prompts one after the other, ``cu_seqlens`` ``(B + 1,)`` int32 their offsets.

Memory layout matters for bit-exact CPU results (spec section 10): the BSQ quantizer and the bit-to-code
step return ``(B, d, 1, h, w)`` tensors with channels-last strides, as the official ones, and the
trilinear resizes see those layouts.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastvar import dynamic_resolution as schedules
from fastvar.reference.attention import MAX_SCALE_MUL

NORM_EPS = 1e-12          # F.normalize's eps, used by the official q/k norm and BSQ
ROPE_BASE = 10000.0


# ------------------------------------------------------------------------------------------ text
def text_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in ``x``'s dtype (the official fallback
    ``rms_norm_impl`` when flash-attn's fused norm is absent)."""
    return ((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))) * weight).to(x.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Packed variable-length attention (``flash_attn_varlen_func`` semantics, no mask inside a sequence).

    Args:
        q: ``(Nq, H, c)``; k, v: ``(Nk, H, c)``; sequence ``i`` is q rows ``[cu_seqlens_q[i], cu_seqlens_q[i+1])``
            attending to k/v rows ``[cu_seqlens_k[i], cu_seqlens_k[i+1])``.
        softmax_scale: multiplies ``q . k``.
    Returns:
        ``(Nq, H, c)`` in q's dtype. float16/bfloat16/float32 inputs are computed in float32 and the result
        rounded once to q's dtype (the golden files' definition of the official bf16 flash-attn call:
        matmul, one multiply by the scale, softmax, matmul); float64 stays float64.
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=work, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].to(work).transpose(0, 1)           # H, Lq, c
        ki = k[ck[i]:ck[i + 1]].to(work).transpose(0, 1)           # H, Lk, c
        vi = v[ck[i]:ck[i + 1]].to(work).transpose(0, 1)
        p = torch.matmul(qi, ki.transpose(1, 2)).mul(softmax_scale).softmax(dim=-1)
        out[cq[i]:cq[i + 1]] = torch.matmul(p, vi).transpose(0, 1)
    return out.to(q.dtype)


def official_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, softmax_scale: float, attention=varlen_attention
                             ) -> torch.Tensor:
    """The official cross-attention call: float32 q, k, v are cast to bfloat16 for flash-attn's varlen kernel
    and its bfloat16 result back to float32 (spec section 3); other dtypes go in as they are.
    ``attention`` computes the varlen attention (:func:`varlen_attention` or the op)."""
    if q.dtype == torch.float32:
        bf = torch.bfloat16
        return attention(q.to(bf), k.to(bf), v.to(bf), cu_seqlens_q, cu_seqlens_k, softmax_scale).float()
    return attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


# ------------------------------------------------------------------------------------------ RoPE
def rope2d_inv_freq(head_dim: int) -> torch.Tensor:
    """``(head_dim // 4,)`` float32: ``1 / 10000 ** (2m / half)``, ``half = head_dim // 2``."""
    half = head_dim // 2
    return 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


@functools.lru_cache(maxsize=8)
def _rope_grid_map(head_dim: int) -> torch.Tensor:
    """``(2, 128, 128, head_dim // 2)``: cos and sin of ``[row * inv_freq, col * inv_freq]`` for every
    position of the official 128 x 128 grid, computed over the whole grid as the official code does (so
    each value comes out of the same vectorised cos/sin call)."""
    inv = rope2d_inv_freq(head_dim)
    t = torch.arange(schedules.ROPE_GRID, dtype=torch.int64).type_as(inv)
    f = torch.outer(t, inv)
    n = schedules.ROPE_GRID
    grid = torch.cat([f[:, None, :].expand(-1, n, -1), f[None, :, :].expand(n, -1, -1)], dim=-1)
    return torch.stack([torch.cos(grid), torch.sin(grid)], dim=0)


def rope2d_table(schedule: Sequence[Sequence[int]], head_dim: int, length: int = 0, device=None) -> torch.Tensor:
    """``(2, max(L, length), head_dim // 2)`` float32 cos/sin of every token of ``schedule`` (rows past the
    schedule: the template's 1M positions, then zeros, as the official padded table)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    pos = schedules.rope_positions(schedule, length)
    table = _rope_grid_map(head_dim)[:, pos[:, 0], pos[:, 1], :]
    if length > table.shape[1]:
        table = F.pad(table, (0, 0, 0, length - table.shape[1]))
    return table.to(device)


def qk_norm(q: torch.Tensor, k: torch.Tensor, scale_mul: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Infinity's cosine attention on ``(B, H, L, c)``: ``normalize(q) * exp(min(scale_mul, ln 100))``,
    ``normalize(k)``, both made contiguous (official op order)."""
    sm = scale_mul.clamp_max(MAX_SCALE_MUL).exp().to(q.dtype)
    q = F.normalize(q, dim=-1, eps=NORM_EPS).mul(sm).contiguous()
    k = F.normalize(k, dim=-1, eps=NORM_EPS).contiguous()
    return q, k


def padded_block_causal_mask(scale_lens: Sequence[int], pad_to: int, device=None,
                             dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, L', L')`` additive mask of the teacher-forced forward, ``L'`` = L rounded up to ``pad_to``:
    0 where ``scale(key) <= scale(query)``, ``-inf`` elsewhere; padded keys ``-inf`` for every row; padded
    query rows see key 0 only."""
    L = sum(scale_lens)
    Lp = -(-L // pad_to) * pad_to
    s = torch.repeat_interleave(torch.arange(len(scale_lens)), torch.tensor(list(scale_lens)))
    m = torch.where(s[:, None] >= s[None, :], 0.0, float("-inf"))
    if Lp != L:
        m = F.pad(m, (0, Lp - L, 0, Lp - L), value=float("-inf"))
        m[L:, 0] = 0
    return m.reshape(1, 1, Lp, Lp).to(device=device, dtype=dtype)


def shared_modulation(ada_gss: torch.Tensor, gss: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Shared AdaLN: a block's ``(1, 1, 6, C)`` parameter plus the per-prompt ``(B, 1, 6, C)`` modulation
    (``shared_ada_lin(cond_BD)``, computed once per prompt), split into gamma1, gamma2, scale1, scale2,
    shift1, shift2, each ``(B, 1, C)``."""
    return (ada_gss + gss).unbind(2)


# ------------------------------------------------------------------------------------------ bits and codes
def code_scale(d: int) -> float:
    """``1 / sqrt(d)``: the magnitude of a BSQ code before its L2 normalisation."""
    return 1 / math.sqrt(d)


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Official ``lfq.indices_to_codes(bits, 'bit_label')``: ``(B, 1, h, w, d)`` bits (any int dtype) ->
    ``(B, d, 1, h, w)`` float32 codes ``normalize(b * 2s - s)`` over the d bits, with channels-last strides."""
    s = code_scale(bits.shape[-1])
    codes = bits.unsqueeze(-2) * s * 2 - s
    codes = F.normalize(codes, dim=-1).squeeze(-2)
    return codes.permute(0, 4, 1, 2, 3)


def bsq_quantize(r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official ``BSQ.forward`` (``new_quant``, no projections) on a residual ``(B, d, 1, h, w)``:
    per pixel ``n = normalize(r)`` over d, ``q = n + (±s - n)`` (+s where ``n > 0``). Returns
    ``(q (B, d, 1, h, w) channels-last, bits (B, 1, h, w, d) int32)``."""
    B, d, t, h, w = r.shape
    x = r.permute(0, 2, 3, 4, 1).reshape(B, t * h * w, 1, d)            # pack: a contiguous copy
    x = F.normalize(x, dim=-1)
    one = torch.tensor(1, dtype=x.dtype, device=x.device)
    zhat = code_scale(d) * torch.where(x > 0, one, -one)
    q = x + (zhat - x)
    bits = (q > 0).int().reshape(B, t, h, w, d)
    return q.reshape(B, t, h, w, d).permute(0, 4, 1, 2, 3), bits


def interpolate(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """``F.interpolate`` of a ``(B, d, 1, h, w)`` map to ``size`` = ``(1, h', w')`` ('trilinear' or 'area')."""
    return F.interpolate(x, size=tuple(size), mode=mode)


def multiscale_bsq_encode(h: torch.Tensor, vae_schedule: Sequence[Sequence[int]]):
    """Official ``MultiScaleBSQ.forward`` on the encoder output ``h`` ``(B, d, H, W)``.

    Returns ``(z (B, d, H, W), bits: list of (B, 1, h, w, d) int32, var_inputs: list of S-1
    (B, d, 1, h', w'))``. Per scale: the residual area-downsampled (unless at full size), BSQ-quantized,
    the codes trilinear-upsampled to full size (contiguous) and subtracted; ``var_inputs`` the running sum
    area-downsampled to the next scale."""
    x = h.unsqueeze(2) if h.dim() == 4 else h
    B, C, T, H, W = x.shape
    x = x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3).contiguous()
    residual, out = x, 0.0
    bits, var_inputs = [], []
    sched = [tuple(s) for s in vae_schedule]
    for si, size in enumerate(sched):
        r = interpolate(residual, size, "area") if size != (T, H, W) else residual
        q, b = bsq_quantize(r)
        if size != (T, H, W):
            q = interpolate(q, (T, H, W), "trilinear").contiguous()
        residual = residual - q
        out = out + q
        bits.append(b)
        if si != len(sched) - 1:
            var_inputs.append(interpolate(out, sched[si + 1], "area").contiguous())
    z = out.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3).contiguous()
    return (z.squeeze(2) if z.shape[2] == 1 else z), bits, var_inputs


def sum_codes(bits: Sequence[torch.Tensor], vae_schedule: Sequence[Sequence[int]]) -> torch.Tensor:
    """Official ``decode_from_indices`` latent: ``sum_s trilinear(codes_s -> last VAE scale)``, ``(B, d, 1, h, w)``
    (channels-last strides, as the official sum keeps them)."""
    total = 0
    for b in bits:
        total = total + interpolate(bits_to_codes(b), tuple(vae_schedule[-1]), "trilinear")
    return total


# ------------------------------------------------------------------------------------------ patchify
def tokens_from_map(x: torch.Tensor, patchify: bool) -> torch.Tensor:
    """A VAE-grid map ``(B, d, 1, h, w)`` -> transformer tokens ``(B, h*w, d_t)`` (``pixel_unshuffle(2)``
    first under patchify: ``d_t = 4d``, bit ``4 ch + 2 i + k``)."""
    x = x.squeeze(-3)
    if patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.reshape(*x.shape[:2], -1).permute(0, 2, 1)


def tokens_to_vae_bits(bits_Bhwd: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Sampled bits ``(B, h, w, d_t)`` -> VAE-grid bits ``(B, 1, h', w', d)`` (``pixel_shuffle(2)`` under
    patchify), the official un-patchify of the sampler."""
    x = bits_Bhwd
    if patchify:
        x = F.pixel_shuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    return x.unsqueeze(1)


def vae_bits_to_tokens(bits: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE-grid bits ``(B, 1, h', w', d)`` -> per-token targets ``(B, h*w, d_t)`` (official ``gt_ms_idx_Bl``)."""
    B, d = bits.shape[0], bits.shape[-1]
    if patchify:
        x = F.pixel_unshuffle(bits.squeeze(1).permute(0, 3, 1, 2), 2)
        return x.permute(0, 2, 3, 1).reshape(B, -1, 4 * d)
    return bits.reshape(B, -1, d)


# ------------------------------------------------------------------------------------------ sampling
def cfg_mix(x: torch.Tensor, cfg: float) -> torch.Tensor:
    """``cfg * x[:B] + (1 - cfg) * x[B:]`` for ``x`` of ``2B`` rows (official guidance, on logits or hidden states)."""
    B = x.shape[0] // 2
    return cfg * x[:B] + (1 - cfg) * x[B:]


def bit_top_k_top_p_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Official ``sample_with_top_k_top_p_also_inplace_modifying_logits_`` filtering on ``(..., 2)`` bit
    logits, **in place**: top-k keeps values ``>=`` the k-th largest (k clamped to 2, so ``k >= 2`` keeps
    both); top-p sorts ascending, softmax, cumulative sum, removes entries whose sum is ``<= 1 - p`` except
    the largest (the less likely value goes when its probability is ``<= fl32(1 - p)``)."""
    V = logits.shape[-1]
    if top_k > 0:
        k = min(top_k, V)
        kth = logits.topk(k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


def bit_noise(rows: int, generator: Optional[torch.Generator], device=None) -> torch.Tensor:
    """``(rows, 2)`` float32 Exp(1) draw: what the official ``torch.multinomial`` over ``(rows, 2)`` bit
    probabilities takes from ``generator`` (one call per scale)."""
    return torch.empty(rows, 2, dtype=torch.float32, device=device).exponential_(generator=generator)


def sample_bits_official(logits: torch.Tensor, top_k: int, top_p: float,
                         generator: Optional[torch.Generator]) -> torch.Tensor:
    """The official draw: filter ``logits`` ``(B, n, 2)`` in place, ``torch.multinomial(softmax, 1)`` over the
    ``B * n`` rows; returns ``(B, n)`` int64 bits."""
    B, n, _ = logits.shape
    bit_top_k_top_p_(logits, top_k, top_p)
    probs = logits.softmax(dim=-1).view(-1, 2)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, n)


def sample_bits_with_noise(logits: torch.Tensor, top_k: int, top_p: float, noise: torch.Tensor) -> torch.Tensor:
    """As :func:`sample_bits_official` with the Exp(1) draw given: ``argmax(probs / noise)`` (first index on
    ties), which is what ``torch.multinomial`` computes for one sample per row."""
    B, n, _ = logits.shape
    bit_top_k_top_p_(logits, top_k, top_p)
    probs = logits.softmax(dim=-1).view(-1, 2)
    return torch.argmax(probs / noise, dim=-1).view(B, n)


def bitwise_step(summed, codes: torch.Tensor, vae_schedule: Sequence[Sequence[int]], si: int, patchify: bool):
    """The official step between scales for bitwise codes.

    ``codes`` ``(B, d, 1, h, w)`` of scale ``si``; ``summed`` the running latent (0 before the first scale).
    Not last: ``summed += trilinear(codes -> last VAE grid)``, and the next scale's input is
    ``trilinear(summed -> next VAE grid)`` as tokens ``(B, h*w, d_t)``. Last: ``summed += codes``.
    Returns ``(summed, next tokens or None)``."""
    sched = [tuple(s) for s in vae_schedule]
    if si != len(sched) - 1:
        summed = summed + interpolate(codes, sched[-1], "trilinear")
        nxt = interpolate(summed, sched[si + 1], "trilinear")
        return summed, tokens_from_map(nxt, patchify)
    return summed + codes, None


def bitwise_self_correction(raw: torch.Tensor, vae_schedule: Sequence[Sequence[int]], patchify: bool,
                            noise_apply_layers: int = -1, noise_apply_strength: float = -1.0,
                            noise_apply_requant: bool = True, flip_masks: Optional[Sequence[torch.Tensor]] = None):
    """Official ``BitwiseSelfCorrection.flip_requant``: the teacher-forcing input and targets.

    ``raw`` the encoder output ``(B, d, H, W)``. For each VAE scale ``s < noise_apply_layers`` a flip
    probability ``p = np.random.randint(0, 100 * strength + 1) * 0.01`` (legacy global NumPy) and a
    ``torch.rand`` mask from the global generator flip the bits (spec section 8); ``flip_masks`` (one
    ``(B, 1, h, w, d)`` bool per scale) replaces both draws. Returns ``(x_BLC_wo_prefix (B, L-1, d_t),
    targets: list of (B, h*w, d_t) int32, strengths: list of p, masks: list of bool masks)``."""
    import numpy as np

    codes_out = raw.unsqueeze(2) if raw.dim() == 4 else raw
    sched = [tuple(s) for s in vae_schedule]
    cum, xs, targets, strengths, masks = 0, [], [], [], []
    for si, size in enumerate(sched):
        residual = codes_out - cum
        if si != len(sched) - 1:
            residual = interpolate(residual, size, "area").contiguous()
        quantized, bits = bsq_quantize(residual)
        targets.append(vae_bits_to_tokens(bits, patchify))
        if si < noise_apply_layers:
            if flip_masks is not None:
                mask, p = flip_masks[si].to(torch.bool), None
            else:
                p = np.random.randint(0, 100 * noise_apply_strength + 1) * 0.01
                mask = torch.rand(*bits.shape).to(bits.device) < p
            strengths.append(p)
            masks.append(mask)
            flipped = bits.clone()
            flipped[mask] = 1 - flipped[mask]
            if noise_apply_requant:
                quantized = bits_to_codes(flipped)
        cum = cum + interpolate(quantized, sched[-1], "trilinear").contiguous()
        if si < len(sched) - 1:
            nxt = interpolate(cum, sched[si + 1], "trilinear").contiguous()
            xs.append(tokens_from_map(nxt, patchify))
    return torch.cat(xs, 1), targets, strengths, masks


def image_to_uint8_bgr(img: torch.Tensor) -> torch.Tensor:
    """The official return value: ``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8, channels reversed
    (BGR), ``trunc(((img + 1) / 2) * 255)``."""
    img = (img + 1) / 2
    return img.permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))


def schedule_lens(schedule) -> List[int]:
    """Tokens ``t * h * w`` of every scale of an official ``[(t, h, w), ...]`` schedule (t is 1 for images)."""
    return [int(t) * int(h) * int(w) for t, h, w in schedule]
