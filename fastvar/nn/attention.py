"""Drop-in transformer modules of VAR with the official names, on fastvar's attention ops.

Parameter and buffer names equal the official ones, so official state dicts load both ways:
``SelfAttention``: ``mat_qkv``, ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``, ``proj``;
``AdaLNSelfAttn``: ``attn``, ``ffn.fc1``, ``ffn.fc2``, ``ada_lin.1`` (or ``ada_gss`` with shared AdaLN);
``AdaLNBeforeHead``: ``ada_lin.1``.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``drop_prob``
    and scale the kept ones by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# Masks already checked: (address, shape, strides, dtype, device, version counter) -> (the tensor that
# owns that memory, held weakly; the scale lengths). The official forward hands every block, at every
# step, a fresh slice of the same buffer (``attn_bias_for_masking[:, :, :L, :L].to(dtype)``): the
# slices share one owner (their ``_base``), so the buffer is checked once, not once per forward. A hit
# needs that owner to be alive and to be the owner of the mask passed now: an address alone is not
# enough, since a freed mask's memory is reused by the next tensor of its size (CI caught a malformed
# mask accepted that way). A tensor modified in place bumps its version and is checked again.
# (Inference tensors have no version counter: they cannot change outside inference mode, so their key has none.)
_verified_masks: Dict[tuple, Tuple[weakref.ref, Tuple[int, ...]]] = {}


def schedule_of_mask(attn_bias: torch.Tensor) -> Tuple[int, ...]:
    """The scale lengths of a dense block-causal ``attn_bias``, verified (see ``ops.scale_lens_from_bias``)."""
    owner = attn_bias if attn_bias._base is None else attn_bias._base
    key = (attn_bias.data_ptr(), tuple(attn_bias.shape), attn_bias.stride(), attn_bias.dtype, attn_bias.device,
           None if attn_bias.is_inference() else attn_bias._version)
    hit = _verified_masks.get(key)
    if hit is not None and hit[0]() is owner:
        return hit[1]
    lens = ops.scale_lens_from_bias(attn_bias)
    if len(_verified_masks) >= 64:
        _verified_masks.clear()
    _verified_masks[key] = (weakref.ref(owner), lens)
    return lens


class KVCache:
    """Preallocated keys and values of one attention layer for a whole sampling run.

    ``k``, ``v``: ``(B, capacity, H, D)``; ``length`` tokens are filled. Scales are written in place by
    ``ops.kv_cached_attention``: nothing is concatenated or reallocated while sampling (a cache
    without a known capacity doubles when full).
    """

    def __init__(self, B: int, capacity: int, H: int, D: int, dtype: torch.dtype, device):
        self.k = torch.empty(B, capacity, H, D, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def reserve(self, extra: int) -> None:
        need = self.length + extra
        if need <= self.k.shape[1]:
            return
        cap = max(need, 2 * self.k.shape[1])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], cap, *old.shape[2:])
            new[:, : self.length].copy_(old[:, : self.length])
            setattr(self, name, new)


class SelfAttention(nn.Module):
    """Multi-head self-attention of VAR (official ``SelfAttention``), head dim ``embed_dim // num_heads``.

    ``forward(x, attn_bias)``: ``x`` ``(B, L, C)``. In training / teacher forcing, ``attn_bias`` is the
    official dense block-causal mask (``(1, 1, L, L)``, 0 / -inf) or None for full attention; fastvar
    checks that the mask is block-causal, recovers the schedule from it and runs
    ``ops.block_causal_attention`` without ever using the dense mask. With ``kv_caching(True)``, every
    call is one scale of sampling: its keys and values go into a preallocated cache and its queries
    attend to the whole prefix (``ops.kv_cached_attention``).
    """

    def __init__(self, block_idx: int = 0, embed_dim: int = 768, num_heads: int = 12, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = False, flash_if_available: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.caching = False
        self.kv_cache: Optional[KVCache] = None
        self.cache_capacity: Optional[int] = None   # tokens of the whole schedule; set by VAR

    def kv_caching(self, enable: bool) -> None:
        """Start (True) or end (False) a sampling run; either way the previous cache is dropped."""
        self.caching, self.kv_cache = bool(enable), None

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, C)`` -> q, k, v as ``(B, L, H, D)`` views of one projection."""
        B, L, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        return qkv.unbind(dim=2)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, C = x.shape
        if self.training and self.attn_drop > 0:
            raise NotImplementedError("attention dropout (attn_drop > 0) is not supported by fastvar's kernels")
        q, k, v = self.qkv(x)
        scale_mul = self.scale_mul_1H11 if self.attn_l2_norm else None
        if self.caching:
            cache = self.kv_cache
            if cache is None or cache.k.shape[0] != B:
                cache = self.kv_cache = KVCache(B, max(self.cache_capacity or 0, L), self.num_heads,
                                                self.head_dim, q.dtype, q.device)
            cache.reserve(L)
            out = ops.kv_cached_attention(q, k, v, cache.k, cache.v, cache.length, self.scale, scale_mul)
            cache.length += L
        else:
            lens = (L,) if attn_bias is None else schedule_of_mask(attn_bias)
            out = ops.block_causal_attention(q, k, v, lens, self.scale, scale_mul)
        return self.proj_drop(self.proj(out.reshape(B, L, C)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, attn_l2_norm={self.attn_l2_norm}"


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (official ``FFN``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0, fused_if_available: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop, inplace=True) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    """The shared AdaLN projection (``shared_aln=True``): ``(B, D)`` -> ``(B, 1, 6, C)``."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """A VAR block (official ``AdaLNSelfAttn``): adaptive-LayerNorm attention and MLP with gated residuals.

    ``forward(x, cond_BD, attn_bias)``: ``x`` ``(B, L, C)``; ``cond_BD`` the class condition ``(B, D)``
    (or, with ``shared_aln``, the shared ``(B, 1, 6, C)`` modulation).
    """

    def __init__(self, block_idx: int, last_drop_p: float, embed_dim: int, cond_dim: int, shared_aln: bool,
                 norm_layer, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attn_l2_norm: bool = False, flash_if_available: bool = False,
                 fused_if_available: bool = True):
        super().__init__()
        self.block_idx, self.last_drop_p = block_idx, last_drop_p
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, attn_drop=attn_drop,
                                  proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = norm_layer(embed_dim, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))
        self.fused_add_norm_fn = None

    def modulation(self, cond_BD: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each ``(B, 1, C)``."""
        if self.shared_aln:
            return (self.ada_gss + cond_BD).unbind(2)
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1),
                                         attn_bias=attn_bias).mul_(gamma1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x

    def extra_repr(self) -> str:
        return f"shared_aln={self.shared_aln}"


class AdaLNBeforeHead(nn.Module):
    """Adaptive LayerNorm before the classifier head (official ``AdaLNBeforeHead``)."""

    def __init__(self, C: int, D: int, norm_layer):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
