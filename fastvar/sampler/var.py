"""What :class:`fastvar.Sampler` needs of a VAR, kept out of its driver: :class:`VARAdapter` holds a
VAR's weights in the compute dtype and does the model's part of every scale; :class:`VARBuffers` holds the static
buffers of one batch size. The Sampler itself only drives scales, CUDA graphs and random numbers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops
from fastvar.labels import batch_size_of, sampling_labels
from fastvar.nn.attention import AdaLNBeforeHead, AdaLNSelfAttn, KVCache
from fastvar.reference import sampling as ref_sampling
from fastvar.reference.quantize import scale_ratio
from fastvar.sampler.weights import HeldWeights, tensor_slots, weights_fingerprint
from fastvar.schedule import Schedule
from fastvar.settings import SamplingSettings, resolve_settings
from fastvar.utils.images import check_decoded


class VARAdapter(HeldWeights):
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

    family = "var"

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

    def rebuilt(self) -> "VARAdapter":
        """A fresh adapter of the same model, VQVAE, dtype and step (new casts)."""
        return VARAdapter(self.var, self.vae, self.dtype, fused_conv=self.fused_conv)

    # ------------------------------------------------------------------ requests
    def settings(self, cfg: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 more_smooth: bool = False) -> SamplingSettings:
        """The checked :class:`~fastvar.settings.SamplingSettings` for this model (``top_k`` at most V; each one left
        None: the model's default, :func:`fastvar.settings.default_settings`)."""
        return resolve_settings(self.var, cfg, top_k, top_p, more_smooth)

    def conditioning(self, labels, B: Optional[int], rng, settings: SamplingSettings) -> Tuple[int, torch.Tensor]:
        """``(B, labels (B,) int64)`` from a tensor / list of class ids, an int with ``B``, or None (``B`` classes
        drawn from ``rng``, which must then be one generator)."""
        if B is None:
            B = batch_size_of(labels)
        labels = sampling_labels(B, labels, self.num_classes, None if isinstance(rng, list) else rng, self.device,
                                 name="labels")
        return labels.shape[0], labels

    # ------------------------------------------------------------------ per batch size
    def run_key(self, B: int, settings: SamplingSettings) -> int:
        return B                 # one schedule: buffers and graphs are kept per batch size

    def buffers(self, B: int) -> "VARBuffers":
        return VARBuffers(self, B)

    def num_scales(self, buf: "VARBuffers") -> int:
        return len(self.schedule)

    def snapshot(self, buf: "VARBuffers", si: int):
        """``(hw, tokens (B, h*w), f_hat)`` of scale ``si``, copies."""
        return self.schedule.hws[si], buf.tokens[si].clone(), buf.f_hat.clone()

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

    def draw_noise(self, buf: "VARBuffers", si: int, rng, settings: SamplingSettings) -> None:
        """Scale ``si``'s random numbers, in the official order: the Exp(1) draw ``torch.multinomial`` makes,
        then (``more_smooth``) the Gumbel noise. ``rng``: one ``torch.Generator`` (or None, the global one) for
        the batch, as the official loop; or a list of one generator per image, each drawing its own rows, so
        that an image does not depend on the batch it is sampled in."""
        more_smooth = settings.more_smooth
        if not isinstance(rng, (list, tuple)):
            buf.noise(si).exponential_(generator=rng)
            if more_smooth:
                buf.gumbel(si).exponential_(generator=rng)
            return
        rows = buf.noise(si).view(buf.B, -1)
        for b, g in enumerate(rng):
            rows[b].exponential_(generator=g)
            if more_smooth:
                buf.gumbel(si)[b].exponential_(generator=g)

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
        or inf."""
        dtype = next(p.dtype for p in self.vae.parameters() if p.is_floating_point())
        return check_decoded(self.vae.fhat_to_img(f_hat.to(dtype)).add_(1).mul_(0.5), f_hat)


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
