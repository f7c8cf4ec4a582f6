"""Drop-in transformer modules of VAR with the official names, on fastvar's attention ops.

Parameter and buffer names equal the official ones, so official state dicts load both ways:
``SelfAttention``: ``mat_qkv``, ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``, ``proj``;
``AdaLNSelfAttn``: ``attn``, ``ffn.fc1``, ``ffn.fc2``, ``ada_lin.1`` (or ``ada_gss`` with shared AdaLN);
``AdaLNBeforeHead``: ``ada_lin.1``.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops
from fastvar.schedule import Schedule


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
# enough, since a freed mask's memory is reused by the next tensor of its size, which may be malformed.
# A tensor modified in place bumps its version and is checked again.
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
    """Keys and values of one attention layer for a whole sampling run, written in place scale by scale.

    ``k``, ``v``: ``(B, capacity, H, D)``, allocated by :meth:`allocate` (the Sampler does it up front, for the
    whole schedule) or at the first :meth:`attend` for that call's batch, dtype and device. ``length``: tokens
    filled by the official loop's calls. Nothing is concatenated while sampling; a cache without room for a
    scale (a standalone ``SelfAttention`` with no known capacity) grows by doubling.
    """

    def __init__(self, capacity: int, H: int, D: int):
        self.capacity, self.H, self.D = capacity, H, D
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def allocate(self, B: int, dtype: torch.dtype, device) -> "KVCache":
        self.k = torch.empty(B, self.capacity, self.H, self.D, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        return self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, softmax_scale: float,
               scale_mul: Optional[torch.Tensor]) -> torch.Tensor:
        """Write the scale's ``k``, ``v`` ``(B, l, H, D)`` at ``[start, start + l)`` and attend ``q`` to all
        ``start + l`` cached tokens (``ops.kv_cached_attention``); returns ``(B, l, H, D)``. ``start`` is
        explicit so that a captured CUDA graph of each scale replays with its own offset."""
        if self.k is None or (self.k.shape[0], self.k.dtype, self.k.device) != (q.shape[0], q.dtype, q.device):
            if start > 0:
                held = "nothing" if self.k is None else f"batch {self.k.shape[0]} in {self.k.dtype} on {self.k.device}"
                raise ValueError(f"the KV cache holds {held} but this scale (start={start}) has batch {q.shape[0]} "
                                 f"in {q.dtype} on {q.device}; start a new sampling run (kv_caching(True))")
            self.capacity = max(self.capacity, start + q.shape[1])
            self.allocate(q.shape[0], q.dtype, q.device)
        elif start + q.shape[1] > self.k.shape[1]:
            self.capacity = max(start + q.shape[1], 2 * self.k.shape[1])
            old_k, old_v = self.k, self.v
            self.allocate(q.shape[0], q.dtype, q.device)
            self.k[:, :start].copy_(old_k[:, :start])
            self.v[:, :start].copy_(old_v[:, :start])
        return ops.kv_cached_attention(q, k, v, self.k, self.v, start, softmax_scale, scale_mul)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class SelfAttention(nn.Module):
    """Multi-head self-attention of VAR (official ``SelfAttention``), head dim ``embed_dim // num_heads``.

    ``forward(x, attn_bias=None, schedule=None)``: ``x`` ``(B, L, C)``. In training / teacher forcing, fastvar's
    ``VAR`` passes its :class:`~fastvar.schedule.Schedule` (the first scales holding the ``L`` tokens attend
    block-causally); an official model (patched) passes its dense block-causal mask ``attn_bias``
    (``(1, 1, L, L)``, 0 / -inf), which is checked to be block-causal and turned into the schedule (once
    per mask tensor); neither means full attention. ``ops.block_causal_attention`` never uses a dense mask. With ``kv_caching(True)``, every
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
        self.caching = bool(enable)
        self.kv_cache = KVCache(self.cache_capacity or 0, self.num_heads, self.head_dim) if enable else None

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, C)`` -> q, k, v as ``(B, L, H, D)`` views of one projection."""
        B, L, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        return qkv.unbind(dim=2)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                schedule: Optional[Schedule] = None) -> torch.Tensor:
        B, L, C = x.shape
        if self.training and self.attn_drop > 0:
            raise NotImplementedError("attention dropout (attn_drop > 0) is not supported by fastvar's kernels")
        q, k, v = self.qkv(x)
        scale_mul = self.scale_mul_1H11 if self.attn_l2_norm else None
        if self.caching:
            out = self.kv_cache.attend(q, k, v, self.kv_cache.length, self.scale, scale_mul)
            self.kv_cache.length += L
        else:
            if schedule is not None:
                lens = schedule.prefix(L).lens
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


def copy_unless_same(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (casting), unless ``dst`` is ``src``'s own memory."""
    if dst.data_ptr() != src.data_ptr() or dst.dtype != src.dtype:
        dst.copy_(src)


