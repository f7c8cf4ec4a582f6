"""What :class:`fastvar.Sampler` needs of an Infinity (text-to-image, bitwise tokens), kept out of its driver:
:class:`InfinityAdapter` holds the transformer's weights in the compute dtype and does the model's part of every
scale; :class:`InfinityBuffers` holds the static buffers of one (batch size, schedule). The driver is the same as
VAR's (buffers per run in an LRU, CUDA graphs per settings, weight sync, streaming).

The computation is the official ``autoregressive_infer_cfg`` (:meth:`fastvar.models.Infinity._infer`, op for op,
so that float32 on CPU gives its bits), with what does not change across scales computed once per sample: the
text path (pooled condition, shared AdaLN), every block's modulation ``ada_gss + gss``, the head's modulation and
every block's cross-attention keys and values of the text.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import dynamic_resolution as schedules
from fastvar import ops
from fastvar.nn.infinity import CrossAttnBlock, InfinityKVCache
from fastvar.reference import infinity as ref
from fastvar.sampler.weights import HeldWeights, tensor_slots, weights_fingerprint
from fastvar.settings import InfinitySettings
from fastvar.utils.images import check_decoded

# official defaults of the sampling scripts (INFINITY_SPEC.md section 12): cfg 3, tau 0.5, top_k 900 (a no-op over
# the two values of a bit), top_p 0.97, guidance on the logits
DEFAULTS = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, cfg_insertion_layer=(0,))
TEXT_ROWS_MIN = 64        # text key/value rows per prompt preallocated before the first longer prompt


@dataclasses.dataclass(frozen=True)
class InfinityCondition:
    """One request's conditioning, checked: the prompts' packed features (conditional rows, then the
    unconditional or negative rows when guided), their offsets and the longest length."""

    kv_compact: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int
    B: int
    guided: bool


class InfinityAdapter(HeldWeights):
    """fastvar's :class:`~fastvar.models.Infinity` as :class:`fastvar.Sampler` drives it.

    Holds the blocks', head's and embeddings' weights in the compute ``dtype`` (the model's own tensors where they
    already have it, casts otherwise; ``sync`` / ``stale`` as :class:`~fastvar.sampler.var.VARAdapter`), and does
    the model's part of every scale on static buffers: the per-sample conditioning, the blocks on KV caches
    preallocated for the whole schedule (written in place), guidance on the logits or a hidden state, the bit
    sampler (``ops.sample_bits`` on a noise buffer drawn in the official order), and the step between scales
    (trilinear upsample into the latent, resize to the next grid, ``word_embed``). The residual stream, the
    latent and the text path stay float32 (the text path runs on the model's own float32 modules, once per
    sample). ``var`` is the transformer (the name the Sampler's VAR API uses).
    """

    family = "infinity"

    def __init__(self, model: nn.Module, vae: nn.Module, dtype: torch.dtype):
        if getattr(type(model), "family", None) != "infinity":
            raise TypeError(f"model must be fastvar's Infinity, got {type(model).__name__}")
        if getattr(type(vae), "family", None) != "bsq_vae":
            raise TypeError(f"vae must be the BSQ VAE of the Infinity model (fastvar.BSQVAE), got {type(vae).__name__}")
        want = model.d_vae // (4 if model.apply_spatial_patchify else 1)
        if vae.codebook_dim != want:
            raise ValueError(f"the BSQ VAE has {vae.codebook_dim} bits per latent pixel; the Infinity model takes "
                             f"{want}")
        self.infinity = self.var = model
        self.vae, self.dtype, self.device = vae, dtype, model.pos_start.device
        self.schedule = None                 # per request (aspect ratio): the runs hold theirs
        self.fused_conv = False
        self.depth, self.C, self.d_t, self.H, self.c = model.depth, model.C, model.d_vae, model.num_heads, model.head_dim
        self.patchify = bool(model.apply_spatial_patchify)
        self.slots = tensor_slots(model, vae)
        self.fingerprint = weights_fingerprint(self.slots)
        sources = [(torch.float32, model.pos_start), (torch.float32, model.lvl_embed.weight),
                   (dtype, model.word_embed.weight), (dtype, model.word_embed.bias), (dtype, model.head.weight),
                   (dtype, model.head.bias)]
        with torch.inference_mode(False), torch.no_grad():    # the held tensors are refreshed in place later
            self._pairs = [(t.detach().to(dt), t) for dt, t in sources]
            self.chunks: List[List[CrossAttnBlock]] = model._chunks()
            self.blocks = [b for chunk in self.chunks for b in chunk]
            self.block_weights = [b.step_weights(dtype) for b in self.blocks]
            self.head_nm, self.head_ada = model.head_nm, model.head_nm.step_weights(dtype)
        held = [h for h, _ in self._pairs]
        self.pos_start, self.lvl_embed = held[:2]
        self.word, self.head = tuple(held[2:4]), tuple(held[4:6])

    def rebuilt(self) -> "InfinityAdapter":
        """A fresh adapter of the same model, VAE and dtype (new casts)."""
        return InfinityAdapter(self.infinity, self.vae, self.dtype)

    # ------------------------------------------------------------------ requests
    def settings(self, scale_schedule=None, cfg=DEFAULTS["cfg"], tau=DEFAULTS["tau"], top_k=DEFAULTS["top_k"],
                 top_p=DEFAULTS["top_p"], cfg_insertion_layer=DEFAULTS["cfg_insertion_layer"]) -> InfinitySettings:
        """The checked :class:`~fastvar.settings.InfinitySettings`. ``scale_schedule`` defaults to 1:1 at 1024 px
        (``dynamic_resolution.scale_schedule(1.0, "1M")``); ``top_k`` / ``top_p`` of 0 fall back to the model's
        own defaults, as officially."""
        if scale_schedule is None:
            scale_schedule = schedules.scale_schedule(1.0, "1M")
        return InfinitySettings.checked(scale_schedule, cfg, tau, top_k or self.infinity.top_k,
                                        top_p or self.infinity.top_p, cfg_insertion_layer, self.depth)

    def conditioning(self, cond, B: Optional[int], rng, settings: InfinitySettings,
                     negative=None) -> Tuple[int, InfinityCondition]:
        """``cond``: the official text tuple ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)`` of B prompts;
        ``negative``: the negative prompts' tuple (else ``cfg_uncond``, the empty prompt). Returns ``(B, condition)``
        with the unconditional rows appended when ``settings`` guide some scale."""
        m = self.infinity
        if cond is None:
            raise ValueError("text must be the text tuple (kv_compact, lens, cu_seqlens_k, max_seqlen_k) of the "
                             "prompts (Infinity has no unconditional sampling)")
        kv, lens, cu, max_k = m.check_text(cond, "text", B=B, need_uncond=settings.guided and negative is None)
        B = len(lens)
        if kv.device != self.device:
            raise ValueError(f"text: kv_compact must be on the model's device ({self.device}), got {kv.device}")
        if settings.guided:
            if negative is None:
                kv_un, cu_un = m._uncond_rows(lens, kv), cu
            else:
                kv_un, _, cu_un, max_un = m.check_text(negative, "negative", B=B)
                if kv_un.device != self.device:
                    raise ValueError(f"negative: kv_compact must be on the model's device ({self.device}), got "
                                     f"{kv_un.device}")
                max_k = max(max_k, max_un)
            kv = torch.cat((kv, kv_un.to(kv.dtype)), dim=0)
            cu = torch.cat((cu, cu_un[1:] + cu[-1]), dim=0)
        return B, InfinityCondition(kv, cu, int(max_k), B, settings.guided)

    def run_key(self, B: int, settings: InfinitySettings):
        return B, settings.scale_schedule

    def buffers(self, key) -> "InfinityBuffers":
        B, sched = key
        return InfinityBuffers(self, B, sched)

    # ------------------------------------------------------------------ per sample
    def condition(self, buf: "InfinityBuffers", cond: InfinityCondition) -> bool:
        """The text path once for the sample (pooled condition, shared modulation), then every block's modulation,
        the head's, every block's text keys/values and the start tokens into ``buf``; the latent zeroed. Returns
        True when the text buffers had to grow (captured CUDA graphs of the run read the old ones)."""
        m, bs = self.infinity, (2 if cond.guided else 1) * cond.B
        grew = buf.fit_text(cond.kv_compact.shape[0])
        cond_BD, (kv, cu, _), gss = m.text_condition(cond.kv_compact, cond.cu_seqlens_k, cond.max_seqlen_k)
        buf.cu_k[:bs + 1].copy_(cu)
        buf.max_seqlen_k = cond.max_seqlen_k
        for mod, w in zip(buf.mods, self.block_weights):
            mod[:bs].copy_(w.ada_gss + gss)
        for t, w in zip(buf.text_kv, self.block_weights):
            t[:kv.shape[0]].copy_(CrossAttnBlock.text_kv(kv, w))
        buf.head_mod[:bs].copy_(m.head_nm.modulation(cond_BD, self.head_ada))
        buf.start[:bs].copy_(cond_BD.unsqueeze(1) + self.pos_start.expand(bs, 1, -1))
        buf.f_hat.zero_()
        return grew

    def draw_noise(self, buf: "InfinityBuffers", si: int, rng, settings: InfinitySettings) -> None:
        """Scale ``si``'s random numbers, in the official order: the ``(B * n, 2)`` Exp(1) draw the official
        ``torch.multinomial`` over the bits makes (one per scale). ``rng``: one generator (or None, the global one)
        for the batch; or one generator per image, each drawing its own rows (an image then does not depend on its
        batch: it draws what a batch of one with that seed draws)."""
        noise = buf.noise(si)
        if not isinstance(rng, (list, tuple)):
            noise.exponential_(generator=rng)
            return
        rows = noise.view(buf.B, -1)
        for b, g in enumerate(rng):
            rows[b].exponential_(generator=g)

    # ------------------------------------------------------------------ per scale
    def step(self, buf: "InfinityBuffers", si: int, settings: InfinitySettings) -> None:
        """One scale on the static buffers: blocks (with guidance on a hidden state), head, bit sampler, latent,
        next scale's input (the official loop's scale ``si``)."""
        B, S = buf.B, len(buf.schedule)
        bs = 2 * B if settings.guided else B
        _, h, w = buf.schedule[si]
        n, start = h * w, buf.starts[si]
        cfg = settings.cfg[si]
        rope = buf.rope[:, start:start + n]
        x = buf.start[:bs] if si == 0 else buf.x[:bs, :n]
        cu_q, cu_k = buf.cu_q[si][:bs + 1], buf.cu_k[:bs + 1]
        layer = 0
        for ci, chunk in enumerate(self.chunks):
            if ci == 0 or not self.infinity.add_lvl_embeding_only_first_block:
                x = x + self.lvl_embed[si]
            for blk in chunk:
                cache = buf.caches[layer]
                x = blk.sampling_step(x, buf.mods[layer][:bs], cache.k[:bs], cache.v[:bs], start,
                                      self.block_weights[layer], buf.text_kv[layer], cu_q, cu_k, buf.max_seqlen_k, rope)
                if cfg != 1 and layer in settings.hidden_layers:
                    x = ref.cfg_mix(x, cfg)
                    x = torch.cat((x, x), 0)
                layer += 1
        mix = cfg if (cfg != 1 and settings.on_logits) else None
        rows = bs if mix is not None else B
        hm = buf.head_mod[:rows]
        hh = ops.adaln_modulate(x[:rows], hm[:, :, 0], hm[:, :, 1], self.infinity.head_nm.ln_wo_grad.eps)
        raw = F.linear(hh, *self.head).float().reshape(rows, -1, 2)
        bits, codes = ops.sample_bits(raw, B, cfg=mix, tau=settings.tau[si], top_k=settings.top_k,
                                      top_p=settings.top_p, noise=buf.noise(si), grid=(h, w), patchify=self.patchify,
                                      validate=self.device.type != "cuda")
        buf.tokens[si].copy_(bits)
        vae_sched = buf.vae_schedule
        if si == S - 1:
            buf.f_hat.add_(codes)
            return
        up = ref.interpolate(codes, vae_sched[-1], "trilinear")
        if si == 0:
            buf.f_hat.copy_(up)          # = 0 + up, without reading the latent (the graph warm-up leaves it dirty)
        else:
            buf.f_hat.add_(up)
        nxt = ref.tokens_from_map(ref.interpolate(buf.f_hat, vae_sched[si + 1], "trilinear"), self.patchify)
        x_next = F.linear(nxt.to(self.dtype), *self.word)
        n1 = x_next.shape[1]
        buf.x[:B, :n1].copy_(x_next)
        if bs > B:
            buf.x[B:bs, :n1].copy_(x_next)

    def check_tokens(self, buf: "InfinityBuffers") -> None:
        """On CUDA the bit sampler marks a bit whose logits hold NaN / +inf / only -inf with 255 instead of stopping
        the GPU; one check per sample turns that into a clear error."""
        for si, t in enumerate(buf.tokens):
            if bool((t == 255).any()):
                raise ValueError(f"the logits of scale {si} hold NaN, +inf or a bit whose two logits are -inf (a "
                                 "diverged model or weights?); cannot sample")

    def num_scales(self, buf: "InfinityBuffers") -> int:
        return len(buf.schedule)

    def snapshot(self, buf: "InfinityBuffers", si: int):
        """``(hw, bits (B, h*w*d_t) uint8, latent (B, d, H, W) float32)`` of scale ``si``, copies (the latent keeps
        the official channels-last strides, which decoding on CPU depends on)."""
        _, h, w = buf.schedule[si]
        return (h, w), buf.tokens[si].clone(), buf.f_hat.squeeze(2).clone()

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, d, H, W)`` latent -> RGB images ``(B, 3, H_img, W_img)`` in [0, 1]: ``(vae.decode + 1) / 2``, the
        first op of the official uint8 conversion (so ``(image * 255).to(uint8)`` with the channels reversed is the
        official BGR image); ``ValueError`` if they hold NaN or inf."""
        dtype = next(p.dtype for p in self.vae.parameters() if p.is_floating_point())
        return check_decoded((self.vae.decode(f_hat.to(dtype)) + 1) / 2, f_hat)


