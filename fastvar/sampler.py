"""The fast sampler: VAR's class-conditional generation, scale by scale, on fastvar's ops.

Compared with the official ``autoregressive_infer_cfg`` (same algorithm, same random-number use):
- the AdaLN modulation of every block and of the head is computed once per sample, not per scale
  (the condition never changes across scales);
- LayerNorm + modulation and the gated residual are one fused op (``ops.gated_residual_adaln``);
- weights are cast once to the compute dtype at construction (no per-call casts);
- every layer's KV cache is preallocated for the whole schedule and written in place;
- the per-scale glue (sampling, code lookup, upsample-accumulate, next input) runs on fastvar's ops;
- on CUDA, each scale step is captured once per (batch, settings) in a CUDA graph and replayed.

This module is composition only: the kernels live in ``fastvar.ops``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastvar import ops
from fastvar.labels import sampling_labels
from fastvar.ops._checks import check_finite_scalar
from fastvar.ops.sampling import check_top_k_top_p
from fastvar.reference import sampling as ref_sampling
from fastvar.reference.quantize import scale_ratio
from fastvar.schedule import begin_ends, scale_hws

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class ScaleResult:
    """One finished scale of :meth:`Sampler.stream`.

    ``index``: the scale (0 = coarsest); ``hw``: its token map size; ``tokens``: ``(B, h*w)`` int64;
    ``f_hat``: ``(B, Cvae, H, W)`` float32 latent accumulated so far (a copy). ``preview()`` decodes
    ``f_hat`` into images ``(B, 3, H_img, W_img)`` in [0, 1] on first call (decoding costs more than
    a scale of sampling, so it only happens when asked for).
    """

    index: int
    num_scales: int
    hw: Tuple[int, int]
    tokens: torch.Tensor
    f_hat: torch.Tensor
    _decode: object = dataclasses.field(repr=False, default=None)
    _image: Optional[torch.Tensor] = dataclasses.field(repr=False, default=None)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_scales - 1

    def preview(self) -> torch.Tensor:
        if self._image is None:
            self._image = self._decode(self.f_hat)
        return self._image


class _Weights:
    """The model's tensors for the sampler, cast once (no copy when the dtype already matches).

    Matmul weights are in the compute dtype. The embeddings stay float32: the residual stream is float32,
    as in the official sampling under ``torch.autocast`` (embeddings are not autocast, and each block's
    low-precision output is added to the float32 stream)."""

    def __init__(self, var, dtype: torch.dtype):
        self.slots = tensor_slots(var)
        self.fingerprint = weights_fingerprint(self.slots)

        def cast(t):
            return t.detach().to(dtype)

        def f32(t):
            return t.detach().float()

        self.class_emb, self.pos_start, self.pos_1LC = f32(var.class_emb.weight), f32(var.pos_start), f32(var.pos_1LC)
        self.lvl_embed = f32(var.lvl_embed.weight)
        self.word_w, self.word_b = cast(var.word_embed.weight), cast(var.word_embed.bias)
        shared = not isinstance(var.shared_ada_lin, torch.nn.Identity)
        self.shared = (cast(var.shared_ada_lin[1].weight), cast(var.shared_ada_lin[1].bias)) if shared else None
        self.blocks = []
        for b in var.blocks:
            a = b.attn
            self.blocks.append(dict(
                ada=(cast(b.ada_gss),) if b.shared_aln else (cast(b.ada_lin[1].weight), cast(b.ada_lin[1].bias)),
                eps=b.ln_wo_grad.eps,
                qkv_w=cast(a.mat_qkv.weight), qkv_b=cast(torch.cat((a.q_bias, a.zero_k_bias, a.v_bias))),
                scale=float(a.scale), scale_mul=f32(a.scale_mul_1H11) if a.attn_l2_norm else None,
                heads=a.num_heads, head_dim=a.head_dim,
                proj_w=cast(a.proj.weight), proj_b=cast(a.proj.bias),
                fc1_w=cast(b.ffn.fc1.weight), fc1_b=cast(b.ffn.fc1.bias),
                fc2_w=cast(b.ffn.fc2.weight), fc2_b=cast(b.ffn.fc2.bias)))
        self.head_ada = (cast(var.head_nm.ada_lin[1].weight), cast(var.head_nm.ada_lin[1].bias))
        self.head_eps = var.head_nm.ln_wo_grad.eps
        self.head_w, self.head_b = cast(var.head.weight), cast(var.head.bias)


def tensor_slots(var) -> List[Tuple[dict, str]]:
    """Every parameter and buffer of the model as (its module's ``_parameters`` / ``_buffers``, name): read
    through these, a tensor the model replaces is seen (walking ``var.parameters()`` again costs ~0.75 ms
    per sample for d30 on a 2-core CPU; these lookups ~0.1 ms)."""
    return [(d, name) for m in var.modules() for d in (m._parameters, m._buffers) for name, t in d.items()
            if t is not None]


def weights_fingerprint(slots: List[Tuple[dict, str]]) -> tuple:
    """Where each tensor lives and how often it was modified in place (its version counter): it changes
    with an optimizer step, ``load_state_dict``, ``.to()``, a replaced parameter or any in-place edit.
    (Inference tensors have no version counter; they cannot change outside inference mode.)"""
    out = []
    for d, name in slots:
        t = d.get(name)
        out.append(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version))
    return tuple(out)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


class _Run:
    """Static buffers of one batch size: the KV caches, the per-sample modulation, the per-scale inputs,
    noise and tokens, and f_hat; plus the CUDA graphs captured on them, per sampling settings (the
    graphs read and write only these buffers, so they replay for every sample of that batch size).

    The residual stream (``x_in``, ``lvl_pos``) is float32; the rest is in the compute dtype. One
    noise buffer serves every scale (each scale draws into it just before it runs): B*l*V float32
    per scale would be 0.7 GB at B=64 and 256 px, 2.3 GB at 512 px.
    """

    MAX_GRAPH_SETTINGS = 4     # captured settings kept per batch size (each holds S graphs and their memory)

    def __init__(self, sampler: "Sampler", B: int):
        s, w, dev, dt = sampler, sampler.w, sampler.device, sampler.dtype
        var = s.var
        # the weights this run's steps (and the CUDA graphs captured on them) read: a refresh while a stream
        # of this run is suspended leaves it on the weights it started with, never on freed memory
        self.w = w
        self.B, self.busy = B, False
        C, L, V = var.C, sum(s.lens), var.V
        with torch.inference_mode(False):      # usable inside and outside inference mode alike
            self.k_cache = [torch.empty(2 * B, L, b["heads"], b["head_dim"], dtype=dt, device=dev) for b in w.blocks]
            self.v_cache = [torch.empty_like(k) for k in self.k_cache]
            self.labels = torch.zeros(2 * B, dtype=torch.long, device=dev)
            self.mods = torch.empty(len(w.blocks), 2 * B, 1, 6, C, dtype=dt, device=dev)
            self.head_mod = torch.empty(2 * B, 1, 2, C, dtype=dt, device=dev)
            self.lvl_pos = torch.empty(1, L, C, dtype=torch.float32, device=dev)
            self.x_in = [torch.empty(2 * B, n, C, dtype=torch.float32, device=dev) for n in s.lens]
            # ones, not empty: the graph warm-up runs every scale step before later scales' noise is drawn,
            # and a NaN from uninitialised memory would make the draw pick a column past V
            self._noise = torch.ones(B * max(s.lens) * V, dtype=torch.float32, device=dev)
            self._gumbel: Optional[torch.Tensor] = None
            self.tokens = [torch.empty(B, n, dtype=torch.long, device=dev) for n in s.lens]
            self.f_hat = torch.zeros(B, var.Cvae, *s.hws[-1], dtype=torch.float32, device=dev)
        self.lens, self.V = s.lens, V
        self.graphs: "collections.OrderedDict[tuple, List[torch.cuda.CUDAGraph]]" = collections.OrderedDict()
        self.graph_bytes: Dict[tuple, int] = {}

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
        return _nbytes([self.k_cache, self.v_cache, self.labels, self.mods, self.head_mod, self.lvl_pos, self.x_in,
                        self._noise, self._gumbel, self.tokens, self.f_hat])


class Sampler:
    """Fast class-conditional sampling for a fastvar ``VAR`` or an official VAR patched by ``fastvar.patch``.

    Args:
        var: the transformer (its VQVAE is taken from ``var.vae_proxy`` unless ``vae`` is given).
        vae: the VQVAE that decodes ``f_hat`` (its quantizer must be fastvar's or patched).
        dtype: compute dtype of the transformer (float32 or bfloat16 on CPU; float32, float16 or
            bfloat16 on CUDA); weights are cast once here, and again (graphs dropped) when a sample
            starts after the model's parameters or buffers changed (:func:`weights_fingerprint`).
        cuda_graphs: capture each scale step once per (batch size, settings) and replay it (CUDA only).
        fused_step_conv: compute Phi's 3x3 convolution inside the Triton sampling step (two launches per
            scale instead of three; see :func:`fastvar.ops.upsample_accumulate_`; the eager backend ignores
            it); off by default, which keeps the eager step's bits. Fixed for the Sampler's lifetime: its
            CUDA graphs are captured with it.

    ``sample`` returns images; ``stream`` yields every scale as it finishes. The random-number use is
    the official one: the same ``seed`` gives the official model's tokens.
    """

    def __init__(self, var, vae=None, dtype: Optional[torch.dtype] = torch.bfloat16, cuda_graphs: bool = True,
                 fused_step_conv: bool = False):
        self.var = var
        self.vae = vae if vae is not None else var.vae_proxy[0]
        self.quant = self.vae.quantize
        if not hasattr(self.quant, "patch_hws"):
            raise TypeError("the VQVAE's quantizer is not fastvar's: call fastvar.patch(model) first")
        self.device = var.lvl_1L.device
        self.hws = scale_hws(var.patch_nums)
        self.lens = tuple(h * w for h, w in self.hws)
        self.begins = begin_ends(self.hws)
        dtype = dtype or var.head.weight.dtype
        allowed = _CUDA_DTYPES if self.device.type == "cuda" else _CPU_DTYPES
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {[str(d) for d in allowed]} on {self.device.type}, got {dtype}")
        if dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype torch.bfloat16 is not supported by this GPU; use torch.float16")
        self.dtype = dtype
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self._fused_step_conv = bool(fused_step_conv)
        self.w = _Weights(var, dtype)
        self._runs: Dict[int, _Run] = {}

    @property
    def fused_step_conv(self) -> bool:
        """Whether the sampling step computes Phi's convolution inside its Triton kernel (read-only)."""
        return self._fused_step_conv

    # ------------------------------------------------------------------ resources
    def refresh(self) -> None:
        """Re-cast the weights from the model now (a sample does it anyway when they changed); drops graphs."""
        self.w = _Weights(self.var, self.dtype)
        self.free()

    def memory(self) -> Dict[str, int]:
        """Bytes held: the cast weights (0 when they are the model's own tensors), the static buffers
        (KV caches included) and the memory the CUDA graphs reserved when they were captured."""
        own = {p.data_ptr() for p in self.var.parameters()}
        cast = {k: v for k, v in self.w.__dict__.items() if k not in ("slots", "fingerprint")}   # those describe the model
        weights = sum(t.numel() * t.element_size() for t in _tensors(cast) if t.data_ptr() not in own)
        buffers = sum(r.nbytes() for r in self._runs.values())
        graphs = sum(b for r in self._runs.values() for b in r.graph_bytes.values())
        return {"weights": weights, "buffers": buffers, "graphs": graphs}

    def free(self) -> None:
        """Release the KV caches, buffers and CUDA graphs (they are rebuilt on the next call)."""
        self._runs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ inputs
    def _generator(self, seed: Optional[int], generator: Optional[torch.Generator]):
        if generator is not None:
            return generator
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(seed))

    # ------------------------------------------------------------------ the algorithm
    def _prepare(self, run: _Run, labels: torch.Tensor) -> None:
        """Per-sample work done once: condition, modulation of every block and of the head, positions."""
        var, w, B = self.var, run.w, run.B
        run.labels[:B].copy_(labels)
        run.labels[B:].fill_(var.num_classes)
        cond = F.embedding(run.labels, w.class_emb)                          # (2B, C) float32
        act = F.silu(cond).to(self.dtype)
        if w.shared is not None:
            shared = F.linear(act, *w.shared).view(-1, 1, 6, var.C)
        for i, b in enumerate(w.blocks):
            if w.shared is not None:
                run.mods[i].copy_(b["ada"][0] + shared)
            else:
                run.mods[i].copy_(F.linear(act, *b["ada"]).view(-1, 1, 6, var.C))
        run.head_mod.copy_(F.linear(act, *w.head_ada).view(-1, 1, 2, var.C))
        run.lvl_pos.copy_(F.embedding(var.lvl_1L, w.lvl_embed) + w.pos_1LC)
        first = self.lens[0]
        run.x_in[0].copy_(cond.unsqueeze(1).expand(2 * B, first, -1) + w.pos_start.expand(2 * B, first, -1)
                          + run.lvl_pos[:, :first])
        run.f_hat.zero_()

    def _transformer(self, run: _Run, si: int) -> torch.Tensor:
        """All blocks and the head on scale ``si``'s tokens; returns float32 logits ``(2B, l, V)``."""
        w = run.w
        x = run.x_in[si]
        n2, l, C = x.shape
        cache_len = self.begins[si][0]
        _, _, s1, _, sh1, _ = run.mods[0].unbind(2)
        h = ops.adaln_modulate(x, s1, sh1, w.blocks[0]["eps"])
        for i, b in enumerate(w.blocks):
            g1, g2, s1, s2, sh1, sh2 = run.mods[i].unbind(2)
            q, k, v = F.linear(h, b["qkv_w"], b["qkv_b"]).view(n2, l, 3, b["heads"], b["head_dim"]).unbind(2)
            a = ops.kv_cached_attention(q, k, v, run.k_cache[i], run.v_cache[i], cache_len, b["scale"], b["scale_mul"])
            a = F.linear(a.reshape(n2, l, C), b["proj_w"], b["proj_b"])
            x, h = ops.gated_residual_adaln(x, a, g1, s2, sh2, b["eps"])
            f = F.linear(F.gelu(F.linear(h, b["fc1_w"], b["fc1_b"]), approximate="tanh"), b["fc2_w"], b["fc2_b"])
            if i + 1 < len(w.blocks):
                nxt = run.mods[i + 1].unbind(2)
                x, h = ops.gated_residual_adaln(x, f, g2, nxt[2], nxt[4], w.blocks[i + 1]["eps"])
            else:
                hs, hsh = run.head_mod.unbind(2)
                x, h = ops.gated_residual_adaln(x, f, g2, hs, hsh, w.head_eps)
        return F.linear(h, w.head_w, w.head_b).float()

    def _scale_step(self, run: _Run, si: int, cfg: float, top_k: int, top_p: float, more_smooth: bool) -> None:
        """One scale on the static buffers: transformer, CFG + top-k/top-p + draw, codes, f_hat, next input."""
        var, w, B = self.var, run.w, run.B
        S = len(self.hws)
        ratio = scale_ratio(si, S)
        ph, pw = self.hws[si]
        # CFG mix, top-k, top-p and the draw (argmax(p / noise), the draw torch.multinomial makes) fused
        drawn = ops.sample_cfg_top_k_top_p(self._transformer(run, si), cfg * ratio, top_k, top_p,
                                           noise=run.noise(si), return_filtered=more_smooth,
                                           validate=self.device.type != "cuda")
        tokens, logits = drawn if more_smooth else (drawn, None)
        run.tokens[si].copy_(tokens)
        # a bad row drew -1 (CUDA: no sync here; stream() raises after the sample); never index past the codebook
        tokens = tokens.clamp(0, self.var.V - 1)
        if more_smooth:
            g = (logits.mul(1 + ratio) + (-run.gumbel(si).log())) / ref_sampling.smooth_tau(ratio)
            codes = (g.softmax(-1) @ self.quant.embedding.weight.unsqueeze(0)).transpose_(1, 2)
            _, nxt = self.quant.get_next_autoregressive_input(si, S, run.f_hat, codes.reshape(B, var.Cvae, ph, pw),
                                                              fused_conv=self.fused_step_conv)
        else:   # the codes are gathered inside the upsample kernel: no (B, Cvae, h, w) map
            _, nxt = self.quant.get_next_autoregressive_input_from_idx(si, S, run.f_hat, tokens, validate=False,
                                                                       fused_conv=self.fused_step_conv)
        if si + 1 < S:
            b0, b1 = self.begins[si + 1]
            x_next = F.linear(nxt.view(B, var.Cvae, -1).transpose(1, 2).to(self.dtype), w.word_w, w.word_b)
            x_next = x_next + run.lvl_pos[:, b0:b1]
            run.x_in[si + 1][:B].copy_(x_next)
            run.x_in[si + 1][B:].copy_(x_next)

    def _replay_or_run(self, run: _Run, si: int, settings: tuple) -> None:
        # the dtypes are the sampler's, not autocast's; graphs capture on (and Triton launches on) the current
        # device, so the sampler's device is made current for the step
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.autocast(self.device.type, enabled=False), on_device:
            if not self.cuda_graphs:
                self._scale_step(run, si, *settings)
                return
            graphs = run.graphs.get(settings)
            if graphs is None:
                if len(run.graphs) >= run.MAX_GRAPH_SETTINGS:       # least recently used settings go first
                    old, _ = run.graphs.popitem(last=False)
                    del run.graph_bytes[old]
                graphs = run.graphs[settings] = self._capture(run, settings)
            run.graphs.move_to_end(settings)
            graphs[si].replay()

    def _capture(self, run: _Run, settings: tuple) -> List["torch.cuda.CUDAGraph"]:
        """Capture every scale step of these settings (called at scale 0 of a sample, after ``_prepare``).
        The warm-up runs the steps once on the current buffers (Triton compiles, cuBLAS picks its
        kernels); every step reads only what earlier steps of the same sample write, so the replays
        that follow start clean once f_hat is zero again."""
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for si in range(len(self.hws)):
                self._scale_step(run, si, *settings)
        torch.cuda.current_stream(dev).wait_stream(side)
        # torch.cuda.graph empties the allocator's cache on entry: do it first, so that the baseline does not
        # count the warm-up's freed blocks and the difference is the graphs' memory pool
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(dev)
        graphs, pool = [], None
        for si in range(len(self.hws)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._scale_step(run, si, *settings)
            pool = g.pool()
            graphs.append(g)
        run.f_hat.zero_()
        run.graph_bytes[settings] = torch.cuda.memory_reserved(dev) - reserved
        return graphs

    # ------------------------------------------------------------------ public API
    def _check(self, cfg, top_k, top_p):
        cfg = check_finite_scalar("cfg", cfg)
        top_k, top_p = check_top_k_top_p(top_k, top_p, self.var.V)
        return cfg, top_k, top_p

    def stream(self, labels: Union[torch.Tensor, Sequence[int], int, None], seed: Optional[int] = None,
               cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, more_smooth: bool = False, *,
               B: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Iterator[ScaleResult]:
        """Sample, yielding a :class:`ScaleResult` as each scale finishes (coarse to fine).

        ``labels``: a ``(B,)`` tensor or list of class ids, an int (all the same; negative = no class)
        with ``B``, or None (``B`` random classes). ``seed`` seeds a fresh generator on the model's
        device (or pass ``generator``; None and None: the global RNG). ``top_k`` must be <= V.
        Arguments are checked here, not at the first ``next()``.
        """
        cfg, top_k, top_p = self._check(cfg, top_k, top_p)
        rng = self._generator(seed, generator)
        if B is None:
            sized = isinstance(labels, (list, tuple)) or (isinstance(labels, torch.Tensor) and labels.dim() > 0)
            B = len(labels) if sized else 1
        labels = sampling_labels(B, labels, self.var.num_classes, rng, self.device, name="labels")
        return self._stream(labels, rng, cfg, top_k, top_p, bool(more_smooth))

    @torch.no_grad()
    def _stream(self, labels: torch.Tensor, rng: Optional[torch.Generator], cfg: float, top_k: int, top_p: float,
                more_smooth: bool) -> Iterator[ScaleResult]:
        B = labels.shape[0]
        if weights_fingerprint(self.w.slots) != self.w.fingerprint:     # trained, reloaded or moved since the cast
            self.refresh()
        run = self._runs.get(B)
        if run is None:
            run = self._runs[B] = _Run(self, B)
        elif run.busy:      # another stream of this batch size is suspended mid-sample: do not touch its buffers
            run = _Run(self, B)
        run.busy = True
        try:
            with torch.autocast(self.device.type, enabled=False):
                self._prepare(run, labels)
            S = len(self.hws)
            settings = (cfg, top_k, top_p, more_smooth)
            for si in range(S):
                run.noise(si).exponential_(generator=rng)          # the draw torch.multinomial makes
                if more_smooth:
                    run.gumbel(si).exponential_(generator=rng)     # then the Gumbel noise, as the official code
                self._replay_or_run(run, si, settings)
                if si == S - 1:
                    self._check_tokens(run)
                yield ScaleResult(si, S, self.hws[si], run.tokens[si].clone(), run.f_hat.clone(), self.decode)
        finally:
            run.busy = False

    def _check_tokens(self, run: _Run) -> None:
        """On CUDA the draw does not stop the GPU to validate logits: a row of NaN, +inf or only -inf
        logits draws -1. One check per sample, here, turns that into a clear error."""
        for si, t in enumerate(run.tokens):
            if bool((t < 0).any()):
                raise ValueError(f"the logits of scale {si} hold NaN, +inf or a row that is entirely -inf "
                                 "(a diverged model or weights?); cannot sample")

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, Cvae, H, W)`` latent -> images ``(B, 3, H_img, W_img)`` in [0, 1]."""
        dtype = next(p.dtype for p in self.vae.parameters() if p.is_floating_point())
        return self.vae.fhat_to_img(f_hat.to(dtype)).add_(1).mul_(0.5)

    @torch.no_grad()
    def sample(self, labels, seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
               more_smooth: bool = False, *, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample images ``(B, 3, H, W)`` in [0, 1]; arguments as :meth:`stream`."""
        last = None
        for last in self.stream(labels, seed, cfg, top_k, top_p, more_smooth, B=B, generator=generator):
            pass
        return last.preview()

    @torch.no_grad()
    def tokens(self, labels, seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
               more_smooth: bool = False, *, B: Optional[int] = None, generator: Optional[torch.Generator] = None
               ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Sample without decoding: ``(tokens per scale, final f_hat)``."""
        results = list(self.stream(labels, seed, cfg, top_k, top_p, more_smooth, B=B, generator=generator))
        return [r.tokens for r in results], results[-1].f_hat
