"""Infinity, the bitwise next-scale text-to-image transformer (official ``Infinity`` of
``infinity/models/infinity.py``), composed of fastvar's modules.

State-dict keys and the public methods (``forward``, ``autoregressive_infer_cfg``, ``get_logits``) equal the
official ones (INFINITY_SPEC.md sections 4, 7, 11). Text conditioning is an input: the official tuple
``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)`` of (T5) text features; no text encoder is loaded.
This file is composition only: attention, AdaLN, RoPE and the bit sampler live in ``fastvar.nn`` /
``fastvar.ops`` / ``fastvar.reference``.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastvar import ops
from fastvar import dynamic_resolution as schedules
from fastvar.nn.attention import AdaLNBeforeHead, SharedAdaLin
from fastvar.nn.infinity import CrossAttnBlock, FastRMSNorm, MultipleLayers, TextAttentivePool
from fastvar.reference import infinity as ref
from fastvar.reference.attention import scale_index
from fastvar.utils.images import check_decoded

TextTuple = Tuple[torch.Tensor, Sequence[int], torch.Tensor, int]

# Official constructor arguments fastvar accepts only at these values (every released model uses them).
_FIXED = dict(rms_norm=False, head_aln=True, nm0=False, cos_attn=True, swiglu=False, head_depth=1, use_bit_label=1,
              rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, tau=1, fused_mlp=False, rand_uncond=False)


class Infinity(nn.Module):
    """Text-conditioned bitwise next-scale prediction transformer.

    Args (official names; ``vae_local`` is the BSQ VAE, only its ``embed_dim`` is read): ``text_channels``
    C_t5, ``text_maxlen``, ``embed_dim`` C, ``depth``, ``num_heads``, ``mlp_ratio``, ``drop_rate``,
    ``drop_path_rate``, ``norm_eps``, ``shared_aln``, ``cond_drop_rate``, ``cross_attn_layer_scale``,
    ``block_chunks`` (blocks live in ``block_chunks.{k}.module.{j}``; 1 gives ``blocks.{i}``),
    ``pad_to_multiplier`` (the teacher-forced sequence is padded to a multiple of it: 128 officially, and
    it changes the float result), ``add_lvl_embeding_only_first_block``, ``apply_spatial_patchify``,
    ``top_k``/``top_p`` (defaults of the sampler). Accepted and ignored (official switches of kernels or
    training): ``customized_flash_attn``, ``fused_norm``, ``use_flex_attn``, ``checkpointing``, ``batch_size``,
    ``raw_scale_schedule``, ``pn``, ``train_h_div_w_list``, ``video_frames``, ``always_training_scales``,
    ``inference_mode``, ``selecting_idx``. The other official switches must keep the values of the released
    models (``ValueError`` otherwise).
    """

    family = "infinity"      # how fastvar.Sampler tells the model families apart (no import of this module)

    def __init__(self, vae_local, text_channels: int = 2048, text_maxlen: int = 512, embed_dim: int = 1024,
                 depth: int = 16, num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = True,
                 cond_drop_rate: float = 0.1, cross_attn_layer_scale: float = -1.0, top_p: float = 0.0,
                 top_k: float = 0.0, block_chunks: int = 1, pad_to_multiplier: int = 0,
                 add_lvl_embeding_only_first_block: int = 1, apply_spatial_patchify: int = 0, **official: Any):
        super().__init__()
        ignored = {"customized_flash_attn", "fused_norm", "use_flex_attn", "checkpointing", "batch_size",
                   "raw_scale_schedule", "pn", "train_h_div_w_list", "video_frames", "always_training_scales",
                   "inference_mode", "selecting_idx"}
        for name, value in official.items():
            if name in _FIXED:
                if value != _FIXED[name]:
                    raise ValueError(f"{name} must be {_FIXED[name]!r} (the released Infinity models' setting; fastvar "
                                     f"implements only that), got {value!r}")
            elif name not in ignored:
                raise TypeError(f"Infinity got an unexpected keyword argument {name!r}")
        if not text_channels or text_channels <= 0:
            raise ValueError(f"text_channels must be > 0 (fastvar implements the text-to-image model), got {text_channels}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if block_chunks < 1 or depth % block_chunks:
            raise ValueError(f"block_chunks must divide depth={depth}, got {block_chunks}")
        if (embed_dim // num_heads) % 4:
            raise ValueError(f"the head dim embed_dim // num_heads must be divisible by 4 for 2D RoPE, got "
                             f"{embed_dim // num_heads}")
        if add_lvl_embeding_only_first_block not in (0, 1):
            raise ValueError(f"add_lvl_embeding_only_first_block must be 0 or 1, got {add_lvl_embeding_only_first_block}")
        self.C = self.D = embed_dim
        self.depth, self.num_heads, self.head_dim = depth, num_heads, embed_dim // num_heads
        self.apply_spatial_patchify = int(bool(apply_spatial_patchify))
        self.d_vae = vae_local.embed_dim * (4 if self.apply_spatial_patchify else 1)
        self.codebook_dim = self.d_vae
        self.use_bit_label = 1
        self.V = 2 * self.d_vae
        self.Ct5, self.text_maxlen = text_channels, text_maxlen
        self.mlp_ratio, self.norm_eps = mlp_ratio, norm_eps
        self.cond_drop_rate = cond_drop_rate
        self.pad_to_multiplier = max(1, pad_to_multiplier)
        self.add_lvl_embeding_only_first_block = add_lvl_embeding_only_first_block
        self.first_l = 1
        self.top_p = 0 if max(min(top_p, 1), 0) < 1e-5 else max(min(top_p, 1), 0)
        top_k = round(top_k * self.V) if 0 < top_k < 1 else round(top_k)
        self.top_k = 0 if top_k >= self.V or top_k <= 0 else top_k
        self.rng: Optional[torch.Generator] = None     # made on the model's device at the first seeded sample
        self.t2i = True

        init_std = math.sqrt(1 / self.C / 3)
        cfg_uncond = torch.empty(text_maxlen, text_channels)
        nn.init.trunc_normal_(cfg_uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter(cfg_uncond / text_channels ** 0.5)
        self.text_norm = FastRMSNorm(text_channels, elementwise_affine=True, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, self.D)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, self.D), nn.GELU(approximate="tanh"),
                                              nn.Linear(self.D, self.D))
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(15, self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)
        self.word_embed = nn.Linear(self.d_vae, self.C)
        self.shared_aln = shared_aln
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
                               if shared_aln else nn.Identity())
        self.drop_path_rate = drop_path_rate
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.unregistered_blocks = [
            CrossAttnBlock(embed_dim=self.C, kv_dim=self.D, cond_dim=self.D, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           norm_eps=norm_eps, shared_aln=shared_aln, drop=drop_rate, drop_path=dpr[i],
                           cross_attn_layer_scale=cross_attn_layer_scale)
            for i in range(depth)]
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=lambda C, elementwise_affine: nn.LayerNorm(
            C, eps=norm_eps, elementwise_affine=elementwise_affine))
        self.head = nn.Linear(self.C, self.V)
        self.num_block_chunks = block_chunks
        self.num_blocks_in_a_chunk = depth // block_chunks
        if block_chunks == 1:
            self.blocks = nn.ModuleList(self.unregistered_blocks)
        else:
            self.block_chunks = nn.ModuleList(
                MultipleLayers(self.unregistered_blocks, self.num_blocks_in_a_chunk, i * self.num_blocks_in_a_chunk)
                for i in range(block_chunks))

    # ------------------------------------------------------------------ text
    def check_text(self, label_B_or_BLT, name: str = "label_B_or_BLT", B: Optional[int] = None,
                   need_uncond: bool = False) -> TextTuple:
        """Validate the official text tuple ``(kv_compact (N, C_t5) float, lens (B ints), cu_seqlens_k (B+1,)
        int32 = [0, cumsum(lens)], max_seqlen_k = max(lens))``; ``ValueError``/``TypeError`` naming the
        mismatch. ``need_uncond``: every length must fit ``cfg_uncond`` (``text_maxlen`` rows)."""
        if not isinstance(label_B_or_BLT, (tuple, list)) or len(label_B_or_BLT) != 4:
            raise TypeError(f"{name} must be the text tuple (kv_compact, lens, cu_seqlens_k, max_seqlen_k), got "
                            f"{type(label_B_or_BLT).__name__}")
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = label_B_or_BLT
        if not isinstance(kv_compact, torch.Tensor) or not kv_compact.is_floating_point() or kv_compact.dim() != 2:
            raise TypeError(f"{name}: kv_compact must be a 2-D float tensor (sum(lens), C_t5={self.Ct5}), got "
                            f"{kv_compact.dtype if isinstance(kv_compact, torch.Tensor) else type(kv_compact).__name__}"
                            f"{'' if not isinstance(kv_compact, torch.Tensor) else ' ' + str(tuple(kv_compact.shape))}")
        if kv_compact.shape[1] != self.Ct5:
            raise ValueError(f"{name}: kv_compact must have C_t5={self.Ct5} features per token, got shape "
                             f"{tuple(kv_compact.shape)}")
        try:
            lens = [int(n) for n in lens]
        except (TypeError, ValueError):
            raise TypeError(f"{name}: lens must be a sequence of ints, got {lens!r}") from None
        if not lens or min(lens) < 1:
            raise ValueError(f"{name}: lens must be a non-empty list of positive text lengths, got {lens}")
        if B is not None and len(lens) != B:
            raise ValueError(f"{name}: lens must hold B={B} text lengths, got {len(lens)}: {lens}")
        if sum(lens) != kv_compact.shape[0]:
            raise ValueError(f"{name}: the text lengths {lens} sum to {sum(lens)}, but kv_compact has "
                             f"{kv_compact.shape[0]} rows")
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dtype != torch.int32:
            raise TypeError(f"{name}: cu_seqlens_k must be an int32 tensor, got "
                            f"{cu_seqlens_k.dtype if isinstance(cu_seqlens_k, torch.Tensor) else type(cu_seqlens_k).__name__}")
        want = [0] + list(torch.tensor(lens).cumsum(0).tolist())
        if cu_seqlens_k.tolist() != want:
            raise ValueError(f"{name}: cu_seqlens_k must be [0, cumsum(lens)] = {want}, got {cu_seqlens_k.tolist()}")
        if int(max_seqlen_k) != max(lens):
            raise ValueError(f"{name}: max_seqlen_k must be max(lens) = {max(lens)}, got {max_seqlen_k}")
        if cu_seqlens_k.device != kv_compact.device:
            raise ValueError(f"{name}: cu_seqlens_k must be on kv_compact's device ({kv_compact.device}), got "
                             f"{cu_seqlens_k.device}")
        if need_uncond and max(lens) > self.cfg_uncond.shape[0]:
            raise ValueError(f"{name}: a text of {max(lens)} tokens is longer than cfg_uncond "
                             f"({self.cfg_uncond.shape[0]} rows, text_maxlen), which guidance replaces it with")
        return kv_compact, lens, cu_seqlens_k, int(max_seqlen_k)

    def text_condition(self, kv_compact: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int):
        """The text path: ``(cond_BD (B, D), ca_kv, cond_BD_or_gss)``; ``ca_kv`` is the packed keys/values
        source ``(kv (N, D), cu_seqlens_k, max_seqlen_k)``, ``cond_BD_or_gss`` the shared ``(B, 1, 6, C)``
        AdaLN modulation (or ``cond_BD`` without ``shared_aln``), computed once per prompt."""
        with self._weights_autocast():
            kv = self.text_norm(kv_compact.float()).contiguous()
            cond_BD = self.text_proj_for_sos((kv, cu_seqlens_k, max_seqlen_k)).contiguous()
            kv = self.text_proj_for_ca(kv).contiguous()
            gss = self.shared_ada_lin(cond_BD).contiguous()
        return cond_BD, (kv, cu_seqlens_k, max_seqlen_k), gss

    def _weights_autocast(self):
        """Autocast in the weights' dtype when they are bfloat16 or float16 (``load_infinity(..., dtype=)``, or the
        official ``--bf16`` run: low-precision blocks under autocast): matmuls in that dtype, LayerNorms and
        the residual stream in float32. With float32 weights, nothing (an autocast the caller opened stays)."""
        low = {p.dtype for p in self.parameters() if p.is_floating_point()} - {torch.float32}
        if not low:
            return contextlib.nullcontext()
        if len(low) > 1:
            raise ValueError(f"the Infinity weights mix the dtypes {sorted(map(str, low))}: cast the model to one "
                             f"(model.to(torch.bfloat16)) or load it with load_infinity(..., dtype=)")
        return torch.autocast(self.pos_start.device.type, dtype=low.pop())

    def _uncond_rows(self, lens: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """The empty prompt of each length: ``cat(cfg_uncond[:len_i])``, ``(sum(lens), C_t5)``."""
        return torch.cat([self.cfg_uncond[:n] for n in lens]).to(like.dtype)

    # ------------------------------------------------------------------ blocks and head
    def _chunks(self) -> List[List[CrossAttnBlock]]:
        if self.num_block_chunks == 1:
            return [list(self.blocks)]
        return [list(chunk.module) for chunk in self.block_chunks]

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head: hidden states ``(B, L, C)`` -> logits ``(B, L, 2 d_t)`` (pairs: score of bit 0, of bit 1)."""
        return self.head(self.head_nm(h, cond_BD))

    def _schedule(self, scale_schedule, name: str = "scale_schedule") -> Tuple[schedules.Schedule, schedules.Schedule]:
        """The checked transformer schedule and the VAE's (doubled under patchify)."""
        sched = schedules.check_schedule(scale_schedule, name)
        return sched, schedules.vae_scale_schedule(sched, self.apply_spatial_patchify)

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, label_B_or_BLT: TextTuple, x_BLC_wo_prefix: torch.Tensor, scale_schedule,
                cfg_infer: bool = False, **kwargs) -> torch.Tensor:
        """Teacher forcing: logits ``(B, L, 2 d_t)`` float32 for the inputs ``x_BLC_wo_prefix`` ``(B, L - 1,
        d_t)`` (the output of :func:`fastvar.reference.infinity.bitwise_self_correction`).

        As officially, each prompt is replaced by ``cfg_uncond`` with probability ``cond_drop_rate`` (one
        Python ``random.random()`` per prompt, also in eval mode; set ``cond_drop_rate = 0`` for deterministic
        logits). Unlike the official code, the caller's ``kv_compact`` is not overwritten in place. The
        sequence is padded to a multiple of ``pad_to_multiplier`` with the official mask.
        ``cfg_infer=True`` forwards to :meth:`autoregressive_infer_cfg`, as officially.
        """
        if cfg_infer:
            return self.autoregressive_infer_cfg(label_B_or_BLT=label_B_or_BLT, scale_schedule=scale_schedule, **kwargs)
        sched, _ = self._schedule(scale_schedule)
        lens_s = schedules.scale_lens(sched)
        L = sum(lens_s)
        if not isinstance(x_BLC_wo_prefix, torch.Tensor) or x_BLC_wo_prefix.dim() != 3:
            raise ValueError(f"x_BLC_wo_prefix must be a (B, L - 1, d_t) tensor, got "
                             f"{tuple(x_BLC_wo_prefix.shape) if isinstance(x_BLC_wo_prefix, torch.Tensor) else x_BLC_wo_prefix!r}")
        B = x_BLC_wo_prefix.shape[0]
        if tuple(x_BLC_wo_prefix.shape[1:]) != (L - 1, self.d_vae):
            raise ValueError(f"x_BLC_wo_prefix must have shape (B, L - 1 = {L - 1}, d_t = {self.d_vae}) for this "
                             f"schedule, got {tuple(x_BLC_wo_prefix.shape)}")
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = self.check_text(label_B_or_BLT, B=B)
        drop = [random.random() < self.cond_drop_rate for _ in lens]
        if any(drop):
            kv_compact = kv_compact.clone()
            total = 0
            for n, d in zip(lens, drop):
                if d:
                    kv_compact[total:total + n] = self.cfg_uncond[:n]
                total += n
        with self._weights_autocast():
            cond_BD, ca_kv, gss = self.text_condition(kv_compact, cu_seqlens_k, max_seqlen_k)
            sos = cond_BD.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
            x = torch.cat((sos, self.word_embed(x_BLC_wo_prefix.float())), dim=1)
            pad = -(-L // self.pad_to_multiplier) * self.pad_to_multiplier - L
            mask = ref.padded_block_causal_mask(lens_s, self.pad_to_multiplier, x.device, x.dtype)
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            rope = ref.rope2d_table(sched, self.head_dim, L + pad, x.device)
            lvl = self.lvl_embed.weight[scale_index(lens_s, x.device)]
            for i, chunk in enumerate(self._chunks()):
                if i == 0 or not self.add_lvl_embeding_only_first_block:
                    x = torch.cat((x[:, :L] + lvl, x[:, L:]), dim=1)
                for b in chunk:
                    x = b(x, gss, ca_kv, mask, scale_schedule=sched, rope2d_freqs_grid=rope)
            return self.get_logits(x[:, :L], cond_BD)

    # ------------------------------------------------------------------ sampling
    def _generator(self, g_seed: Optional[int]) -> Optional[torch.Generator]:
        if g_seed is None:
            return None
        device = self.pos_start.device
        if self.rng is None or self.rng.device != device:
            self.rng = torch.Generator(device=device)
        self.rng.manual_seed(int(g_seed))
        return self.rng

    @torch.no_grad()
    def autoregressive_infer_cfg(self, vae=None, scale_schedule=None, label_B_or_BLT=None, B: int = 1,
                                 negative_label_B_or_BLT=None, force_gt_Bhw=None, g_seed: Optional[int] = None,
                                 cfg_list: Sequence[float] = (), tau_list: Sequence[float] = (), cfg_sc=3,
                                 top_k: int = 0, top_p: float = 0.0, returns_vemb=0, ratio_Bl1=None, gumbel=0,
                                 norm_cfg=False, cfg_exp_k: float = 0.0, cfg_insertion_layer: Sequence[int] = (-5,),
                                 vae_type: int = 0, softmax_merge_topk=-1, ret_img: bool = False,
                                 trunk_scale: int = 1000, gt_leak: int = 0, gt_ls_Bl=None, inference_mode: bool = False,
                                 save_img_path=None, sampling_per_bits=1):
        """Sample ``B`` images (official signature and random-number use, INFINITY_SPEC.md sections 7-8).

        ``vae`` the BSQ VAE; ``scale_schedule`` a full template schedule (:mod:`fastvar.dynamic_resolution`);
        ``label_B_or_BLT`` the text tuple of B prompts; ``negative_label_B_or_BLT`` optional negative prompts
        (else ``cfg_uncond``); ``g_seed`` seeds the model's generator (None: the global RNG); ``cfg_list``,
        ``tau_list`` one value per scale; ``top_k``/``top_p`` over the two values of each bit;
        ``cfg_insertion_layer``: 0 guidance on the logits, ``k < 0`` on the hidden state after block
        ``depth + k``, 1 none; ``vae_type`` must be non-zero (the BSQ path); ``trunk_scale`` stops early;
        ``gt_leak``/``gt_ls_Bl`` replace the bits of the first scales by given ``(B, 1, h, w, d)`` bits.
        The other official arguments are accepted and unused, as officially.

        Returns ``(ret, idx_Bl_list, img)`` as officially: two empty lists and, with ``ret_img``, the images
        ``(B, H, W, 3)`` uint8 BGR (else ``[]``; ``ValueError`` if they decode to NaN or inf).
        ``self.last_summed_codes`` holds the final latent.
        """
        record: Dict[str, Any] = {}
        img = self._infer(vae, scale_schedule, label_B_or_BLT, B, negative_label_B_or_BLT, g_seed, cfg_list, tau_list,
                          top_k, top_p, cfg_insertion_layer, vae_type, ret_img, trunk_scale, gt_leak, gt_ls_Bl, record)
        return [], [], (img if ret_img else [])

    def _infer(self, vae, scale_schedule, label_B_or_BLT, B, negative_label_B_or_BLT, g_seed, cfg_list, tau_list,
               top_k, top_p, cfg_insertion_layer, vae_type, ret_img, trunk_scale, gt_leak, gt_ls_Bl,
               record: Optional[Dict[str, Any]] = None, generator: Optional[torch.Generator] = None):
        """The sampling loop. ``record`` (a dict) receives per scale the logits that entered the bit sampler,
        the Exp(1) noise of the draw, the sampled bits, the VAE-grid bits, the next-scale inputs, the
        condition, the final latent and (with ``ret_img``) the float image."""
        if vae is None:
            raise ValueError("vae must be the BSQ VAE (the sampler decodes the latent with it)")
        if not vae_type:
            raise ValueError("vae_type must be non-zero: fastvar implements Infinity's bitwise (BSQ) path, got 0")
        sched, vae_sched = self._schedule(scale_schedule)
        S = len(sched)
        if isinstance(B, bool) or not isinstance(B, int) or B < 1:
            raise ValueError(f"B must be a positive int, got {B!r}")
        cfg_list, tau_list = list(cfg_list), list(tau_list)
        if len(cfg_list) < S or len(tau_list) < S:
            raise ValueError(f"cfg_list and tau_list need one value per scale ({S}), got {len(cfg_list)} and "
                             f"{len(tau_list)}")
        if any(t == 0 for t in tau_list[:S]):
            raise ValueError(f"tau_list must not hold 0 (the logits are multiplied by 1 / tau), got {tau_list[:S]}")
        from fastvar.ops.sampling import check_top_k_top_p
        top_k, top_p = check_top_k_top_p(top_k or self.top_k, top_p or self.top_p)
        guided = any(c != 1 for c in cfg_list)
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = self.check_text(
            label_B_or_BLT, B=B, need_uncond=guided and not negative_label_B_or_BLT)
        rng = generator if generator is not None else self._generator(g_seed)

        on_logits, hidden_layers = False, []
        for item in cfg_insertion_layer:
            if item == 0:
                on_logits = True
            elif item == 1:
                pass                                  # the official "guidance on probabilities" flag, unused
            elif item < 0 and self.depth + item > 0:
                hidden_layers.append(self.depth + item)
            else:
                raise ValueError(f"cfg_insertion_layer items must be 0, 1 or a negative block offset > -depth "
                                 f"({-self.depth}), got {item}")
        if guided:
            bs = 2 * B
            if not negative_label_B_or_BLT:
                kv_un, cu_un = self._uncond_rows(lens, kv_compact), cu_seqlens_k
            else:
                kv_un, lens_un, cu_un, max_un = self.check_text(negative_label_B_or_BLT, "negative_label_B_or_BLT", B=B)
                max_seqlen_k = max(max_seqlen_k, max_un)
            kv_compact = torch.cat((kv_compact, kv_un), dim=0)
            cu_seqlens_k = torch.cat((cu_seqlens_k, cu_un[1:] + cu_seqlens_k[-1]), dim=0)
        else:
            bs = B
        with self._weights_autocast():       # the VAE decodes outside it, in its own dtype
            cond_BD, ca_kv, gss = self.text_condition(kv_compact, cu_seqlens_k, max_seqlen_k)
            if record is not None:
                record.update(cond_BD=cond_BD, logits=[], noise=[], sampled_bits=[], bits=[], word_embed_in=[])
            x = cond_BD.unsqueeze(1).expand(bs, 1, -1) + self.pos_start.expand(bs, 1, -1)

            rope = ref.rope2d_table(sched, self.head_dim, device=x.device)
            for b in self.unregistered_blocks:
                b.sa.kv_caching(True)
            summed = 0
            try:
                for si, (_, h, w) in enumerate(sched):
                    if si >= trunk_scale:
                        break
                    cfg, n = cfg_list[si], h * w
                    layer = 0
                    for ci, chunk in enumerate(self._chunks()):
                        if ci == 0 or not self.add_lvl_embeding_only_first_block:
                            x[:, :n] += self.lvl_embed.weight[si]
                        for blk in chunk:
                            x = blk(x, gss, ca_kv, None, scale_schedule=sched, rope2d_freqs_grid=rope, scale_ind=si)
                            if cfg != 1 and layer in hidden_layers:
                                x = ref.cfg_mix(x, cfg)
                                x = torch.cat((x, x), 0)
                            layer += 1
                    mix = cfg if (cfg != 1 and on_logits) else None
                    raw = self.get_logits(x, cond_BD) if mix is not None else self.get_logits(x[:B], cond_BD[:B])
                    raw = raw.reshape(raw.shape[0], -1, 2)
                    if record is not None:          # what entered the official sampler: after 1/tau and guidance
                        mixed = raw.mul(1 / tau_list[si])
                        record["logits"].append(ref.cfg_mix(mixed, mix) if mix is not None else mixed)
                    noise = ref.bit_noise(B * raw.shape[1], rng, raw.device)
                    sampled, codes = ops.sample_bits(raw, B, cfg=mix, tau=tau_list[si], top_k=top_k, top_p=top_p,
                                                     noise=noise, grid=(h, w), patchify=bool(self.apply_spatial_patchify))
                    if si < gt_leak:
                        bits = gt_ls_Bl[si]
                        codes = ref.bits_to_codes(bits)
                    elif record is not None:
                        bits = ref.tokens_to_vae_bits(sampled.reshape(B, h, w, -1), self.apply_spatial_patchify)
                    summed, nxt = ref.bitwise_step(summed, codes, vae_sched, si, self.apply_spatial_patchify)
                    if record is not None:
                        record["noise"].append(noise)
                        record["sampled_bits"].append(sampled)
                        record["bits"].append(bits)
                        if nxt is not None:
                            record["word_embed_in"].append(nxt)
                    if nxt is not None and si != S - 1:
                        # float32 residual stream (a no-op without autocast; under it word_embed gives bf16, which
                        # the AdaLN op takes only as the modulation's dtype)
                        x = self.word_embed(nxt).float().repeat(bs // B, 1, 1)
            finally:
                for b in self.unregistered_blocks:
                    b.sa.kv_caching(False)
        self.last_summed_codes = summed
        if record is not None:
            record["summed_codes"] = summed
        if not ret_img:
            return None
        # checked before the uint8 cast, which would turn NaN or inf into a silent black picture
        image = check_decoded(vae.decode(summed.squeeze(-3)), summed)
        if record is not None:
            record["image_float"] = image
        return ref.image_to_uint8_bgr(image)

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; like the official loader, a ``cfg_uncond`` of another length
        (``text_maxlen``) is truncated, or padded with this model's rows."""
        key = "cfg_uncond"
        if key in state_dict and state_dict[key].shape[0] != self.cfg_uncond.shape[0]:
            state_dict = dict(state_dict)
            old, new = state_dict[key], self.cfg_uncond.data
            n = min(old.shape[0], new.shape[0])
            state_dict[key] = (old[:n] if n == new.shape[0]
                               else torch.cat((old.to(device=new.device, dtype=new.dtype), new[n:])))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, C={self.C}, heads={self.num_heads}, d_t={self.d_vae}, "
                f"patchify={self.apply_spatial_patchify}, block_chunks={self.num_block_chunks}")