class InfinityBuffers:
    """Static buffers of one (batch size ``B``, schedule): the KV caches (``2B`` rows: the guided batch; unguided
    settings use the first ``B``), the per-sample modulations and text keys/values, the start tokens, one input
    buffer for the scale being run, the RoPE rows, the noise, the sampled bits and the latent. CUDA graphs
    captured on them replay for every sample of that run.

    The text keys/values hold ``TEXT_ROWS_MIN`` rows per prompt at first (every block: ``2 * rows * 2C`` values)
    and grow, to a power of two, the first time a longer request comes (:meth:`fit_text`).
    """

    def __init__(self, m: InfinityAdapter, B: int, schedule):
        dev, dt, C = m.device, m.dtype, m.C
        sched, vae_sched = m.infinity._schedule(schedule)
        lens = schedules.scale_lens(sched)
        L, B2 = sum(lens), 2 * B
        self.m, self.B, self.schedule, self.vae_schedule, self.lens = m, B, sched, vae_sched, lens
        self.starts = [sum(lens[:i]) for i in range(len(lens))]
        self.max_seqlen_k = 1
        with torch.inference_mode(False):      # usable inside and outside inference mode alike
            self.caches = [InfinityKVCache(B2, m.H, L, m.c, dt, dev) for _ in m.blocks]
            self.mods = [torch.empty(B2, 1, 6, C, dtype=dt, device=dev) for _ in m.blocks]
            self.head_mod = torch.empty(B2, 1, 2, C, dtype=dt, device=dev)
            self.text_kv: List[torch.Tensor] = []
            self.text_rows = 0
            self.fit_text(B2 * TEXT_ROWS_MIN)
            self.cu_k = torch.zeros(B2 + 1, dtype=torch.int32, device=dev)
            self.cu_q = [torch.arange(0, n * (B2 + 1), n, dtype=torch.int32, device=dev) for n in lens]
            self.start = torch.empty(B2, 1, C, dtype=torch.float32, device=dev)
            self.x = torch.empty(B2, max(lens[1:]), C, dtype=torch.float32, device=dev)
            self.rope = ref.rope2d_table(sched, m.c, device=dev)
            # ones, not empty: the graph warm-up runs every scale before later scales' noise is drawn
            self._noise = torch.ones(B * max(lens) * m.d_t * 2, dtype=torch.float32, device=dev)
            self.tokens = [torch.empty(B, n * m.d_t, dtype=torch.uint8, device=dev) for n in lens]
            # the latent with the strides of the official one (channels-last, as the trilinear upsample of the
            # codes makes it): CPU trilinear resizes and convolutions round by memory layout
            _, h0, w0 = sched[0]
            bits0 = torch.zeros(B, h0, w0, m.d_t, dtype=torch.uint8, device=dev)
            probe = ref.interpolate(ref.bits_to_codes(ref.tokens_to_vae_bits(bits0, m.patchify)), vae_sched[-1],
                                    "trilinear")
            self.f_hat = torch.zeros_like(probe)

    def fit_text(self, rows: int) -> bool:
        """Room for ``rows`` packed text tokens in every block's keys/values; True when they were reallocated."""
        if rows <= self.text_rows:
            return False
        m = self.m
        cap = 1 << (rows - 1).bit_length()
        with torch.inference_mode(False):
            self.text_kv = [torch.empty(cap, 2 * m.C, dtype=m.dtype, device=m.device) for _ in m.blocks]
        grew, self.text_rows = self.text_rows > 0, cap
        return grew

    def noise(self, si: int) -> torch.Tensor:
        """``(B * n * d_t, 2)`` view for scale ``si``: the Exp(1) draw of the official ``torch.multinomial``."""
        rows = self.B * self.lens[si] * self.m.d_t
        return self._noise[: 2 * rows].view(rows, 2)

    def nbytes(self) -> int:
        tensors = [*self.mods, *self.text_kv, *self.cu_q, *self.tokens, self.head_mod, self.cu_k, self.start, self.x,
                   self.rope, self._noise, self.f_hat]
        return (sum(2 * c.k.numel() * c.k.element_size() for c in self.caches)
                + sum(t.numel() * t.element_size() for t in tensors))
