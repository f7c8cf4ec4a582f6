"""VAR, the next-scale prediction transformer (official ``VAR``), composed of fastvar's modules.

State-dict keys and public methods equal the official ones (VAR_SPEC.md section 2). This file is
composition only: the attention, quantizer and sampling work happens in ``fastvar.nn`` / ``fastvar.ops``.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops
from fastvar.labels import check_labels, sampling_labels
from fastvar.nn.attention import AdaLNBeforeHead, AdaLNSelfAttn, KVCache, SharedAdaLin, copy_unless_same
from fastvar.reference import attention as ref_attn
from fastvar.reference import sampling as ref_sampling
from fastvar.reference.quantize import scale_ratio
from fastvar.settings import SamplingSettings, check_seed
from fastvar.schedule import ScaleSpec, Schedule


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Args (official): ``vae_local`` (a VQVAE; kept by reference, not as a submodule), ``num_classes``,
    ``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``, ``drop_rate``, ``attn_drop_rate``,
    ``drop_path_rate``, ``norm_eps``, ``shared_aln``, ``cond_drop_rate``, ``attn_l2_norm``,
    ``patch_nums`` (the schedule; must equal the VQVAE's), ``flash_if_available`` and
    ``fused_if_available`` (accepted for compatibility; fastvar always uses its own kernels).
    """

    def __init__(self, vae_local, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                 num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = False,
                 patch_nums: Sequence[ScaleSpec] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available: bool = True, fused_if_available: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for arg, value in (("num_classes", num_classes), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not (isinstance(norm_eps, (int, float)) and math.isfinite(norm_eps) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a finite number > 0 (LayerNorm's epsilon), got {norm_eps!r}")
        quant = vae_local.quantize
        schedule = Schedule.of(patch_nums)
        if schedule != quant.schedule:
            raise ValueError(f"patch_nums {schedule.patch_nums} must equal the VQVAE's schedule "
                             f"v_patch_nums {quant.schedule.patch_nums}")
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.prog_si = -1
        self.schedule = schedule
        self.patch_nums = schedule.patch_nums
        self.L, self.first_l = schedule.L, schedule.first_l
        self.begin_ends = list(schedule.spans)
        self.num_stages_minus_1 = len(schedule) - 1
        self.rng: Optional[torch.Generator] = None   # made on the model's device at the first seeded sample
        # the sampling settings this model is meant for (fastvar.Sampler's defaults; None: the released
        # checkpoints', see fastvar.settings.default_settings); the bundled digits model sets its own
        self.recommended_settings: Optional[SamplingSettings] = None

        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (quant,)
        self.word_embed = nn.Linear(self.Cvae, self.C)

        init_std = math.sqrt(1 / self.C / 3)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_1LC.data, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(schedule), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
                               if shared_aln else nn.Identity())
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.drop_path_rate = drop_path_rate
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(cond_dim=self.D, shared_aln=shared_aln, block_idx=i, embed_dim=self.C,
                          norm_layer=norm_layer, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop_rate,
                          attn_drop=attn_drop_rate, drop_path=dpr[i], last_drop_p=0 if i == 0 else dpr[i - 1],
                          attn_l2_norm=attn_l2_norm)
            for i in range(depth)
        ])
        for b in self.blocks:
            b.attn.cache_capacity = self.L
        self.using_fused_add_norm_fn = False

        self.register_buffer("lvl_1L", torch.empty(1, self.L, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.empty(1, 1, self.L, self.L))
        self.reset_buffers()
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    def reset_buffers(self) -> None:
        """(Re)compute ``lvl_1L`` and ``attn_bias_for_masking`` from the schedule (after ``to_empty``)."""
        dev = self.lvl_1L.device
        self.lvl_1L.copy_(ref_attn.scale_index(self.schedule.lens, dev)[None])
        self.attn_bias_for_masking.copy_(ref_attn.block_causal_bias(self.schedule.lens, dev)[None, None])

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = 0.02, conv_std_or_gain: float = 0.02, fast: bool = False) -> None:
        """The official initialisation (truncated normals, scaled AdaLN and head).

        ``fast=True`` is for benchmarks, whose speed does not depend on weight values: every tensor is
        filled by tiling one block of 2^20 uniform draws (same standard deviations as the official
        init), at memory speed. Drawing fresh values costs 1.2 s per 500M (uniform) to 5 s (truncated
        normal) on 2 CPU cores, i.e. 10-50 s for the 2B-parameter released sizes.
        """
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        block = torch.empty(1 << 20, device=self.pos_1LC.device).uniform_(-3 ** 0.5, 3 ** 0.5) if fast else None

        def draw(t: torch.Tensor, std: float) -> None:
            if block is None:
                nn.init.trunc_normal_(t, std=std)
                return
            flat = t.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start:start + block.numel()]
                chunk.copy_(block[:chunk.numel()]).mul_(std)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                draw(m.weight.data, init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                draw(m.weight.data, init_std)
                if m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.data.fill_(1.0)
                if m.bias is not None:
                    m.bias.data.zero_()
        for p in (self.pos_start, self.pos_1LC):
            draw(p.data, (1 / self.C / 3) ** 0.5)
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        depth = len(self.blocks)
        for sab in self.blocks:
            sab.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            sab.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            sab.attn.q_bias.data.zero_()
            sab.attn.v_bias.data.zero_()
            sab.attn.zero_k_bias.zero_()
            if sab.attn.attn_l2_norm:
                sab.attn.scale_mul_1H11.data.fill_(math.log(4.0))
            if hasattr(sab, "ada_lin"):
                sab.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                sab.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                sab.ada_lin[-1].bias.data.zero_()
            else:
                draw(sab.ada_gss.data, 1 / self.C ** 0.5)
                sab.ada_gss.data[:, :, 2:].mul_(init_adaln)
                sab.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)

    # ------------------------------------------------------------------ helpers
    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head: ``(B, L, C)`` hidden states -> ``(B, L, V)`` float32 logits."""
        if not isinstance(h, torch.Tensor):   # the official fused-add-norm form (h, residual)
            h, resi = h
            h = resi + self.blocks[-1].drop_path(h)
        dtype = self.head.weight.dtype
        return self.head(self.head_nm(h.to(dtype), cond_BD.to(dtype))).float()

    def _check_labels(self, label_B: torch.Tensor, name: str, B: Optional[int] = None) -> torch.Tensor:
        return check_labels(label_B, self.num_classes, name, B, self.lvl_1L.device)

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. ``label_B`` ``(B,)``; ``x_BLCv_wo_first_l`` ``(B, L - first_l, Cvae)`` (the
        output of ``quantize.idxBl_to_var_input``). Returns ``(B, L, V)`` float32 logits.

        As in the official code, each label is replaced by the no-class id with probability
        ``cond_drop_rate`` (drawn from the global RNG, also in eval mode): set it to 0 for deterministic logits.
        """
        B = x_BLCv_wo_first_l.shape[0]
        expected = (B, self.L - self.first_l, self.Cvae)
        if x_BLCv_wo_first_l.dim() != 3 or tuple(x_BLCv_wo_first_l.shape[1:]) != expected[1:]:
            raise ValueError(f"x_BLCv_wo_first_l must have shape (B, L - first_l = {expected[1]}, Cvae = {self.Cvae}), "
                             f"got {tuple(x_BLCv_wo_first_l.shape)}")
        label_B = self._check_labels(label_B, "label_B", B)
        dtype = self.class_emb.weight.dtype
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(dtype))), dim=1)
            x_BLC += self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        # the compute dtype: float16/bfloat16 under autocast, else the weights' dtype
        main_type = torch.matmul(x_BLC.new_ones(8, 8), x_BLC.new_ones(8, 8)).dtype
        x_BLC, cond_BD_or_gss = x_BLC.to(main_type), cond_BD_or_gss.to(main_type)
        # the blocks take the schedule itself: the dense mask buffer is kept for the official state dict only
        for b in self.blocks:
            x_BLC = b(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=None, schedule=self.schedule)
        return self.get_logits(x_BLC, cond_BD)

    # ------------------------------------------------------------------ sampling
    def _sampling_labels(self, B: int, label_B, rng: Optional[torch.Generator], name: str = "label_B") -> torch.Tensor:
        return sampling_labels(B, label_B, self.num_classes, rng, self.lvl_1L.device, name)

    def _generator(self, g_seed: Optional[int]) -> Optional[torch.Generator]:
        if g_seed is None:
            return None
        device = self.lvl_1L.device
        g_seed = check_seed(g_seed, "g_seed")
        if self.rng is None or self.rng.device != device:
            self.rng = torch.Generator(device=device)
        self.rng.manual_seed(g_seed)
        return self.rng

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: Optional[Union[int, torch.LongTensor]],
                                 g_seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                                 more_smooth: bool = False) -> torch.Tensor:
        """Sample ``B`` images with classifier-free guidance; returns ``(B, 3, H, W)`` in [0, 1].

        ``label_B``: None (random classes from the generator), an int (all the same; negative = no
        class) or a ``(B,)`` tensor. ``g_seed`` seeds the model's generator (None: the global RNG).
        ``cfg`` guidance strength, ``top_k`` / ``top_p`` filtering (0 disables), ``more_smooth``:
        Gumbel-softmax-weighted codes instead of sampled ones (for visualisation).

        Runs on a :class:`~fastvar.sampler.Sampler` the model keeps (weights cast once per compute dtype) whose
        KV caches are freed on return, as the official method frees its own. To sample repeatedly at speed, keep
        a ``fastvar.Sampler(var, vae)``: its KV caches and CUDA graphs are reused from one call to the next.
        """
        images, _ = self._infer(B, label_B, g_seed, cfg, top_k, top_p, more_smooth)
        return images

    def _infer(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, decode: bool = True,
               generator: Optional[torch.Generator] = None):
        """``autoregressive_infer_cfg`` on fastvar's :class:`~fastvar.sampler.Sampler` (in the weights' dtype, or
        the autocast dtype under ``torch.autocast``; without CUDA graphs), returning ``(images or None, tokens per
        scale)``; records ``self.last_f_hat``. ``generator`` (instead of ``g_seed``) continues from a generator's
        state. The Sampler (its weight casts) is kept for the next call, for the same compute dtype; its buffers
        (the KV caches) are freed on return, as the official method frees its caches."""
        from fastvar.sampler import Sampler
        device_type = self.lvl_1L.device.type
        # under torch.autocast (as the official demo runs) compute in the autocast dtype, else the weights'
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.head.weight.dtype
        sampler = getattr(self, "_sampler", None)
        if sampler is None or sampler.dtype != dtype or sampler.device != self.lvl_1L.device:
            sampler = self._sampler = Sampler(self, dtype=dtype, cuda_graphs=False)
        rng = generator if generator is not None else self._generator(g_seed)
        sampler.settings(cfg, top_k, top_p, more_smooth)
        label_B = self._sampling_labels(B, label_B, rng)
        try:
            results = list(sampler.stream(label_B, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, B=B,
                                          generator=rng))
        finally:
            sampler.free(empty_cache=False)
        self.last_f_hat = results[-1].f_hat
        return (results[-1].preview() if decode else None), [r.tokens for r in results]

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, L={self.L}, drop_path_rate={self.drop_path_rate:g}"


