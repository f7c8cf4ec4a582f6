"""Drop-in modules of the Infinity transformer with the official names (``infinity/models/basic.py``), so
official state dicts load both ways.

``FastRMSNorm``: ``weight``. ``CrossAttention``: ``mat_q`` (a parameter ``(1, H, c)`` for the attentive
pool, else a ``Linear``), ``mat_kv``, ``v_bias``, ``zero_k_bias``, ``proj``. ``SelfAttention``:
``mat_qkv``, ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``, ``proj``. ``CrossAttnBlock``:
``sa``, ``ca``, ``ffn.fc1``, ``ffn.fc2``, ``ca_norm``, ``ada_gss`` (shared AdaLN) or ``ada_lin.1``.
``MultipleLayers``: ``module.{j}``. The head's ``AdaLNBeforeHead``, ``FFN`` and ``SharedAdaLin`` are VAR's
(same names and computation), from :mod:`fastvar.nn.attention`.

Text conditioning arrives as ``ca_kv = (kv_compact (N, C), cu_seqlens_k (B + 1,) int32, max_seqlen_k)``.
The forwards take the official arguments (``attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid,
scale_ind``), so the official ``Infinity`` runs on these modules after ``fastvar.patch``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops
from fastvar.nn.attention import FFN, DropPath, copy_unless_same
from fastvar.reference import attention as ref_attn
from fastvar.reference import infinity as ref

CaKV = Tuple[torch.Tensor, torch.Tensor, int]


class FastRMSNorm(nn.Module):
    """RMSNorm of the text features (official ``FastRMSNorm``): ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, C: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.C, self.eps, self.elementwise_affine = C, eps, elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(C))
        else:
            self.register_buffer("weight", torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref.text_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"C={self.C}, eps={self.eps:g}, elementwise_affine={self.elementwise_affine}"


def _packed_cross_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """The official float32 -> bf16 -> float32 varlen call on fastvar's op."""
    def attend(q_, k_, v_, cq, ck, s):
        return ops.varlen_cross_attention(q_, k_, v_, cq, ck, s, max_seqlen_q=max_seqlen_q,
                                          max_seqlen_k=max_seqlen_k, validate=False)
    return ref.official_cross_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, attention=attend)


