"""Block-causal multi-scale attention and the KV-cached sampling step: functional API and backend choice.

See :mod:`fastvar.reference.attention` for the definitions these ops must reproduce.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastvar.reference import attention as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import check_same, check_scale_lens, check_tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_bias_cache: dict = {}


def _eager_block_causal(q, k, v, scale_lens, softmax_scale, scale_mul):
    key = (scale_lens, q.device, q.dtype)
    bias = _bias_cache.get(key)
    if bias is None:
        if len(_bias_cache) > 16:
            _bias_cache.clear()
        bias = _bias_cache[key] = ref.block_causal_bias(scale_lens, q.device, q.dtype)
    return ref.block_causal_attention(q, k, v, scale_lens, softmax_scale, scale_mul, attn_bias=bias)


BLOCK_CAUSAL_IMPLS = {"eager": _eager_block_causal}
KV_CACHED_IMPLS = {"eager": ref.kv_cached_attention}


def _check_scale_mul(scale_mul, H: int, like: torch.Tensor) -> None:
    if scale_mul is None:
        return
    check_tensor("scale_mul", scale_mul)
    if scale_mul.numel() != H:
        raise ValueError(f"scale_mul must hold one value per head (H={H}), got shape {tuple(scale_mul.shape)}")
    check_same(("q", "scale_mul"), (like, scale_mul), what="device")


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_lens: Sequence[int],
    softmax_scale: Optional[float] = None,
    scale_mul: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention where a query attends to every key of its own or a coarser scale.

    Args:
        q, k, v: ``(B, L, H, D)``, one float dtype, one device; any strides.
        scale_lens: token count of every scale, coarse to fine; ``sum(scale_lens) == L``
            (``pn**2`` per scale for VAR, ``h*w`` for non-square scales).
        softmax_scale: multiplies ``q @ k^T``; default ``1/sqrt(D)``, or 1 with ``scale_mul``.
        scale_mul: optional ``(H,)`` / ``(1, H, 1, 1)`` tensor; q and k are then L2-normalised per head
            and q is multiplied by ``exp(min(scale_mul, ln 100))`` (VAR's ``attn_l2_norm``).
    Returns:
        ``(B, L, H, D)`` tensor of q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, L, H, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    lens = check_scale_lens(scale_lens, q.shape[1])
    _check_scale_mul(scale_mul, q.shape[2], q)
    impl = select("block_causal_attention", BLOCK_CAUSAL_IMPLS, q.device)
    return impl(q, k, v, lens, softmax_scale, scale_mul)


def kv_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int,
    softmax_scale: Optional[float] = None,
    scale_mul: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The sampling step of one layer: write this scale's keys and values into the preallocated cache
    **in place** at ``[cache_len, cache_len + l)`` (keys after the L2 norm, if ``scale_mul`` is given)
    and attend the scale's queries to all ``cache_len + l`` cached tokens, with no mask.

    Args:
        q, k, v: ``(B, l, H, D)``.
        k_cache, v_cache: ``(B, L_max, H, D)``, same dtype and device as q, contiguous.
        cache_len: tokens already cached, ``0 <= cache_len <= L_max - l``.
        softmax_scale, scale_mul: as in :func:`block_causal_attention`.
    Returns:
        ``(B, l, H, D)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    check_same(("q", "k", "v", "k_cache", "v_cache"), (q, k, v, k_cache, v_cache))
    B, l, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, l, H, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[0] != B or c.shape[2:] != q.shape[2:]:
            raise ValueError(f"{name} must have shape (B={B}, L_max, H={H}, D={D}), got {tuple(c.shape)}")
    if not 0 <= int(cache_len) <= k_cache.shape[1] - l:
        raise ValueError(f"cache_len must be in [0, L_max - l] = [0, {k_cache.shape[1] - l}], got {cache_len}")
    _check_scale_mul(scale_mul, H, q)
    impl = select("kv_cached_attention", KV_CACHED_IMPLS, q.device)
    return impl(q, k, v, k_cache, v_cache, int(cache_len), softmax_scale, scale_mul)


def scale_lens_from_bias(attn_bias: torch.Tensor) -> Tuple[int, ...]:
    """Recover the schedule from a dense block-causal additive mask and verify the mask is one.

    Args:
        attn_bias: ``(L, L)`` or ``(1, 1, L, L)`` (or any broadcast of it), 0 where attending and
            ``-inf`` where masked, as the official ``attn_bias_for_masking``.
    Returns:
        the token count of every scale. Raises ``ValueError`` if the mask is not block-causal.
    """
    check_tensor("attn_bias", attn_bias)
    if attn_bias.dim() < 2 or attn_bias.shape[-1] != attn_bias.shape[-2]:
        raise ValueError(f"attn_bias must be an (..., L, L) mask, got shape {tuple(attn_bias.shape)}")
    m = attn_bias.reshape(-1, *attn_bias.shape[-2:])
    if m.shape[0] != 1 and not torch.equal(m, m[:1].expand_as(m)):
        raise ValueError("attn_bias differs across batch/heads; fastvar supports one block-causal mask")
    allowed = m[0] == 0
    if not torch.all(allowed | (m[0] == float("-inf"))):
        raise ValueError("attn_bias must hold only 0 and -inf (a block-causal mask)")
    ends = allowed.sum(dim=1).tolist()     # row i attends to keys [0, end of its scale)
    lens, prev = [], 0
    for e in ends:
        if e != prev and e > prev:
            lens.append(e - prev)
            prev = e
    if sum(lens) != len(ends) or not torch.equal(allowed, ref.block_causal_bias(lens, m.device) == 0):
        raise ValueError("attn_bias is not a block-causal multi-scale mask (0 where scale(key) <= "
                         "scale(query), -inf elsewhere)")
    return tuple(lens)


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {"block_causal_attention": BLOCK_CAUSAL_IMPLS, "kv_cached_attention": KV_CACHED_IMPLS}
__all__ = ["block_causal_attention", "kv_cached_attention", "scale_lens_from_bias"]