# ---------------------------------------------------------------------------------------- sampling
def tensor_slots(*modules: nn.Module) -> List[Tuple[dict, str]]:
    """Every parameter and buffer of ``modules`` as (its module's ``_parameters`` / ``_buffers``, name): read
    through these, a tensor the model replaces is seen (walking ``parameters()`` again costs ~0.75 ms per
    sample for d30 on a 2-core CPU; these lookups ~0.1 ms)."""
    return [(d, name) for mod in modules for m in mod.modules() for d in (m._parameters, m._buffers)
            for name, t in d.items() if t is not None]


def weights_fingerprint(slots: List[Tuple[dict, str]]) -> tuple:
    """Where each tensor lives and how often it was modified in place (its version counter): it changes
    with an optimizer step, ``load_state_dict``, ``.to()``, a replaced parameter or an in-place edit of the
    tensor. (Inference tensors have no version counter; they cannot change outside inference mode.)"""
    out = []
    for d, name in slots:
        t = d.get(name)
        out.append(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version))
    return tuple(out)


class VARAdapter:
    """A VAR as :class:`fastvar.Sampler` drives it: fastvar's ``VAR`` or an official one after ``fastvar.patch``.

    Holds the weights in the compute ``dtype`` (the model's own tensors where they already have it, casts
    otherwise) and the per-batch buffers' layout, and does the model's part of every scale: the per-sample
    conditioning (AdaLN modulation of every block and of the head, computed once per sample: the condition
    never changes across scales), the transformer on the scale's tokens (:meth:`AdaLNSelfAttn.sampling_step` per
    block, on KV caches preallocated for the whole schedule), the draw (CFG + top-k/top-p + the categorical
    draw fused), and the quantizer's step to the next scale's input. The embeddings, the residual stream and
    f_hat stay float32, as in the official sampling under ``torch.autocast`` (embeddings are not autocast, and
    each block's low-precision output is added to the float32 stream).

    ``fused_conv``: the quantizer step computes Phi's convolution inside its Triton kernel
    (``ops.upsample_accumulate_``).
    """

    def __init__(self, var: nn.Module, vae: nn.Module, dtype: torch.dtype, fused_conv: bool = False):
        schedule = getattr(var, "schedule", None)
        if not isinstance(schedule, Schedule) or not hasattr(var, "blocks"):
            raise TypeError(f"{type(var).__name__} is not a VAR fastvar can sample: expected fastvar.VAR or an "
                            "official VAR patched by fastvar.patch")
        quant = getattr(vae, "quantize", None)
        if not hasattr(quant, "get_next_autoregressive_input_from_idx"):
            raise TypeError("the VQVAE's quantizer is not fastvar's: call fastvar.patch(model) first")
        if not all(isinstance(b, AdaLNSelfAttn) for b in var.blocks) or not isinstance(var.head_nm, AdaLNBeforeHead):
            raise TypeError("the VAR's blocks are not fastvar's: call fastvar.patch(model) first")
        if quant.schedule != schedule:
            raise ValueError(f"the VQVAE's schedule {quant.schedule.patch_nums} differs from the VAR's "
                             f"{schedule.patch_nums}")
        self.var, self.vae, self.quant, self.schedule = var, vae, quant, schedule
        self.dtype, self.fused_conv, self.device = dtype, bool(fused_conv), var.lvl_1L.device
        self.V, self.C, self.Cvae, self.num_classes = var.V, var.C, var.Cvae, var.num_classes
        # the CUDA graphs read the VQVAE's codebook and Phi as well as the transformer's weights
        self.slots = tensor_slots(var, vae)
        self.fingerprint = weights_fingerprint(self.slots)
        shared = None if isinstance(var.shared_ada_lin, nn.Identity) else var.shared_ada_lin[1]
        # (held tensor, model tensor): the embeddings in float32, the rest in the compute dtype
        sources = [(torch.float32, var.class_emb.weight), (torch.float32, var.pos_start),
                   (torch.float32, var.pos_1LC), (torch.float32, var.lvl_embed.weight),
                   (dtype, var.word_embed.weight), (dtype, var.word_embed.bias), (dtype, var.head.weight),
                   (dtype, var.head.bias)] + ([(dtype, shared.weight), (dtype, shared.bias)] if shared else [])
        with torch.inference_mode(False), torch.no_grad():    # the held tensors are refreshed in place later
            self._pairs = [(t.detach().to(dt), t) for dt, t in sources]
            self.blocks = list(var.blocks)
            self.block_weights = [b.step_weights(dtype) for b in self.blocks]
            self.head_nm, self.head_ada = var.head_nm, var.head_nm.step_weights(dtype)
        held = [h for h, _ in self._pairs]
        self.class_emb, self.pos_start, self.pos_1LC, self.lvl_embed = held[:4]
        self.word, self.head = tuple(held[4:6]), tuple(held[6:8])
        self.shared = tuple(held[8:10]) if shared else None

    def stale(self) -> bool:
        """True once a tensor of the model or the VQVAE was replaced or moved since this adapter was built (its
        held tensors would point at the old ones): the Sampler then builds a new adapter."""
        now = weights_fingerprint(self.slots)
        return [f and f[0] for f in now] != [f and f[0] for f in self.fingerprint]

    def sync(self, always: bool = True) -> None:
        """Copy the model's current values into the held casts and derived tensors, in place (captured CUDA graphs
        keep reading them). ``always=False`` skips it unless a version counter moved (an in-place edit through
        torch: an optimizer step, ``load_state_dict``, ``p.copy_``), which misses edits through ``.data`` and of
        inference tensors; ``always=True`` sees every edit, for one read of every weight and one write of the
        casts (nothing but ``qkv_b`` when the compute dtype is the weights' own)."""
        now = weights_fingerprint(self.slots)
        if not always and now == self.fingerprint:
            return
        with torch.inference_mode(False), torch.no_grad():
            for held, t in self._pairs:
                copy_unless_same(held, t)
            for b, w in zip(self.blocks, self.block_weights):
                b.sync_step_weights(w)
            self.head_nm.sync_step_weights(self.head_ada)
        self.fingerprint = now

    def weight_bytes(self) -> int:
        """Bytes of the held tensors that are not the model's own (casts, and the concatenated qkv biases)."""
        own = {t.data_ptr() for d, name in self.slots if (t := d.get(name)) is not None}
        held = [h for h, _ in self._pairs] + list(self.head_ada)
        for w in self.block_weights:
            for f in dataclasses.fields(w):
                v = getattr(w, f.name)
                held += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in held}.values() if t.data_ptr() not in own)

    # ------------------------------------------------------------------ per batch size
    def buffers(self, B: int) -> "VARBuffers":
        return VARBuffers(self, B)

    # ------------------------------------------------------------------ per sample
    def condition(self, buf: "VARBuffers", labels: torch.Tensor) -> None:
        """Class condition of ``labels`` ``(B,)`` (and the no-class half of CFG): every block's and the head's
        modulation, the positions, the first scale's input; f_hat zeroed."""
        B, C = buf.B, self.C
        buf.labels[:B].copy_(labels)
        buf.labels[B:].fill_(self.num_classes)
        cond = F.embedding(buf.labels, self.class_emb)                            # (2B, C) float32
        block_cond = cond if self.shared is None else \
            F.linear(F.silu(cond).to(self.dtype), *self.shared).view(-1, 1, 6, C)
        for mod, b, w in zip(buf.mods, self.blocks, self.block_weights):
            mod.copy_(b.modulation(block_cond, w))
        buf.head_mod.copy_(self.head_nm.modulation(cond, self.head_ada))
        buf.lvl_pos.copy_(F.embedding(self.var.lvl_1L, self.lvl_embed) + self.pos_1LC)
        first = self.schedule.first_l
        buf.x_in[0].copy_(cond.unsqueeze(1).expand(2 * B, first, -1) + self.pos_start.expand(2 * B, first, -1)
                          + buf.lvl_pos[:, :first])
        buf.f_hat.zero_()

    def draw_noise(self, buf: "VARBuffers", si: int, rng: Optional[torch.Generator], more_smooth: bool) -> None:
        """Scale ``si``'s random numbers, in the official order: the Exp(1) draw ``torch.multinomial`` makes,
        then (``more_smooth``) the Gumbel noise."""
        buf.noise(si).exponential_(generator=rng)
        if more_smooth:
            buf.gumbel(si).exponential_(generator=rng)

    # ------------------------------------------------------------------ per scale
    def logits(self, buf: "VARBuffers", si: int) -> torch.Tensor:
        """Every block and the head on scale ``si``'s tokens: float32 logits ``(2B, l, V)``."""
        x, start, mods = buf.x_in[si], self.schedule.spans[si][0], buf.mods
        ws = self.block_weights
        h = ops.adaln_modulate(x, mods[0][:, :, 2], mods[0][:, :, 4], ws[0].eps)
        for i, (b, w) in enumerate(zip(self.blocks, ws)):
            if i + 1 < len(ws):
                nxt = (mods[i + 1][:, :, 2], mods[i + 1][:, :, 4], ws[i + 1].eps)
            else:
                nxt = (buf.head_mod[:, :, 0], buf.head_mod[:, :, 1], self.head_nm.ln_wo_grad.eps)
            x, h = b.sampling_step(x, h, mods[i], buf.caches[i], start, w, nxt)
        return F.linear(h, *self.head).float()

    def step(self, buf: "VARBuffers", si: int, settings: SamplingSettings) -> None:
        """One scale on the static buffers: transformer, CFG + top-k/top-p + draw, codes, f_hat, next input."""
        B, S = buf.B, len(self.schedule)
        ratio = scale_ratio(si, S)
        ph, pw = self.schedule.hws[si]
        # CFG mix, top-k, top-p and the draw (argmax(p / noise), the draw torch.multinomial makes) fused; on CUDA
        # a bad row draws -1 without a sync, checked once per sample (check_tokens)
        drawn = ops.sample_cfg_top_k_top_p(self.logits(buf, si), settings.cfg * ratio, settings.top_k,
                                           settings.top_p, noise=buf.noise(si), return_filtered=settings.more_smooth,
                                           validate=self.device.type != "cuda")
        tokens, logits = drawn if settings.more_smooth else (drawn, None)
        buf.tokens[si].copy_(tokens)
        tokens = tokens.clamp(0, self.V - 1)        # never index past the codebook, even on a bad row
        if settings.more_smooth:
            g = (logits.mul(1 + ratio) + (-buf.gumbel(si).log())) / ref_sampling.smooth_tau(ratio)
            codes = (g.softmax(-1) @ self.quant.embedding.weight.unsqueeze(0)).transpose_(1, 2)
            _, nxt = self.quant.get_next_autoregressive_input(si, S, buf.f_hat, codes.reshape(B, self.Cvae, ph, pw),
                                                              fused_conv=self.fused_conv)
        else:   # the codes are gathered inside the upsample kernel: no (B, Cvae, h, w) map
            _, nxt = self.quant.get_next_autoregressive_input_from_idx(si, S, buf.f_hat, tokens, validate=False,
                                                                       fused_conv=self.fused_conv)
        if si + 1 < S:
            b0, b1 = self.schedule.spans[si + 1]
            x_next = F.linear(nxt.view(B, self.Cvae, -1).transpose(1, 2).to(self.dtype), *self.word)
            x_next = x_next + buf.lvl_pos[:, b0:b1]
            buf.x_in[si + 1][:B].copy_(x_next)
            buf.x_in[si + 1][B:].copy_(x_next)

    def check_tokens(self, buf: "VARBuffers") -> None:
        """On CUDA the draw does not stop the GPU to validate logits: a row of NaN, +inf or only -inf logits
        draws -1. One check per sample turns that into a clear error."""
        for si, t in enumerate(buf.tokens):
            if bool((t < 0).any()):
                raise ValueError(f"the logits of scale {si} hold NaN, +inf or a row that is entirely -inf "
                                 "(a diverged model or weights?); cannot sample")

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, Cvae, H, W)`` latent -> images ``(B, 3, H_img, W_img)`` in [0, 1]; ``ValueError`` if they hold NaN
        or inf (one read back: a decode is not on the per-scale path), which would become a black picture."""
        dtype = next(p.dtype for p in self.vae.parameters() if p.is_floating_point())
        images = self.vae.fhat_to_img(f_hat.to(dtype)).add_(1).mul_(0.5)
        if not bool(torch.isfinite(images).all()):
            where = "the latent f_hat already does (the codebook or Phi?)" if not bool(torch.isfinite(f_hat).all()) \
                else "from a finite latent: the VQVAE's decoder weights, or an overflow in its dtype"
            raise ValueError(f"the decoded images hold NaN or inf ({where}); no image is returned")
        return images


class VARBuffers:
    """Static buffers of one batch size ``B``: the KV caches, the per-sample modulation, the per-scale inputs,
    noise and tokens, and f_hat. CUDA graphs captured on them replay for every sample of that batch size.

    One noise buffer serves every scale (each scale draws into it just before it runs): ``B*l*V`` float32 per
    scale would be 0.7 GB at B = 64 and 256 px, 2.3 GB at 512 px.
    """

    def __init__(self, m: VARAdapter, B: int):
        dev, dt, C, L, V = m.device, m.dtype, m.C, m.schedule.L, m.V
        lens = m.schedule.lens
        self.B, self.lens, self.V = B, lens, V
        with torch.inference_mode(False):      # usable inside and outside inference mode alike
            self.caches = [KVCache(L, w.heads, w.head_dim).allocate(2 * B, dt, dev) for w in m.block_weights]
            self.labels = torch.zeros(2 * B, dtype=torch.long, device=dev)
            self.mods = torch.empty(len(m.blocks), 2 * B, 1, 6, C, dtype=dt, device=dev)
            self.head_mod = torch.empty(2 * B, 1, 2, C, dtype=dt, device=dev)
            self.lvl_pos = torch.empty(1, L, C, dtype=torch.float32, device=dev)
            self.x_in = [torch.empty(2 * B, n, C, dtype=torch.float32, device=dev) for n in lens]
            # ones, not empty: the graph warm-up runs every scale step before later scales' noise is drawn,
            # and a NaN from uninitialised memory would make the draw pick a column past V
            self._noise = torch.ones(B * max(lens) * V, dtype=torch.float32, device=dev)
            self._gumbel: Optional[torch.Tensor] = None
            self.tokens = [torch.empty(B, n, dtype=torch.long, device=dev) for n in lens]
            self.f_hat = torch.zeros(B, m.Cvae, *m.schedule.hws[-1], dtype=torch.float32, device=dev)

    def noise(self, si: int) -> torch.Tensor:
        """``(B*l, V)`` view for scale ``si``: the Exp(1) draw of ``torch.multinomial``."""
        return self._noise[: self.B * self.lens[si] * self.V].view(self.B * self.lens[si], self.V)

    def gumbel(self, si: int) -> torch.Tensor:
        """``(B, l, V)`` view for scale ``si``: the Gumbel noise of ``more_smooth`` (allocated on first use)."""
        if self._gumbel is None:
            with torch.inference_mode(False):
                self._gumbel = torch.ones_like(self._noise)
        return self._gumbel[: self.B * self.lens[si] * self.V].view(self.B, self.lens[si], self.V)

    def nbytes(self) -> int:
        tensors = [*self.x_in, *self.tokens, self.labels, self.mods, self.head_mod, self.lvl_pos, self._noise,
                   self.f_hat] + ([self._gumbel] if self._gumbel is not None else [])
        return sum(c.nbytes() for c in self.caches) + sum(t.numel() * t.element_size() for t in tensors)
