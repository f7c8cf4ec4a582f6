"""Eager definitions of VAR's token sampling: CFG mix, top-k / top-p filtering and the draw.

Shapes: logits are ``(B, l, V)`` (batch, tokens of the scale, vocabulary) or ``(N, V)``.

Official semantics (VAR_SPEC.md section 3):
- CFG: ``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (S - 1)``; the batch holds the B
  conditional rows first, then the B unconditional rows.
- top-k (k > 0): logits below the k-th largest of their row become ``-inf``; ties at the k-th value
  are all kept.
- top-p (p > 0), after top-k: sort ascending, softmax, cumulative sum; entries whose cumulative sum
  is ``<= 1 - p`` become ``-inf``, never the largest one.
- the draw: ``torch.multinomial(softmax(logits), 1, replacement=True, generator=rng)``, which for one
  sample is ``argmax(probs / q)`` with ``q`` an Exp(1) draw of a ``(rows, V)`` float32 tensor from
  ``rng`` (:func:`exponential_noise`, :func:`sample_with_noise`).
"""
from __future__ import annotations

from typing import Optional

import torch


def cfg_mix(logits_2B: torch.Tensor, t: float) -> torch.Tensor:
    """``(2B, ...)`` -> ``(B, ...)``: ``(1 + t) * logits[:B] - t * logits[B:]``."""
    B = logits_2B.shape[0] // 2
    return (1 + t) * logits_2B[:B] - t * logits_2B[B:]


def top_k_top_p_filter_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, stable: bool = False
                        ) -> torch.Tensor:
    """Set the logits outside the top-k / top-p support to ``-inf``, **in place**; returns ``logits``.

    ``stable=True`` sorts stably, which fixes the order among equal logits at the top-p threshold
    (lower index first, so removed first): fastvar's documented tie rule. The official code sorts
    with ``stable=False``, whose order among ties torch leaves unspecified (on CPU it varies; on CUDA
    for more than 32 values per row it is the stable one).
    """
    if top_k > 0:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False, stable=stable)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits


def sample_top_k_top_p_(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    num_samples: int = 1,
) -> torch.Tensor:
    """Filter ``logits_BlV`` in place, then draw: ``(B, l, V)`` -> ``(B, l, num_samples)`` int64.

    Exactly the official ``sample_with_top_k_top_p_``: one ``torch.multinomial`` over the flattened
    rows (with replacement for ``num_samples >= 0``).
    """
    B, l, V = logits_BlV.shape
    top_k_top_p_filter_(logits_BlV, top_k, top_p)
    replacement = num_samples >= 0
    n = abs(num_samples)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=n, replacement=replacement, generator=generator).view(B, l, n)


def exponential_noise(rows: int, V: int, generator: Optional[torch.Generator], device=None) -> torch.Tensor:
    """``(rows, V)`` float32 Exp(1) draw: the noise ``torch.multinomial`` takes for one sample per row."""
    return torch.empty(rows, V, dtype=torch.float32, device=device).exponential_(generator=generator)


def sample_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``argmax(probs / noise)`` over the last dim: a categorical draw given Exp(1) ``noise``
    (the exponential race; the first maximum wins, as ``torch.argmax`` does)."""
    return torch.argmax(probs / noise, dim=-1)


def sample_with_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first index ``j`` with ``cumsum(probs)_j > u * sum(probs)`` (the last
    index of positive probability if rounding leaves none). ``probs`` ``(N, V)``, ``u`` ``(N,)`` in
    [0, 1) -> ``(N,)`` int64. fastvar's ``fast`` mode draws this way with ``u`` from
    :func:`philox_uniform`."""
    c = probs.float().cumsum(dim=-1)
    target = (u.to(c.dtype) * c[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(c.contiguous(), target.contiguous(), right=True).squeeze(-1)
    idx = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, idx, -1).amax(dim=-1)
    return torch.where(tok < probs.shape[-1], tok, last)


# Philox4x32-10 as triton.language.rand computes it (constants of Salmon et al., 2011)
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor):
    """``(a * b) >> 32`` and ``(a * b) & 0xFFFFFFFF`` for a 32-bit constant ``a`` and 32-bit values ``b``
    held in int64, without overflowing int64 (``b`` split into 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_prod, hi_prod = a * b_lo, a * b_hi                 # < 2**48 each
    hi = (hi_prod + (lo_prod >> 16)) >> 16
    lo = (lo_prod + ((hi_prod & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``triton.language.rand(seed, offsets)`` in plain PyTorch: float32 uniforms in [0, 1), one per
    int64 offset (Philox4x32-10 on the counter ``(offset_lo, offset_hi, 0, 0)`` with key
    ``(seed_lo, seed_hi)``; the first output word, mapped to a float as Triton does).
    ``seed`` an int in [0, 2**63)."""
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = int(seed) & _M32, (int(seed) >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 2 ** 31, c0 - 2 ** 32, c0)      # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Soft Gumbel-softmax weights ``softmax((logits + g) / tau)``, ``g = -log(Exp(1) draw from generator)``
    (the official ``gumbel_softmax_with_rng`` with ``hard=False``)."""
    if generator is None:
        return torch.nn.functional.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    noise = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator)
    return ((logits + (-noise.log())) / tau).softmax(-1)


def smooth_tau(ratio: float) -> float:
    """Temperature of ``more_smooth`` sampling at scale position ``ratio`` in [0, 1]."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)