class CrossAttention(nn.Module):
    """Attention from image tokens (or, for the attentive pool, one learned query per prompt) to the packed
    text features (official ``CrossAttention``; ``cos_attn`` is forced off, as officially).

    ``forward(q, ca_kv)``: ``q`` ``(B, Lq, C)`` (ignored with ``for_attn_pool``); returns ``(B, Lq, C)``
    (``Lq = 1`` for the pool). Keys/values are ``mat_kv(kv_compact) + (0, v_bias)``; scale ``1/sqrt(c)``;
    each image's queries form one packed sequence over its prompt's tokens, computed as the official
    bfloat16 flash-attn call (see :func:`fastvar.reference.infinity.official_cross_attention`).
    """

    def __init__(self, for_attn_pool: bool = False, embed_dim: int = 768, kv_dim: int = 4096, num_heads: int = 12,
                 proj_drop: float = 0.0, cos_attn: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.for_attn_pool, self.embed_dim, self.kv_dim = for_attn_pool, embed_dim, kv_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn = False
        self.scale = 1 / self.head_dim ** 0.5
        if for_attn_pool:
            q = torch.empty(1, num_heads, self.head_dim)
            nn.init.trunc_normal_(q, mean=0, std=(1 / embed_dim / 3) ** 0.5)
            self.mat_q = nn.Parameter(q)
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()

    def forward(self, q: Optional[torch.Tensor], ca_kv: CaKV) -> torch.Tensor:
        kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
        N = kv_compact.shape[0]
        kv = F.linear(kv_compact, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(N, 2, self.num_heads, self.head_dim)
        if self.for_attn_pool:
            B, Lq = cu_seqlens_k.shape[0] - 1, 1
            q_compact = self.mat_q.repeat(B, 1, 1).to(kv.dtype)
        else:
            B, Lq = q.shape[:2]
            q_compact = self.mat_q(q).view(-1, self.num_heads, self.head_dim)
        cu_seqlens_q = torch.arange(0, Lq * (B + 1), Lq, dtype=torch.int32, device=q_compact.device)
        k, v = kv.unbind(dim=1)
        out = _packed_cross_attention(q_compact.contiguous(), k, v, cu_seqlens_q, cu_seqlens_k, Lq,
                                      int(max_seqlen_k), self.scale)
        return self.proj_drop(self.proj(out.reshape(B, Lq, -1)))

    def extra_repr(self) -> str:
        return f"Cq={self.embed_dim}, Ckv={self.kv_dim}, heads={self.num_heads}, pool={self.for_attn_pool}"


class TextAttentivePool(nn.Module):
    """The pooled text condition (official ``TextAttentivePool``): one learned query per prompt over its
    tokens; heads ``Ct5 // 128`` (``Ct5 // 64`` when ``D > 4096``). ``forward(ca_kv)`` -> ``(B, D)``."""

    def __init__(self, Ct5: int, D: int):
        super().__init__()
        self.Ct5, self.D = Ct5, D
        self.head_dim = 64 if D > 4096 else 128
        if Ct5 < self.head_dim or Ct5 % self.head_dim:
            raise ValueError(f"text_channels (C_t5={Ct5}) must be a multiple of {self.head_dim}: the attentive pool "
                             f"has C_t5 // {self.head_dim} heads")
        self.num_heads = Ct5 // self.head_dim
        self.ca = CrossAttention(for_attn_pool=True, embed_dim=D, kv_dim=Ct5, num_heads=self.num_heads)

    def forward(self, ca_kv: CaKV) -> torch.Tensor:
        return self.ca(None, ca_kv).squeeze(1)


class InfinityKVCache:
    """Preallocated keys and values of one self-attention layer for a whole sampling run: ``(B, H, capacity,
    c)`` storage (the layout of the official concatenated cache), handed to ``ops.kv_cached_attention`` as
    ``(B, capacity, H, c)`` views. ``length`` tokens are filled."""

    def __init__(self, B: int, H: int, capacity: int, c: int, dtype: torch.dtype, device):
        self.k = torch.empty(B, H, capacity, c, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0


def rope_rows(rope2d_freqs_grid, scale_schedule, scale_ind: int, length: int,
              device: torch.device) -> Optional[torch.Tensor]:
    """The ``(2, length, c/2)`` cos/sin rows of the tokens one call computes: those from scale ``scale_ind`` of
    ``scale_schedule`` on (the row after the tokens of the scales before it), as the official
    ``apply_rotary_emb`` slices them. ``rope2d_freqs_grid`` is the schedule's table ``(2, >= L, c/2)`` (fastvar's
    ``Infinity`` passes :func:`fastvar.reference.infinity.rope2d_table`), or the official model's dict of tables
    keyed by ``str(tuple(scale_schedule))``, each ``(2, 1, 1, 1, L', c/2)``; None: no rotation (as officially).
    A dict's table is moved to ``device`` once and kept there (in the dict, as the official code does); a table
    tensor's rows are copied to ``device`` when it lives elsewhere."""
    if rope2d_freqs_grid is None:
        return None
    if scale_schedule is None and (scale_ind or isinstance(rope2d_freqs_grid, Mapping)):
        raise ValueError("scale_schedule is required to find this call's RoPE rows (scale_ind > 0 or the official "
                         "dict of tables)")
    start = sum(ref.schedule_lens(list(scale_schedule)[:scale_ind])) if scale_ind else 0
    table = rope2d_freqs_grid
    if isinstance(table, Mapping):
        key = str(tuple(tuple(int(v) for v in s) for s in scale_schedule))
        if key not in table:
            raise ValueError(f"rope2d_freqs_grid has no table for scale_schedule {key}: the official tables cover "
                             f"the full template schedules only (fastvar.dynamic_resolution)")
        if table[key].device != device:
            table[key] = table[key].to(device)
        table = table[key]
        table = table.reshape(2, table.shape[-2], table.shape[-1])
    if table.dim() != 3 or table.shape[0] != 2 or start + length > table.shape[1]:
        raise ValueError(f"rope2d_freqs_grid: rows [{start}, {start + length}) of a (2, L, c/2) table are needed, got "
                         f"{tuple(table.shape)}")
    return table[:, start:start + length].to(device)


def kv_cached_rope_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                             scale_mul: torch.Tensor, rope: torch.Tensor, softmax_scale: float = 1.0) -> torch.Tensor:
    """Infinity's KV-cached self-attention of one scale: ``qkv`` ``(N, l, 3, H, c)`` the projection; q and k
    L2-normalised (q times ``exp(min(scale_mul, ln 100))``) and rotated by ``rope`` ``(2, l, c/2)``, keys and values
    written into the ``(N, H, capacity, c)`` caches at ``[start, start + l)``, the queries attending to all
    ``start + l`` cached tokens (``ops.kv_cached_attention``: norm and rotation fused in the Triton kernel).
    Returns ``(N, l, H, c)``."""
    q, k, v = qkv.unbind(2)
    return ops.kv_cached_attention(q, k, v, k_cache.transpose(1, 2), v_cache.transpose(1, 2), start,
                                   softmax_scale=softmax_scale, scale_mul=scale_mul, rope=rope)


class SelfAttention(nn.Module):
    """Infinity's self-attention (official ``SelfAttention`` with ``cos_attn=True``): q and k L2-normalised,
    q scaled by ``exp(min(scale_mul_1H11, ln 100))`` per head, 2D RoPE on both, softmax scale 1.

    ``forward(x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
    scale_ind=0)`` (official): ``x`` ``(B, L, C)``; the RoPE rows of x's tokens come from ``rope2d_freqs_grid``,
    ``scale_schedule`` and ``scale_ind`` (:func:`rope_rows`). Teacher forcing: ``attn_bias_or_two_vector`` the
    ``(1, 1, L, L)`` additive mask (the padded block-causal mask of the official forward). With
    ``kv_caching(True)`` every call is scale ``scale_ind`` of sampling: keys and values go into a cache
    preallocated for all the tokens of ``scale_schedule``, and the queries attend to all cached tokens.
    ``attn_fn`` (the official flex-attention function) is not called: in sampling the same attention runs on
    fastvar's ops; teacher forcing through it (no mask given) raises ``NotImplementedError``.
    """

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, proj_drop: float = 0.0, cos_attn: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not cos_attn:
            raise ValueError("cos_attn must be True: every released Infinity model uses cosine attention")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn = True
        self.scale = 1.0
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.caching = False
        self.kv_cache: Optional[InfinityKVCache] = None

    def kv_caching(self, enable: bool) -> None:
        """Start (True) or end (False) a sampling run; either way the previous cache is dropped."""
        self.caching, self.kv_cache = bool(enable), None

    def forward(self, x: torch.Tensor, attn_bias_or_two_vector: Optional[torch.Tensor], attn_fn=None,
                scale_schedule: Optional[Sequence[Sequence[int]]] = None, rope2d_freqs_grid=None,
                scale_ind: int = 0) -> torch.Tensor:
        B, L, C = x.shape
        H, c = self.num_heads, self.head_dim
        rope = rope_rows(rope2d_freqs_grid, scale_schedule, scale_ind, L, x.device)
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, H, c)
        if self.caching:       # the q/k norm and the rotation happen inside the step (fused in the Triton kernel)
            if scale_schedule is None:
                raise ValueError("with kv_caching(True), pass scale_schedule: the cache is sized for its tokens")
            cache = self.kv_cache
            if cache is None or cache.k.shape[0] != B:
                cache = self.kv_cache = InfinityKVCache(B, H, sum(ref.schedule_lens(scale_schedule)), c, qkv.dtype,
                                                        qkv.device)
            if cache.length + L > cache.k.shape[2]:
                raise ValueError(f"the KV cache holds the {cache.k.shape[2]} tokens of scale_schedule; {cache.length} "
                                 f"are used and this scale adds {L}")
            out = kv_cached_rope_attention(qkv, cache.k, cache.v, cache.length, self.scale_mul_1H11, rope, self.scale)
            cache.length += L
            out = out.reshape(B, L, C)
        else:
            if attn_fn is not None and attn_bias_or_two_vector is None:
                raise NotImplementedError("teacher forcing through the official flex-attention function (attn_fn, no "
                                          "mask): build the official model with use_flex_attn=False, whose padded "
                                          "dense mask gives the same result; sampling is unaffected")
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)                   # B, H, L, c
            q, k = ref.qk_norm(q, k, self.scale_mul_1H11)
            v = v.contiguous()
            if rope is not None:
                q, k = ref_attn.apply_rope2d(q, k, rope)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, scale=self.scale)
            out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, cos_attn=True, rope2d=True"


