"""Block-causal multi-scale attention and the KV-cached sampling step: functional API and backend choice.

See :mod:`fastvar.reference.attention` for the definitions these ops must reproduce.

Backends (``BLOCK_CAUSAL_IMPLS`` / ``KV_CACHED_IMPLS``): ``eager`` (the reference, with the dense mask
cached) and ``triton`` (``fastvar.triton_kernels.attention``: FlashAttention-style tiles, no ``L x L``
tensor, VAR's q/k L2 norm fused in). The Triton path runs through two ``torch.library`` custom ops,
``fastvar::block_causal_attention`` (with its backward ``fastvar::block_causal_attention_backward``,
attached by ``register_autograd``) and ``fastvar::kv_cached_attention`` (mutates the caches), each with
a fake implementation, so ``torch.compile`` and CUDA graphs see one node per call.
"""
# No ``from __future__ import annotations``: torch.library reads the custom ops' annotations as types.
from typing import List, Optional, Sequence, Tuple

import torch

from fastvar.reference import attention as ref
from fastvar.ops._backend import select
from fastvar.ops._checks import (FLOAT_DTYPES, check_finite_scalar, check_int, check_same, check_scale_lens,
                                 check_tensor, may_overlap)


_bias_cache: dict = {}


def _eager_block_causal(q, k, v, scale_lens, softmax_scale, scale_mul):
    key = (scale_lens, q.device, q.dtype)
    bias = _bias_cache.get(key)
    if bias is None:
        if len(_bias_cache) > 16:
            _bias_cache.clear()
        with torch.inference_mode(False):     # a cached inference tensor could not be saved for backward later
            bias = _bias_cache[key] = ref.block_causal_bias(scale_lens, q.device, q.dtype)
    return ref.block_causal_attention(q, k, v, scale_lens, softmax_scale, scale_mul, attn_bias=bias)


# ------------------------------------------------------------------ Triton path: custom ops
def _kernels():
    """``fastvar.triton_kernels.attention``, imported on first use (after ``TRITON_INTERPRET`` is set)."""
    from fastvar.triton_kernels import attention
    return attention


@torch.library.custom_op("fastvar::block_causal_attention", mutates_args=())
def _block_causal_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_lens: List[int],
                     softmax_scale: float, scale_mul: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``out`` (B, L, H, D) and the softmax statistics ``stats`` (2 or, with ``scale_mul``,
    3, B, H, L) fp32 the backward needs (see ``fastvar.triton_kernels.attention``)."""
    return _kernels().block_causal_attention_fwd(q, k, v, scale_lens, softmax_scale, scale_mul)


@_block_causal_op.register_fake
def _(q, k, v, scale_lens, softmax_scale, scale_mul):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((2 if scale_mul is None else 3, B, H, L), dtype=torch.float32)


@torch.library.custom_op("fastvar::block_causal_attention_backward", mutates_args=())
def _block_causal_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, stats: torch.Tensor, scale_lens: List[int], softmax_scale: float,
                              scale_mul: Optional[torch.Tensor]
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: ``dq, dk, dv`` (B, L, H, D) and ``dscale_mul`` shaped as ``scale_mul`` (an empty
    tensor without ``scale_mul``: a custom op cannot return None)."""
    dq, dk, dv, dsm = _kernels().block_causal_attention_bwd(dout, q, k, v, out, stats, scale_lens, softmax_scale,
                                                            scale_mul)
    dsm = q.new_empty(0) if scale_mul is None else dsm.to(scale_mul.dtype).reshape(scale_mul.shape)
    return dq, dk, dv, dsm


@_block_causal_backward_op.register_fake
def _(dout, q, k, v, out, stats, scale_lens, softmax_scale, scale_mul):
    dsm = q.new_empty(0) if scale_mul is None else scale_mul.new_empty(scale_mul.shape)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dsm


def _block_causal_setup_context(ctx, inputs, output):
    q, k, v, scale_lens, softmax_scale, scale_mul = inputs
    ctx.scale_lens, ctx.softmax_scale = scale_lens, softmax_scale
    ctx.save_for_backward(q, k, v, output[0], output[1], scale_mul)


def _block_causal_backward(ctx, dout, dstats):
    # ``stats`` are internal (the public function returns ``out`` only): their gradient is ignored.
    q, k, v, out, stats, scale_mul = ctx.saved_tensors
    dq, dk, dv, dsm = _block_causal_backward_op(dout, q, k, v, out, stats, ctx.scale_lens, ctx.softmax_scale,
                                                scale_mul)
    return dq, dk, dv, None, None, (dsm if scale_mul is not None else None)


# register_autograd builds the autograd.Function around the op, so the op stays one node for compile.
_block_causal_op.register_autograd(_block_causal_backward, setup_context=_block_causal_setup_context)