@dataclasses.dataclass
class BlockWeights:
    """A block's tensors for :meth:`AdaLNSelfAttn.sampling_step`: the module's own, or copies cast once to a
    compute dtype (the Sampler's). ``qkv_b`` is the official ``cat(q_bias, zero_k_bias, v_bias)``; ``scale_mul``
    (float32, L2-norm attention only) and ``softmax_scale`` as in ``ops.kv_cached_attention``; ``ada`` the
    AdaLN projection (``(weight, bias)``, or ``(ada_gss,)`` with a shared AdaLN)."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    ada: Tuple[torch.Tensor, ...]
    scale_mul: Optional[torch.Tensor]
    softmax_scale: float
    heads: int
    head_dim: int
    eps: float


class AdaLNSelfAttn(nn.Module):
    """A VAR block (official ``AdaLNSelfAttn``): adaptive-LayerNorm attention and MLP with gated residuals.

    ``forward(x, cond_BD, attn_bias=None, schedule=None)``: ``x`` ``(B, L, C)``; ``cond_BD`` the class
    condition ``(B, D)`` (or, with ``shared_aln``, the shared ``(B, 1, 6, C)`` modulation); ``attn_bias`` /
    ``schedule`` as in :class:`SelfAttention`. With KV caching on (the official sampling loop) and in eval
    mode, a call is one scale of :meth:`sampling_step`, the step fastvar's Sampler runs too.
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

    def modulation(self, cond_BD: torch.Tensor, weights: Optional[BlockWeights] = None) -> torch.Tensor:
        """``(B, 1, 6, C)``: gamma1, gamma2, scale1, scale2, shift1, shift2 along dim 2. ``cond_BD``: the class
        condition ``(B, D)``, or with ``shared_aln`` the shared ``(B, 1, 6, C)`` modulation; ``weights``: those of
        :meth:`step_weights` (the result is then in their dtype) instead of the module's."""
        if self.shared_aln:
            return (self.ada_gss if weights is None else weights.ada[0]) + cond_BD
        if weights is None:
            return self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        w, b = weights.ada
        return F.linear(F.silu(cond_BD).to(w.dtype), w, b).view(-1, 1, 6, self.C)

    def _step_sources(self) -> Dict[str, object]:
        """The module tensors behind every :class:`BlockWeights` tensor field."""
        a, ffn = self.attn, self.ffn
        return dict(qkv_w=a.mat_qkv.weight, qkv_b=(a.q_bias, a.zero_k_bias, a.v_bias), proj_w=a.proj.weight,
                    proj_b=a.proj.bias, fc1_w=ffn.fc1.weight, fc1_b=ffn.fc1.bias, fc2_w=ffn.fc2.weight,
                    fc2_b=ffn.fc2.bias,
                    ada=(self.ada_gss,) if self.shared_aln else (self.ada_lin[1].weight, self.ada_lin[1].bias),
                    scale_mul=a.scale_mul_1H11 if a.attn_l2_norm else None)

    def step_weights(self, dtype: Optional[torch.dtype] = None) -> BlockWeights:
        """The tensors :meth:`sampling_step` reads: the module's own (``dtype`` None), else detached tensors in
        ``dtype`` (copies only where the dtype differs; ``scale_mul`` stays float32; ``qkv_b`` is always the
        concatenation, a copy: :meth:`sync_step_weights` refreshes it)."""
        def t(x, dt=dtype):
            return x if dt is None else x.detach().to(dt)

        src = self._step_sources()
        a = self.attn
        return BlockWeights(
            qkv_w=t(src["qkv_w"]), qkv_b=t(torch.cat(src["qkv_b"])), proj_w=t(src["proj_w"]), proj_b=t(src["proj_b"]),
            fc1_w=t(src["fc1_w"]), fc1_b=t(src["fc1_b"]), fc2_w=t(src["fc2_w"]), fc2_b=t(src["fc2_b"]),
            ada=tuple(t(x) for x in src["ada"]),
            scale_mul=None if src["scale_mul"] is None else t(src["scale_mul"], None if dtype is None else torch.float32),
            softmax_scale=float(a.scale), heads=a.num_heads, head_dim=a.head_dim, eps=self.ln_wo_grad.eps)

    def sync_step_weights(self, w: BlockWeights) -> None:
        """Copy the module's current values into ``w`` (made by :meth:`step_weights`) in place, so that a captured
        CUDA graph keeps reading ``w``; tensors that are the module's own are skipped."""
        for name, src in self._step_sources().items():
            dst = getattr(w, name)
            if name == "qkv_b":
                for d, s in zip(dst.chunk(3), src):
                    d.copy_(s)
            elif name == "ada":
                for d, s in zip(dst, src):
                    copy_unless_same(d, s)
            elif src is not None:
                copy_unless_same(dst, src)

    def sampling_step(self, x: torch.Tensor, h: torch.Tensor, mod: torch.Tensor, cache: KVCache, start: int,
                      weights: Optional[BlockWeights] = None,
                      next_adaln: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One scale of sampling through the block (no dropout), on its KV cache.

        Args:
            x: ``(N, l, C)`` residual stream (float32, or the compute dtype).
            h: ``LN(x) * (1 + scale1) + shift1``, the attention input (``ops.adaln_modulate``).
            mod: ``(N, 1, 6, C)`` :meth:`modulation`.
            cache, start: the block's :class:`KVCache`; this scale's keys go to ``[start, start + l)``.
            weights: :meth:`step_weights` (default: the module's own tensors).
            next_adaln: ``(scale, shift, eps)`` of the adaptive LayerNorm that follows (the next block's first or
                the head's): it is fused with this block's last residual.
        Returns:
            ``(x, h)``: the new residual stream, and the next LayerNorm's output (None without ``next_adaln``).
        """
        w = self.step_weights() if weights is None else weights
        g1, g2, _, s2, _, sh2 = mod.unbind(2)
        N, l, C = x.shape
        q, k, v = F.linear(h, w.qkv_w, w.qkv_b).view(N, l, 3, w.heads, w.head_dim).unbind(2)
        a = F.linear(cache.attend(q, k, v, start, w.softmax_scale, w.scale_mul).reshape(N, l, C), w.proj_w, w.proj_b)
        x, h = ops.gated_residual_adaln(x, a, g1, s2, sh2, w.eps)
        f = F.linear(F.gelu(F.linear(h, w.fc1_w, w.fc1_b), approximate="tanh"), w.fc2_w, w.fc2_b)
        if next_adaln is None:
            return x + f.mul(g2), None
        return ops.gated_residual_adaln(x, f, g2, *next_adaln)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                schedule: Optional[Schedule] = None) -> torch.Tensor:
        mod = self.modulation(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        if self.attn.caching and not self.training:
            h = ops.adaln_modulate(x, scale1, shift1, self.ln_wo_grad.eps)
            cache = self.attn.kv_cache
            x, _ = self.sampling_step(x, h, mod, cache, cache.length)
            cache.length += x.shape[1]
            return x
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1),
                                         attn_bias=attn_bias, schedule=schedule).mul_(gamma1))
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

    def step_weights(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The AdaLN projection ``(weight, bias)``: the module's own (``dtype`` None), else tensors in ``dtype``."""
        lin = self.ada_lin[1]
        return (lin.weight, lin.bias) if dtype is None else (lin.weight.detach().to(dtype), lin.bias.detach().to(dtype))

    def sync_step_weights(self, w: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy the projection's current values into ``w`` (made by :meth:`step_weights`) in place."""
        for d, s in zip(w, (self.ada_lin[1].weight, self.ada_lin[1].bias)):
            copy_unless_same(d, s)

    def modulation(self, cond_BD: torch.Tensor, weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> torch.Tensor:
        """``(B, 1, 2, C)``: scale, shift along dim 2, from the class condition ``(B, D)``, with the module's
        projection or ``weights`` (:meth:`step_weights`; the result is then in their dtype)."""
        if weights is None:
            return self.ada_lin(cond_BD).view(-1, 1, 2, self.C)
        return F.linear(F.silu(cond_BD).to(weights[0].dtype), *weights).view(-1, 1, 2, self.C)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond_BD).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
