"""The fast sampler: next-scale generation, scale by scale, on fastvar's ops, for VAR (class-conditional) and
Infinity (text-to-image, bitwise tokens).

Compared with the official ``autoregressive_infer_cfg`` (same algorithm, same random-number use), for VAR:
- the AdaLN modulation of every block and of the head is computed once per sample, not per scale
  (the condition never changes across scales);
- LayerNorm + modulation and the gated residual are one fused op (``ops.gated_residual_adaln``);
- weights are cast once to the compute dtype (no per-call casts);
- every layer's KV cache is preallocated for the whole schedule and written in place;
- the per-scale glue (sampling, code lookup, upsample-accumulate, next input) runs on fastvar's ops;
- on CUDA, each scale step is captured once per (batch, settings) in a CUDA graph and replayed.

This module drives the scales: buffers per run (batch size, and for Infinity the schedule), CUDA graphs and
random numbers. The model's part of each scale is its adapter's (:class:`fastvar.sampler.var.VARAdapter`,
:class:`fastvar.sampler.infinity.InfinityAdapter`: settings, conditioning, buffers, the scale step, decoding);
the kernels live in ``fastvar.ops``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from fastvar.sampler.infinity import InfinityAdapter
from fastvar.sampler.var import VARAdapter
from fastvar.settings import InfinitySettings, SamplingSettings, check_seed

Adapter = Union[VARAdapter, InfinityAdapter]
Settings = Union[SamplingSettings, InfinitySettings]

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_seeds(seeds, name: str = "seed") -> List[int]:
    """Integer seeds as ``torch.Generator.manual_seed`` takes them (:func:`fastvar.settings.check_seed`)."""
    out = [check_seed(s, name) for s in seeds]
    if None in out:
        raise TypeError(f"{name} must hold ints, got None")
    return out


@dataclasses.dataclass
class ScaleResult:
    """One finished scale of :meth:`Sampler.stream`.

    ``index``: the scale (0 = coarsest); ``hw``: its token map size; ``tokens``: ``(B, h*w)`` int64 (VAR), or
    Infinity's sampled bits ``(B, h*w*d_t)`` uint8; ``f_hat``: ``(B, Cvae, H, W)`` float32 latent accumulated so
    far (a copy; Infinity: the summed codes ``(B, d, H, W)``). ``preview()`` decodes ``f_hat`` into images
    ``(B, 3, H_img, W_img)`` in [0, 1] on first call (decoding costs more than a scale of sampling, so it only
    happens when asked for).
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


class _Run:
    """One run key (VAR: the batch size; Infinity: batch size and schedule): the model's static buffers and the
    CUDA graphs captured on them, per settings (the graphs read and write only these buffers, so they replay for
    every sample of that run)."""

    MAX_GRAPH_SETTINGS = 4     # captured settings kept per run (each holds S graphs and their memory)

    def __init__(self, model: Adapter, key):
        # the adapter (weights) this run's steps and graphs read: a refresh while a stream of this run is
        # suspended leaves it on the weights it started with, never on freed memory
        self.model, self.key, self.busy = model, key, False
        self.buf = model.buffers(key)
        self.graphs: "collections.OrderedDict[Settings, List[torch.cuda.CUDAGraph]]" = collections.OrderedDict()
        self.graph_bytes: Dict[Settings, int] = {}

    def drop_graphs(self) -> None:
        self.graphs.clear()
        self.graph_bytes.clear()


def family_of(module) -> str:
    """The ``family`` a model class declares (fastvar's Infinity: ``"infinity"``), else ``"var"``: the sampler reads
    the models through their attributes and never imports them (they import it)."""
    return getattr(type(module), "family", "var")