class CrossAttnBlock(nn.Module):
    """An Infinity block (official ``CrossAttnBlock``): AdaLN self-attention, cross-attention to the text,
    AdaLN FFN, with gated residuals.

    ``forward(x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
    rope2d_freqs_grid=None, scale_ind=0)`` (official): ``x`` ``(B, L, C)`` float32; ``cond_BD`` the shared
    ``(B, 1, 6, C)`` modulation (``shared_aln``) or the ``(B, D)`` condition; ``ca_kv`` the packed text keys
    source; the rest as :class:`SelfAttention`.
    """

    def __init__(self, embed_dim: int, kv_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, shared_aln: bool = True, drop: float = 0.0, drop_path: float = 0.0,
                 cross_attn_layer_scale: float = -1.0, cos_attn: bool = True):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.drop_path_rate = drop_path
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sa = SelfAttention(embed_dim=embed_dim, num_heads=num_heads, proj_drop=drop, cos_attn=cos_attn)
        self.ca = CrossAttention(embed_dim=embed_dim, kv_dim=kv_dim, num_heads=num_heads, proj_drop=drop)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio / 256) * 256, drop=drop)
        self.norm_eps = norm_eps
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=True)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))
        if cross_attn_layer_scale >= 0:
            self.ca_gamma = nn.Parameter(cross_attn_layer_scale * torch.ones(embed_dim))
        else:
            self.ca_gamma = 1

    def modulation(self, cond_BD: torch.Tensor):
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each ``(B, 1, C)``."""
        if self.shared_aln:
            return ref.shared_modulation(self.ada_gss, cond_BD)
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, ca_kv: CaKV,
                attn_bias_or_two_vector: Optional[torch.Tensor], attn_fn=None,
                scale_schedule: Optional[Sequence[Sequence[int]]] = None, rope2d_freqs_grid=None,
                scale_ind: int = 0) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        x_sa = ops.adaln_modulate(x, scale1, shift1, self.norm_eps).to(x.dtype)
        x_sa = self.sa(x_sa, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind)
        x = x + self.drop_path(x_sa.mul_(gamma1))
        ln = self.ca_norm          # in x's dtype whatever the weights' (autocast's float32 LayerNorm, also on CPU)
        x = x + self.ca(F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps),
                        ca_kv).mul_(self.ca_gamma)
        h = ops.adaln_modulate(x, scale2, shift2, self.norm_eps).to(x.dtype)
        return x + self.drop_path(self.ffn(h).mul(gamma2))

    # ------------------------------------------------------------------ sampling (fastvar.Sampler)
    def _step_sources(self) -> Dict[str, object]:
        """The module tensors behind every :class:`InfinityBlockWeights` tensor field (tuples are concatenated)."""
        sa, ca, ffn = self.sa, self.ca, self.ffn
        return dict(qkv_w=sa.mat_qkv.weight, qkv_b=(sa.q_bias, sa.zero_k_bias, sa.v_bias), proj_w=sa.proj.weight,
                    proj_b=sa.proj.bias, ca_q_w=ca.mat_q.weight, ca_q_b=ca.mat_q.bias, ca_kv_w=ca.mat_kv.weight,
                    ca_kv_b=(ca.zero_k_bias, ca.v_bias), ca_proj_w=ca.proj.weight, ca_proj_b=ca.proj.bias,
                    ca_norm_w=self.ca_norm.weight, ca_norm_b=self.ca_norm.bias, fc1_w=ffn.fc1.weight,
                    fc1_b=ffn.fc1.bias, fc2_w=ffn.fc2.weight, fc2_b=ffn.fc2.bias,
                    ada_gss=self.ada_gss if self.shared_aln else None, scale_mul=sa.scale_mul_1H11,
                    ca_gamma=self.ca_gamma if isinstance(self.ca_gamma, torch.Tensor) else None)

    def step_weights(self, dtype: Optional[torch.dtype] = None) -> InfinityBlockWeights:
        """The tensors :meth:`sampling_step` reads: the module's own (``dtype`` None; the biases concatenated), else
        detached tensors in ``dtype`` (copies only where the dtype differs; see :class:`InfinityBlockWeights`)."""
        if not self.shared_aln:
            raise ValueError("fastvar's Infinity sampler needs shared_aln=True (every released Infinity model)")

        def cast(name, x):
            if isinstance(x, tuple):
                x = torch.cat([t.detach() for t in x])
            dt = None if dtype is None else (torch.float32 if name in _FLOAT32_FIELDS else dtype)
            return x if dt is None else x.detach().to(dt)

        src = self._step_sources()
        w = {name: (None if x is None else cast(name, x)) for name, x in src.items()}
        if w["ca_gamma"] is None:
            w["ca_gamma"] = 1
        return InfinityBlockWeights(**w, heads=self.sa.num_heads, head_dim=self.sa.head_dim, eps=self.norm_eps,
                                    ca_eps=self.ca_norm.eps, ca_scale=self.ca.scale)

    def sync_step_weights(self, w: InfinityBlockWeights) -> None:
        """Copy the module's current values into ``w`` (made by :meth:`step_weights`) in place, so that captured
        CUDA graphs keep reading ``w``; tensors that are the module's own are skipped."""
        for name, src in self._step_sources().items():
            dst = getattr(w, name)
            if isinstance(src, tuple):
                for d, s in zip(dst.split([t.shape[0] for t in src]), src):
                    d.copy_(s)
            elif src is not None:
                copy_unless_same(dst, src)

    @staticmethod
    def text_kv(kv_compact: torch.Tensor, w: InfinityBlockWeights) -> torch.Tensor:
        """The cross-attention keys and values of the text, ``(N, 2C)`` in the weights' dtype: they do not change
        across scales, so the Sampler computes them once per sample (the official loop, on every scale)."""
        return F.linear(kv_compact.to(w.ca_kv_w.dtype), w.ca_kv_w, w.ca_kv_b)

    def sampling_step(self, x: torch.Tensor, mod: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      start: int, w: InfinityBlockWeights, text_kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_k: int, rope: torch.Tensor) -> torch.Tensor:
        """One scale of sampling through the block (eval, no dropout), the official op order on static tensors.

        Args:
            x: ``(N, l, C)`` float32 residual stream.
            mod: ``(N, 1, 6, C)`` the modulation ``ada_gss + gss`` (computed once per sample), compute dtype.
            k_cache, v_cache: ``(N, H, capacity, c)`` this block's caches; the scale's keys (normalised, rotated)
                and values go to ``[start, start + l)``.
            w: :meth:`step_weights`. text_kv: ``(>= N_text, 2C)`` :meth:`text_kv` rows of the packed prompts.
            cu_seqlens_q: ``(N + 1,)`` int32 ``[0, l, 2l, ...]``; cu_seqlens_k ``(N + 1,)`` int32 the prompts'
                offsets; max_seqlen_k the longest prompt.
            rope: ``(2, l, c/2)`` the cos/sin rows of the scale's tokens.
        Returns the new ``(N, l, C)`` float32 residual stream.
        """
        g1, g2, s1, s2, sh1, sh2 = mod.unbind(2)
        N, l, C = x.shape
        H, c = w.heads, w.head_dim
        h = ops.adaln_modulate(x, s1, sh1, w.eps)
        qkv = F.linear(h, w.qkv_w, w.qkv_b).view(N, l, 3, H, c)
        a = kv_cached_rope_attention(qkv, k_cache, v_cache, start, w.scale_mul, rope)
        x = x + F.linear(a.reshape(N, l, C), w.proj_w, w.proj_b).mul_(g1)
        # cross-attention to the text: LayerNorm in float32, the packed call as the module makes it
        cq = F.linear(F.layer_norm(x, (C,), w.ca_norm_w, w.ca_norm_b, w.ca_eps).to(w.ca_q_w.dtype), w.ca_q_w, w.ca_q_b)
        k_t, v_t = text_kv.view(-1, 2, H, c).unbind(dim=1)        # rows past the prompts are never read
        ca = _packed_cross_attention(cq.view(-1, H, c).contiguous(), k_t, v_t, cu_seqlens_q, cu_seqlens_k, l,
                                     int(max_seqlen_k), w.ca_scale)
        x = x + F.linear(ca.reshape(N, l, C), w.ca_proj_w, w.ca_proj_b).mul_(w.ca_gamma)
        h = ops.adaln_modulate(x, s2, sh2, w.eps)
        f = F.linear(F.gelu(F.linear(h, w.fc1_w, w.fc1_b), approximate="tanh"), w.fc2_w, w.fc2_b)
        return x + f.mul(g2)

    def extra_repr(self) -> str:
        gamma = "<learnable>" if isinstance(self.ca_gamma, nn.Parameter) else self.ca_gamma
        return f"shared_aln={self.shared_aln}, ca_gamma={gamma}"


