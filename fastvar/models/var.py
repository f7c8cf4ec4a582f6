"""VAR, the next-scale prediction transformer (official ``VAR``), composed of fastvar's modules.

State-dict keys and public methods equal the official ones (VAR_SPEC.md section 2). This file is
composition only: the attention, quantizer and sampling work happens in ``fastvar.nn`` / ``fastvar.ops``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from fastvar.labels import check_labels, sampling_labels
from fastvar.nn.attention import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from fastvar.reference import attention as ref_attn
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