def adapter_for(var, vae, dtype: torch.dtype, fused_step_conv: bool = False) -> Adapter:
    """The adapter of ``var``'s family: fastvar's ``Infinity`` -> :class:`InfinityAdapter`; a fastvar ``VAR`` or an
    official VAR patched by ``fastvar.patch`` -> :class:`VARAdapter`; anything else a ``TypeError``."""
    if family_of(var) == "infinity":
        if fused_step_conv:
            raise ValueError("fused_step_conv applies to VAR's quantizer step; Infinity's step has no convolution")
        if vae is None:
            raise TypeError("vae must be the Infinity model's BSQ VAE (fastvar.BSQVAE), got None")
        return InfinityAdapter(var, vae, dtype)
    vae = vae if vae is not None else var.vae_proxy[0]
    if not isinstance(vae, torch.nn.Module) or not hasattr(vae, "fhat_to_img") or not hasattr(vae, "quantize"):
        raise TypeError(f"vae must be a VQVAE (fastvar.VQVAE, or an official one patched by fastvar.patch) or "
                        f"None (the VAR's own), got {type(vae).__name__}")
    return VARAdapter(var, vae, dtype, fused_conv=fused_step_conv)


class Sampler:
    """Fast sampling for a fastvar ``VAR`` or an official VAR patched by ``fastvar.patch`` (class-conditional), or a
    fastvar ``Infinity`` or an official Infinity patched by ``fastvar.patch`` (text-to-image; sampled through the
    fastvar ``Infinity`` made of its modules that the patch leaves in ``fastvar_proxy``): one driver, the model's
    part of each scale in its adapter.

    Args:
        var: the transformer: a VAR (its VQVAE is taken from ``var.vae_proxy`` unless ``vae`` is given) or an
            Infinity.
        vae: the VQVAE that decodes ``f_hat`` (VAR: its quantizer must be fastvar's or patched; Infinity: the BSQ
            VAE, required).
        dtype: compute dtype of the transformer (float32 or bfloat16 on CPU; float32, float16 or
            bfloat16 on CUDA). None (default): bfloat16 on CUDA; on CPU the weights' dtype (float32 for
            released checkpoints; bfloat16 there has no fast products: the bundled model samples 3x slower in
            it). Where the weights already have it, the Sampler reads the model's own tensors; otherwise it
            holds casts.
        sync_weights: when a sample sees the model's current weights. ``"every_sample"`` (default): every
            edit, however made (``.data``, EMA ``lerp_``, inference tensors): each sample copies the weights
            into the held casts, in place (one read of every weight and one write of the casts, e.g. 8 GB +
            4 GB for VAR-d30 in float32 sampled in bfloat16; nothing but the qkv biases when ``dtype`` is the
            weights' own). ``"on_change"``: only after an edit that moves a version counter (in-place torch ops,
            optimizer steps, ``load_state_dict``), which edits through ``.data`` do not; use it when the
            weights are edited no other way, or call :meth:`refresh` after such an edit. Either way a replaced,
            moved or re-allocated tensor (of the VAR or the VQVAE) rebuilds the casts and drops the graphs.
        cuda_graphs: capture each scale step once per (batch size, settings) and replay it (CUDA only).
        fused_step_conv: compute Phi's 3x3 convolution inside the Triton sampling step (two launches per
            scale instead of three; see :func:`fastvar.ops.upsample_accumulate_`; the eager backend ignores
            it); off by default, which keeps the eager step's bits. Fixed for the Sampler's lifetime: its
            CUDA graphs are captured with it.
        max_batch_sizes: buffers (KV caches: ~20 GB for VAR-d30 at B = 64) and graphs are kept for this
            many runs (batch sizes; for Infinity, batch size and schedule pairs), the least recently used dropped
            first.

    ``sample`` returns images; ``stream`` yields every scale as it finishes. The random-number use is
    the official one: in float32 the same ``seed`` gives the official model's tokens (bits); in 16 bits the
    logits round differently from float32's, which moves some tokens. The conditioning and the
    settings are the family's: VAR ``sample(labels, seed, cfg, top_k, top_p, more_smooth)``; Infinity
    ``sample(text, seed, scale_schedule=..., cfg=..., tau=..., top_k=..., top_p=..., cfg_insertion_layer=...,
    negative=...)`` (see :meth:`stream`).
    """

    def __init__(self, var, vae=None, dtype: Optional[torch.dtype] = None, cuda_graphs: bool = True,
                 fused_step_conv: bool = False, max_batch_sizes: int = 2, sync_weights: str = "every_sample"):
        var = getattr(var, "fastvar_proxy", (var,))[0]      # an official Infinity patched by fastvar.patch: its view
        infinity = family_of(var) == "infinity"
        if not isinstance(var, torch.nn.Module) or not (hasattr(var, "lvl_1L") or infinity):
            hint = ": that is the VQVAE; the transformer comes first, Sampler(var, vae)" if hasattr(
                var, "fhat_to_img") else ""
            raise TypeError(f"var must be a VAR model (fastvar.VAR or an official VAR patched by fastvar.patch) or "
                            f"an Infinity (fastvar's, or an official one that fastvar.patch swapped entirely), got "
                            f"{type(var).__name__}{hint}")
        device = var.pos_start.device if infinity else var.lvl_1L.device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else var.head.weight.dtype)
        allowed = _CUDA_DTYPES if device.type == "cuda" else _CPU_DTYPES
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {[str(d) for d in allowed]} on {device.type}, got {dtype}")
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype torch.bfloat16 is not supported by this GPU; use torch.float16")
        if isinstance(max_batch_sizes, bool) or not isinstance(max_batch_sizes, int) or max_batch_sizes < 1:
            raise ValueError(f"max_batch_sizes must be a positive int, got {max_batch_sizes!r}")
        if sync_weights not in ("every_sample", "on_change"):
            raise ValueError(f"sync_weights must be 'every_sample' or 'on_change', got {sync_weights!r}")
        self.sync_weights = sync_weights
        self.model: Adapter = adapter_for(var, vae, dtype, fused_step_conv)
        self.cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        self.max_batch_sizes = max_batch_sizes
        self._runs: "collections.OrderedDict[object, _Run]" = collections.OrderedDict()

    var = property(lambda self: self.model.var)
    vae = property(lambda self: self.model.vae)
    dtype = property(lambda self: self.model.dtype)
    device = property(lambda self: self.model.device)
    schedule = property(lambda self: self.model.schedule)      # VAR's; None for Infinity (per request)
    family = property(lambda self: self.model.family)         # "var" or "infinity"

    @property
    def fused_step_conv(self) -> bool:
        """Whether the sampling step computes Phi's convolution inside its Triton kernel (read-only)."""
        return self.model.fused_conv

    # ------------------------------------------------------------------ resources
    def refresh(self) -> None:
        """Re-cast the weights from the model now (a sample does it anyway when they changed); drops graphs."""
        self.model = self.model.rebuilt()
        self.free()

    def memory(self) -> Dict[str, int]:
        """Bytes held: the cast weights (0 when they are the model's own tensors), the static buffers (KV
        caches included) and the memory the CUDA graphs reserved when they were captured, in all; and
        ``per_batch_size``: buffers + graphs of each run kept (at most ``max_batch_sizes``), keyed by batch size
        (VAR) or (batch size, schedule) (Infinity)."""
        per = {B: r.buf.nbytes() + sum(r.graph_bytes.values()) for B, r in self._runs.items()}
        return {"weights": self.model.weight_bytes(), "buffers": sum(r.buf.nbytes() for r in self._runs.values()),
                "graphs": sum(b for r in self._runs.values() for b in r.graph_bytes.values()),
                "per_batch_size": per}

    def free(self, empty_cache: bool = True) -> None:
        """Release the KV caches, buffers and CUDA graphs (they are rebuilt on the next call); ``empty_cache``:
        also hand the allocator's cached blocks back to the GPU (``torch.cuda.empty_cache``)."""
        self._runs.clear()
        if empty_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run(self, key) -> _Run:
        run = self._runs.get(key)
        if run is not None and run.busy:   # another stream of this run is suspended mid-sample
            return _Run(self.model, key)
        if run is None:
            while len(self._runs) >= self.max_batch_sizes:      # least recently used run goes first
                self._runs.popitem(last=False)
            run = self._runs[key] = _Run(self.model, key)
        self._runs.move_to_end(key)
        return run

    # ------------------------------------------------------------------ the scales
    def _step(self, run: _Run, si: int, settings: Settings) -> None:
        # the dtypes are the sampler's, not autocast's; graphs capture on (and Triton launches on) the current
        # device, so the sampler's device is made current for the step
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.autocast(self.device.type, enabled=False), on_device:
            if not self.cuda_graphs:
                run.model.step(run.buf, si, settings)
                return
            graphs = run.graphs.get(settings)
            if graphs is None:
                if len(run.graphs) >= run.MAX_GRAPH_SETTINGS:       # least recently used settings go first
                    old, _ = run.graphs.popitem(last=False)
                    del run.graph_bytes[old]
                graphs = run.graphs[settings] = self._capture(run, settings)
            run.graphs.move_to_end(settings)
            graphs[si].replay()

    def _capture(self, run: _Run, settings: Settings) -> List["torch.cuda.CUDAGraph"]:
        """Capture every scale step of these settings (called at scale 0 of a sample, after the conditioning).
        The warm-up runs the steps once on the current buffers (Triton compiles, cuBLAS picks its kernels);
        every step reads only what earlier steps of the same sample write, so the replays that follow start
        clean once f_hat is zero again."""
        dev, S = self.device, run.model.num_scales(run.buf)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for si in range(S):
                run.model.step(run.buf, si, settings)
        torch.cuda.current_stream(dev).wait_stream(side)
        # torch.cuda.graph empties the allocator's cache on entry: do it first, so that the baseline does not
        # count the warm-up's freed blocks and the difference is the graphs' memory pool
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(dev)
        graphs, pool = [], None
        for si in range(S):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                run.model.step(run.buf, si, settings)
            pool = g.pool()
            graphs.append(g)
        run.buf.f_hat.zero_()
        run.graph_bytes[settings] = torch.cuda.memory_reserved(dev) - reserved
        return graphs

    # ------------------------------------------------------------------ public API
    def settings(self, *args, **kwargs) -> Settings:
        """The checked settings value of this model's family: VAR ``settings(cfg=None, top_k=None, top_p=None,
        more_smooth=False)`` -> :class:`~fastvar.settings.SamplingSettings` (``top_k`` at most V; None: the
        model's default, see :meth:`stream`); Infinity
        ``settings(scale_schedule=None, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, cfg_insertion_layer=(0,))`` ->
        :class:`~fastvar.settings.InfinitySettings`."""
        return self.model.settings(*args, **kwargs)

    def stream(self, labels, seed: Optional[int] = None, *args, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None, image_seeds: Optional[Sequence[int]] = None,
               **kwargs) -> Iterator[ScaleResult]:
        """Sample, yielding a :class:`ScaleResult` as each scale finishes (coarse to fine).

        VAR: ``stream(labels, seed=None, cfg=None, top_k=None, top_p=None, more_smooth=False, *, B, generator,
        image_seeds)``. ``labels``: class ids, integers only: a ``(B,)`` tensor, numpy array, list or tuple, or one
        int (all the same; negative = no class) with ``B``, or None (``B`` random classes). ``cfg``, ``top_k``
        (<= V), ``top_p``: None takes the model's default (:func:`fastvar.settings.default_settings`: the settings
        the model carries, e.g. the bundled digits model's, else the released checkpoints' cfg 1.5 / top-k 900
        (at most V) / top-p 0.96).

        Infinity: ``stream(text, seed=None, *, scale_schedule=None, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
        cfg_insertion_layer=(0,), negative=None, B, generator, image_seeds)``. ``text``: the official tuple
        ``(kv_compact (N, C_t5), lens, cu_seqlens_k (B+1,) int32, max_seqlen_k)`` of B prompts' (T5) features;
        ``scale_schedule`` a full dynamic-resolution schedule (default 1:1, 1024 px); ``cfg`` / ``tau`` a number or
        one value per scale (official ``cfg_list`` / ``tau_list``); ``cfg_insertion_layer`` 0 = guidance on the
        logits, ``k < 0`` on the hidden state after block ``depth + k``; ``negative``: negative prompts' tuple
        (default: the model's empty prompt ``cfg_uncond``). Runs (buffers, graphs) are kept per (B, schedule).

        ``seed`` seeds a fresh generator on the model's device (or pass ``generator``; None and None: the global
        RNG): the batch draws its random numbers together, in the official order, so the same seed gives the
        official model's tokens / bits (in float32). ``image_seeds`` (instead): one seed per image (``B`` ints),
        each image drawing from its own generator, so that an image does not depend on the batch it is sampled in
        (``fastvar generate``). Arguments are checked here, not at the first ``next()``.
        """
        cond_kwargs = {k: kwargs.pop(k) for k in ("negative",) if k in kwargs}
        settings = self.model.settings(*args, **kwargs)
        if image_seeds is not None:
            if seed is not None or generator is not None:
                raise ValueError("pass image_seeds, or seed / generator, not both")
            rng = [torch.Generator(device=self.device).manual_seed(s) for s in check_seeds(image_seeds)]
            if labels is None and self.family == "var":
                raise ValueError("image_seeds needs the labels of the images (labels=None draws them from one generator)")
            B = len(rng) if B is None else B
            if B != len(rng):
                raise ValueError(f"image_seeds must hold B={B} seeds, got {len(rng)}")
        else:
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            rng = generator if generator is not None else (
                None if seed is None else torch.Generator(device=self.device).manual_seed(check_seeds([seed])[0]))
        B, cond = self.model.conditioning(labels, B, rng, settings, **cond_kwargs)
        return self._stream(cond, B, rng, settings)

    @torch.no_grad()
    def _stream(self, cond, B: int, rng, settings: Settings) -> Iterator[ScaleResult]:
        if self.model.stale():      # a tensor replaced or moved since the casts were made
            self.refresh()
        else:
            self.model.sync(always=self.sync_weights == "every_sample")
        run = self._run(self.model.run_key(B, settings))
        run.busy = True
        model, buf = run.model, run.buf
        S = model.num_scales(buf)
        try:
            with torch.autocast(self.device.type, enabled=False):
                if model.condition(buf, cond):       # the buffers the graphs read were reallocated
                    run.drop_graphs()
            for si in range(S):
                model.draw_noise(buf, si, rng, settings)
                self._step(run, si, settings)
                if si == S - 1:
                    model.check_tokens(buf)
                hw, tokens, f_hat = model.snapshot(buf, si)
                yield ScaleResult(si, S, hw, tokens, f_hat, model.decode)
        finally:
            run.busy = False

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, Cvae, H, W)`` latent -> images ``(B, 3, H_img, W_img)`` in [0, 1]."""
        return self.model.decode(f_hat)

    @torch.no_grad()
    def sample(self, labels, seed: Optional[int] = None, *args, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None, image_seeds: Optional[Sequence[int]] = None,
               **kwargs) -> torch.Tensor:
        """Sample images ``(B, 3, H, W)`` in [0, 1] (RGB); arguments as :meth:`stream`."""
        last = None
        for last in self.stream(labels, seed, *args, B=B, generator=generator, image_seeds=image_seeds, **kwargs):
            pass
        return last.preview()

    @torch.no_grad()
    def tokens(self, labels, seed: Optional[int] = None, *args, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None, image_seeds: Optional[Sequence[int]] = None,
               **kwargs) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Sample without decoding: ``(tokens per scale, final f_hat)`` (Infinity: the bits per scale and the
        summed codes)."""
        results = list(self.stream(labels, seed, *args, B=B, generator=generator, image_seeds=image_seeds, **kwargs))
        return [r.tokens for r in results], results[-1].f_hat