@dataclasses.dataclass
class InfinityBlockWeights:
    """A block's tensors for :meth:`CrossAttnBlock.sampling_step`: the module's own, or copies cast once to a
    compute dtype (the Sampler's). ``qkv_b`` / ``ca_kv_b`` are the official concatenated biases (always a copy);
    ``scale_mul``, ``ca_norm_w`` / ``ca_norm_b`` and ``ada_gss`` stay float32 (the official autocast runs the
    LayerNorm and the modulation sum in float32); ``ca_gamma`` is the constant 1 or the layer-scale tensor."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ca_q_w: torch.Tensor
    ca_q_b: torch.Tensor
    ca_kv_w: torch.Tensor
    ca_kv_b: torch.Tensor
    ca_proj_w: torch.Tensor
    ca_proj_b: torch.Tensor
    ca_norm_w: torch.Tensor
    ca_norm_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    ada_gss: Optional[torch.Tensor]
    scale_mul: torch.Tensor
    ca_gamma: Union[int, torch.Tensor]
    heads: int
    head_dim: int
    eps: float
    ca_eps: float
    ca_scale: float


# fields kept in float32 whatever the compute dtype
_FLOAT32_FIELDS = ("ca_norm_w", "ca_norm_b", "ada_gss", "scale_mul")


class MultipleLayers(nn.Module):
    """A chunk of consecutive blocks (official ``MultipleLayers``): ``module.{j}``."""

    def __init__(self, blocks, num_blocks_in_a_chunk: int, index: int):
        super().__init__()
        self.module = nn.ModuleList(blocks[index:index + num_blocks_in_a_chunk])

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                checkpointing_full_block: bool = False, rope2d_freqs_grid=None):
        """The official chunk call (teacher forcing: the RoPE table from row 0, no checkpointing in fastvar)."""
        if checkpointing_full_block:
            raise NotImplementedError("checkpointing_full_block: fastvar's Infinity blocks do not checkpoint")
        for m in self.module:
            x = m(x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid)
        return x