@torch.library.custom_op("fastvar::kv_cached_attention", mutates_args=("k_cache", "v_cache"))
def _kv_cached_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_len: int, softmax_scale: float, scale_mul: Optional[torch.Tensor],
                  rope: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton KV-cached step: one launch appends the scale to the caches in place and attends (no autograd);
    with ``rope``, an append launch (rotate, normalise, write) and the attention launch (q rotated in its prologue)."""
    return _kernels().kv_cached_attention_fwd(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul,
                                              rope=rope)


@_kv_cached_op.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul, rope=None):
    return q.new_empty(q.shape)


def _triton_unsupported(q: torch.Tensor, check: bool = False) -> Optional[str]:
    """None if the Triton kernels take ``q``'s head dim and dtype (eager takes every D and float dtype),
    else the reason; with ``check``, raise it as a clear error instead (the Triton backend was chosen)."""
    if not (check or q.is_cuda):
        return None      # CPU tensors reach Triton only when it is forced, and then ``check`` runs
    kernels = _kernels()
    why, error = None, ValueError
    if q.shape[-1] not in kernels.SUPPORTED_HEAD_DIMS:
        why = f"the Triton attention kernels need head dim D in {kernels.SUPPORTED_HEAD_DIMS}, got D={q.shape[-1]}"
    elif q.dtype not in kernels.SUPPORTED_DTYPES:
        why, error = (f"the Triton attention kernels need dtype in {[str(d) for d in kernels.SUPPORTED_DTYPES]}, "
                      f"got {q.dtype}"), TypeError
    if why is not None and check:
        raise error(f"q, k, v: {why} (shape {tuple(q.shape)}); FASTVAR_BACKEND=eager supports it")
    return why


def _triton_block_causal(q, k, v, scale_lens, softmax_scale, scale_mul):
    _triton_unsupported(q, check=True)
    scale = ref._softmax_scale(q.shape[-1], softmax_scale, scale_mul)
    return _block_causal_op(q, k, v, list(scale_lens), scale, scale_mul)[0]


def _triton_kv_cached(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul, rope=None):
    _triton_unsupported(q, check=True)
    scale = ref._softmax_scale(q.shape[-1], softmax_scale, scale_mul)
    return _kv_cached_op(q, k, v, k_cache, v_cache, int(cache_len), scale, scale_mul, rope)


BLOCK_CAUSAL_IMPLS = {"eager": _eager_block_causal, "triton": _triton_block_causal}
KV_CACHED_IMPLS = {"eager": ref.kv_cached_attention, "triton": _triton_kv_cached}


def _check_scale_mul(scale_mul, H: int, like: torch.Tensor) -> None:
    if scale_mul is None:
        return
    check_tensor("scale_mul", scale_mul)
    if not scale_mul.is_floating_point():
        raise TypeError(f"scale_mul must be a floating-point tensor, got {scale_mul.dtype}")
    if scale_mul.numel() != H:
        raise ValueError(f"scale_mul must hold one value per head (H={H}), got shape {tuple(scale_mul.shape)}")
    check_same(("q", "scale_mul"), (like, scale_mul), what="device")


def _check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is not None:
        check_finite_scalar("softmax_scale", softmax_scale)


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
    _check_softmax_scale(softmax_scale)
    impl = select("block_causal_attention", BLOCK_CAUSAL_IMPLS, q.device, {"triton": _triton_unsupported(q)})
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
    rope: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The sampling step of one layer: write this scale's keys and values into the preallocated cache
    **in place** at ``[cache_len, cache_len + l)`` (keys after the L2 norm if ``scale_mul`` is given, and the
    rotation if ``rope`` is) and attend the scale's queries to all ``cache_len + l`` cached tokens, with no mask.

    Args:
        q, k, v: ``(B, l, H, D)``.
        k_cache, v_cache: ``(B, L_max, H, D)``, same dtype and device as q, any strides; they share memory with
            neither each other nor q, k, v (checked from the tensors' addresses: no synchronisation).
        cache_len: tokens already cached, an int, ``0 <= cache_len <= L_max - l``.
        softmax_scale, scale_mul: as in :func:`block_causal_attention`.
        rope: optional ``(2, l, D/2)`` float32 cos/sin of the new tokens' angles (Infinity's 2D RoPE, the rows
            of this scale): q and k are rotated pairwise after the L2 norm, ``(x_{2p}, x_{2p+1}) -> (cos x_{2p} -
            sin x_{2p+1}, sin x_{2p} + cos x_{2p+1})``, the official order (Triton: fused, see
            ``fastvar.triton_kernels.attention``).
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
    cache_len = check_int("cache_len", cache_len)
    if not 0 <= cache_len <= k_cache.shape[1] - l:
        raise ValueError(f"cache_len must be in [0, L_max - l] = [0, {k_cache.shape[1] - l}], got {cache_len}")
    _check_scale_mul(scale_mul, H, q)
    _check_softmax_scale(softmax_scale)
    if rope is not None:
        if D % 2:
            raise ValueError(f"rope rotates pairs of channels: the head dim D must be even, got D={D}")
        check_tensor("rope", rope, ndim=3, dtypes=(torch.float32,), shape=(2, l, D // 2))
        check_same(("q", "rope"), (q, rope), what="device")
    if may_overlap(k_cache, v_cache):     # one tensor as both caches: the values would overwrite the keys
        raise ValueError("k_cache and v_cache must not share memory (one tensor passed as both, or overlapping "
                         "views): each scale writes its keys into k_cache and its values into v_cache")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        for other_name, t in (("q", q), ("k", k), ("v", v)):
            if may_overlap(c, t):
                raise ValueError(f"{name} must not share memory with {other_name}: the new keys and values are "
                                 f"read from {other_name} while {name} is written in place")
    impl = select("kv_cached_attention", KV_CACHED_IMPLS, q.device, {"triton": _triton_unsupported(q)})
    if rope is None:       # implementations registered without a RoPE argument keep working
        return impl(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul)
    return impl(q, k, v, k_cache, v_cache, cache_len, softmax_scale, scale_mul, rope)


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
        if e > prev:
            lens.append(e - prev)
            prev = e
    if sum(lens) != len(ends) or not torch.equal(allowed, ref.block_causal_bias(lens, m.device) == 0):
        raise ValueError("attn_bias is not a block-causal multi-scale mask (0 where scale(key) <= "
                         "scale(query), -inf elsewhere)")
    return tuple(lens)


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {"block_causal_attention": BLOCK_CAUSAL_IMPLS, "kv_cached_attention": KV_CACHED_IMPLS}
__all__ = ["block_causal_attention", "kv_cached_attention", "scale_lens_from_bias"]
