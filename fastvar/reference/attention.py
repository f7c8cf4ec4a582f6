"""Eager definitions of VAR's attention: block-causal multi-scale attention and the KV-cached step.

Layout everywhere: ``q, k, v`` are ``(B, L, H, D)`` (batch, tokens, heads, head dim), the layout the
qkv projection produces. ``scale_lens`` is the token count of every scale, coarse to fine, with
``sum(scale_lens) == L``. A query of scale ``s`` attends to every key of scale ``<= s``: all coarser
scales and its own scale, in both directions. That is the official dense ``attn_bias_for_masking``
(0 where ``scale(key) <= scale(query)``, ``-inf`` elsewhere).

With VAR's ``attn_l2_norm`` the queries and keys are L2-normalised per head and the queries are
multiplied by ``exp(min(scale_mul, ln 100))`` per head; the softmax scale is then 1.

These functions are the ground truth for tests and benchmarks and the CPU path of fastvar's models.
They follow the official computation step for step (same ops, same order) so that float32 results
match the official code to the last bit wherever PyTorch itself is deterministic.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# The official clamp, ``torch.log(torch.tensor(100)).item()``: ln(100) rounded to float32.
MAX_SCALE_MUL = float(torch.tensor(100.0).log())


def scale_index(scale_lens: Sequence[int], device=None) -> torch.Tensor:
    """``(L,)`` int64: the scale of every token (the official ``lvl_1L[0]``)."""
    lens = torch.as_tensor(list(scale_lens), dtype=torch.long, device="cpu")
    return torch.repeat_interleave(torch.arange(len(lens), device="cpu"), lens).to(device)


def block_causal_bias(scale_lens: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``(L, L)`` additive mask: 0 where ``scale(key) <= scale(query)``, ``-inf`` elsewhere."""
    s = scale_index(scale_lens, device)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(s[:, None] >= s[None, :], zero, torch.full_like(zero, float("-inf")))


def scale_mul_factor(scale_mul: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``exp(min(scale_mul, ln 100))`` as ``(1, H, 1, 1)``, from a ``(H,)`` or ``(1, H, 1, 1)`` parameter."""
    return scale_mul.reshape(1, num_heads, 1, 1).clamp_max(MAX_SCALE_MUL).exp()


def qk_l2_norm(q_bhld: torch.Tensor, k_bhld: torch.Tensor, scale_mul: torch.Tensor):
    """VAR's query/key normalisation on ``(B, H, L, D)`` tensors: ``(normalize(q) * exp(min(scale_mul, ln 100)),
    normalize(k))``."""
    q = F.normalize(q_bhld, dim=-1).mul(scale_mul_factor(scale_mul, q_bhld.shape[1]).to(q_bhld.dtype))
    k = F.normalize(k_bhld, dim=-1)
    return q, k


def _softmax_scale(head_dim: int, softmax_scale: Optional[float], scale_mul) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    return 1.0 if scale_mul is not None else head_dim ** -0.5


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_lens: Sequence[int],
    softmax_scale: Optional[float] = None,
    scale_mul: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-causal multi-scale attention with a dense mask (what the official model does in training).

    Args:
        q, k, v: ``(B, L, H, D)``.
        scale_lens: token count of every scale; ``sum(scale_lens) == L``.
        softmax_scale: multiplies ``q @ k^T``; default ``1/sqrt(D)``, or 1 when ``scale_mul`` is given.
        scale_mul: ``(H,)`` or ``(1, H, 1, 1)``; if given, q and k are L2-normalised first (VAR's
            ``attn_l2_norm``) and q is multiplied by ``exp(min(scale_mul, ln 100))``.
        attn_bias: optional precomputed ``(L, L)`` (or broadcastable) additive mask equal to
            ``block_causal_bias(scale_lens)``; saves rebuilding it.
    Returns:
        ``(B, L, H, D)``, dtype of ``q``.
    """
    B, L, H, D = q.shape
    if sum(scale_lens) != L:
        raise ValueError(f"sum(scale_lens) must equal L={L}, got {sum(scale_lens)} for scale_lens={list(scale_lens)}")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # BHLD views, as the official code has
    if scale_mul is not None:
        q, k = qk_l2_norm(q, k, scale_mul)
    if attn_bias is None:
        attn_bias = block_causal_bias(scale_lens, q.device, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype),
                                         scale=_softmax_scale(D, softmax_scale, scale_mul))
    return out.transpose(1, 2)


def apply_rope2d(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate consecutive pairs of ``q``, ``k`` ``(B, H, L, c)`` by the angles of ``cos_sin`` ``(2, L, c/2)``:
    ``(x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1)``. Returns new tensors (official ``apply_rotary_emb``)."""
    qk = torch.stack((q, k), dim=0)
    rope = cos_sin[:, None, None, None].to(qk.dtype)                    # 2, 1, 1, 1, L, c/2
    qk = qk.reshape(*qk.shape[:-1], -1, 2)
    qk = torch.stack([rope[0] * qk[..., 0] - rope[1] * qk[..., 1],
                      rope[1] * qk[..., 0] + rope[0] * qk[..., 1]], dim=-1)
    q, k = qk.reshape(*qk.shape[:-2], -1).unbind(dim=0)
    return q, k


def kv_cached_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int,
    softmax_scale: Optional[float] = None,
    scale_mul: Optional[torch.Tensor] = None,
    rope: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One sampling step: append the new scale's keys/values to the cache, attend to the whole prefix.

    Args:
        q, k_new, v_new: ``(B, l, H, D)``, the ``l`` tokens of the scale being predicted.
        k_cache, v_cache: ``(B, L_max, H, D)`` preallocated caches; positions ``[0, cache_len)`` hold
            the earlier scales. ``k_new`` (after the L2 norm and RoPE, if any) and ``v_new`` are written
            **in place** at ``[cache_len, cache_len + l)``.
        cache_len: number of tokens already cached.
        softmax_scale, scale_mul: as in :func:`block_causal_attention`.
        rope: optional ``(2, l, D/2)`` cos/sin of the new tokens' rotation angles (Infinity's 2D RoPE):
            after the L2 norm, q and k are rotated pairwise, ``(x_{2p}, x_{2p+1}) -> (cos x_{2p} - sin x_{2p+1},
            sin x_{2p} + cos x_{2p+1})`` (:func:`apply_rope2d`, the official order).
    Returns:
        ``(B, l, H, D)``: every new query attends to all ``cache_len + l`` cached keys, no mask.
    """
    B, l, H, D = q.shape
    end = cache_len + l
    if end > k_cache.shape[1]:
        raise ValueError(f"cache_len + l = {end} exceeds the cache length {k_cache.shape[1]}")
    q, k_new = q.transpose(1, 2), k_new.transpose(1, 2)
    if scale_mul is not None:
        q, k_new = qk_l2_norm(q, k_new, scale_mul)
    if rope is not None:
        q, k_new = apply_rope2d(q, k_new, rope)
    k_cache[:, cache_len:end].copy_(k_new.transpose(1, 2))
    v_cache[:, cache_len:end].copy_(v_new)
    k = k_cache[:, :end].transpose(1, 2)
    v = v_cache[:, :end].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=_softmax_scale(D, softmax_scale, scale_mul))
    return out.transpose(1, 2)
