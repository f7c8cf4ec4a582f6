"""The fast sampler: VAR's class-conditional generation, scale by scale, on fastvar's ops.

Compared with the official ``autoregressive_infer_cfg`` (same algorithm, same random-number use):
- the AdaLN modulation of every block and of the head is computed once per sample, not per scale
  (the condition never changes across scales);
- LayerNorm + modulation and the gated residual are one fused op (``ops.gated_residual_adaln``);
- weights are cast once to the compute dtype (no per-call casts);
- every layer's KV cache is preallocated for the whole schedule and written in place;
- the per-scale glue (sampling, code lookup, upsample-accumulate, next input) runs on fastvar's ops;
- on CUDA, each scale step is captured once per (batch, settings) in a CUDA graph and replayed.

This module drives the scales: buffers per batch size, CUDA graphs and random numbers. The model's part
of each scale is its adapter's (:class:`fastvar.models.var.VARAdapter`); the kernels live in ``fastvar.ops``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from fastvar.labels import batch_size_of, sampling_labels
from fastvar.models.var import VARAdapter
from fastvar.settings import SamplingSettings, check_seed, resolve_settings

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


class _Run:
    """One batch size: the model's static buffers and the CUDA graphs captured on them, per settings (the
    graphs read and write only these buffers, so they replay for every sample of that batch size)."""

    MAX_GRAPH_SETTINGS = 4     # captured settings kept per batch size (each holds S graphs and their memory)

    def __init__(self, model: VARAdapter, B: int):
        # the adapter (weights) this run's steps and graphs read: a refresh while a stream of this run is
        # suspended leaves it on the weights it started with, never on freed memory
        self.model, self.B, self.busy = model, B, False
        self.buf = model.buffers(B)
        self.graphs: "collections.OrderedDict[SamplingSettings, List[torch.cuda.CUDAGraph]]" = collections.OrderedDict()
        self.graph_bytes: Dict[SamplingSettings, int] = {}


class Sampler:
    """Fast class-conditional sampling for a fastvar ``VAR`` or an official VAR patched by ``fastvar.patch``.

    Args:
        var: the transformer (its VQVAE is taken from ``var.vae_proxy`` unless ``vae`` is given).
        vae: the VQVAE that decodes ``f_hat`` (its quantizer must be fastvar's or patched).
        dtype: compute dtype of the transformer (float32 or bfloat16 on CPU; float32, float16 or
            bfloat16 on CUDA). Where the weights already have it, the Sampler reads the model's own tensors;
            otherwise it holds casts.
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
            many batch sizes, the least recently used dropped first.

    ``sample`` returns images; ``stream`` yields every scale as it finishes. The random-number use is
    the official one: the same ``seed`` gives the official model's tokens.
    """

    def __init__(self, var, vae=None, dtype: Optional[torch.dtype] = torch.bfloat16, cuda_graphs: bool = True,
                 fused_step_conv: bool = False, max_batch_sizes: int = 2, sync_weights: str = "every_sample"):
        if not isinstance(var, torch.nn.Module) or not hasattr(var, "lvl_1L"):
            hint = ": that is the VQVAE; the transformer comes first, Sampler(var, vae)" if hasattr(
                var, "fhat_to_img") else ""
            raise TypeError(f"var must be a VAR model (fastvar.VAR or an official VAR patched by fastvar.patch), "
                            f"got {type(var).__name__}{hint}")
        vae = vae if vae is not None else var.vae_proxy[0]
        if not isinstance(vae, torch.nn.Module) or not hasattr(vae, "fhat_to_img") or not hasattr(vae, "quantize"):
            raise TypeError(f"vae must be a VQVAE (fastvar.VQVAE, or an official one patched by fastvar.patch) or "
                            f"None (the VAR's own), got {type(vae).__name__}")
        device = var.lvl_1L.device
        dtype = dtype or var.head.weight.dtype
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
        self.model = VARAdapter(var, vae, dtype, fused_conv=fused_step_conv)
        self.cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        self.max_batch_sizes = max_batch_sizes
        self._runs: "collections.OrderedDict[int, _Run]" = collections.OrderedDict()

    var = property(lambda self: self.model.var)
    vae = property(lambda self: self.model.vae)
    dtype = property(lambda self: self.model.dtype)
    device = property(lambda self: self.model.device)
    schedule = property(lambda self: self.model.schedule)

    @property
    def fused_step_conv(self) -> bool:
        """Whether the sampling step computes Phi's convolution inside its Triton kernel (read-only)."""
        return self.model.fused_conv

    # ------------------------------------------------------------------ resources
    def refresh(self) -> None:
        """Re-cast the weights from the model now (a sample does it anyway when they changed); drops graphs."""
        m = self.model
        self.model = VARAdapter(m.var, m.vae, m.dtype, fused_conv=m.fused_conv)
        self.free()

    def memory(self) -> Dict[str, int]:
        """Bytes held: the cast weights (0 when they are the model's own tensors), the static buffers (KV
        caches included) and the memory the CUDA graphs reserved when they were captured, in all; and
        ``per_batch_size``: buffers + graphs of each batch size kept (at most ``max_batch_sizes``)."""
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

    def _run(self, B: int) -> _Run:
        run = self._runs.get(B)
        if run is not None and run.busy:   # another stream of this batch size is suspended mid-sample
            return _Run(self.model, B)
        if run is None:
            while len(self._runs) >= self.max_batch_sizes:      # least recently used batch size goes first
                self._runs.popitem(last=False)
            run = self._runs[B] = _Run(self.model, B)
        self._runs.move_to_end(B)
        return run

    # ------------------------------------------------------------------ the scales
    def _step(self, run: _Run, si: int, settings: SamplingSettings) -> None:
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

    def _capture(self, run: _Run, settings: SamplingSettings) -> List["torch.cuda.CUDAGraph"]:
        """Capture every scale step of these settings (called at scale 0 of a sample, after the conditioning).
        The warm-up runs the steps once on the current buffers (Triton compiles, cuBLAS picks its kernels);
        every step reads only what earlier steps of the same sample write, so the replays that follow start
        clean once f_hat is zero again."""
        dev, S = self.device, len(self.schedule)
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
    def settings(self, cfg: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 more_smooth: bool = False) -> SamplingSettings:
        """The checked :class:`~fastvar.settings.SamplingSettings` for this model (``top_k`` at most V); each
        setting left None is the model's default (:func:`fastvar.settings.default_settings`: the settings the
        model carries, e.g. the bundled digits model's cfg 2 / top-k 0 / top-p 0, else the released
        checkpoints' cfg 1.5 / top-k 900 (at most V) / top-p 0.96)."""
        return resolve_settings(self.model.var, cfg, top_k, top_p, more_smooth)

    def stream(self, labels: Union[torch.Tensor, Sequence[int], int, None], seed: Optional[int] = None,
               cfg: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
               more_smooth: bool = False, *, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Iterator[ScaleResult]:
        """Sample, yielding a :class:`ScaleResult` as each scale finishes (coarse to fine).

        ``labels``: class ids, integers only: a ``(B,)`` tensor, numpy array, list or tuple, or one int (all
        the same; negative = no class) with ``B``, or None (``B`` random classes). ``seed`` (an int) seeds a
        fresh generator on the model's device (or pass ``generator``; None and None: the global RNG).
        ``cfg``, ``top_k`` (<= V), ``top_p``: None takes the model's default (see :meth:`settings`).
        Arguments are checked here, not at the first ``next()``.
        """
        settings = self.settings(cfg, top_k, top_p, more_smooth)
        seed = check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        rng = generator if generator is not None else (
            None if seed is None else torch.Generator(device=self.device).manual_seed(seed))
        if B is None:
            B = batch_size_of(labels)
        labels = sampling_labels(B, labels, self.model.num_classes, rng, self.device, name="labels")
        return self._stream(labels, rng, settings)

    @torch.no_grad()
    def _stream(self, labels: torch.Tensor, rng: Optional[torch.Generator],
                settings: SamplingSettings) -> Iterator[ScaleResult]:
        if self.model.stale():      # a tensor replaced or moved since the casts were made
            self.refresh()
        else:
            self.model.sync(always=self.sync_weights == "every_sample")
        run = self._run(labels.shape[0])
        run.busy = True
        model, buf, schedule = run.model, run.buf, self.schedule
        S = len(schedule)
        try:
            with torch.autocast(self.device.type, enabled=False):
                model.condition(buf, labels)
            for si in range(S):
                model.draw_noise(buf, si, rng, settings.more_smooth)
                self._step(run, si, settings)
                if si == S - 1:
                    model.check_tokens(buf)
                yield ScaleResult(si, S, schedule.hws[si], buf.tokens[si].clone(), buf.f_hat.clone(), model.decode)
        finally:
            run.busy = False

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, Cvae, H, W)`` latent -> images ``(B, 3, H_img, W_img)`` in [0, 1]."""
        return self.model.decode(f_hat)

    @torch.no_grad()
    def sample(self, labels, seed: Optional[int] = None, cfg: Optional[float] = None, top_k: Optional[int] = None,
               top_p: Optional[float] = None, more_smooth: bool = False, *, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample images ``(B, 3, H, W)`` in [0, 1]; arguments as :meth:`stream`."""
        last = None
        for last in self.stream(labels, seed, cfg, top_k, top_p, more_smooth, B=B, generator=generator):
            pass
        return last.preview()

    @torch.no_grad()
    def tokens(self, labels, seed: Optional[int] = None, cfg: Optional[float] = None, top_k: Optional[int] = None,
               top_p: Optional[float] = None, more_smooth: bool = False, *, B: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Sample without decoding: ``(tokens per scale, final f_hat)``."""
        results = list(self.stream(labels, seed, cfg, top_k, top_p, more_smooth, B=B, generator=generator))
        return [r.tokens for r in results], results[-1].f_hat
