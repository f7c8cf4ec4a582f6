"""End-to-end sampling benchmark (``fastvar bench``, ``bench/bench_e2e.py``).

Providers, side by side in one run, on random weights at the released sizes (speed does not depend
on weight values):
- ``eager``: the official algorithm in eager PyTorch (``fastvar.reference.var_sampling``: AdaLN
  recomputed per scale, ``torch.cat`` KV cache, topk/sort/multinomial), float32 weights under
  ``torch.autocast`` in the compute dtype, as the official demo runs;
- ``compile``: the same loop with every block under ``torch.compile``;
- ``fastvar``: :class:`fastvar.Sampler` (fused ops, preallocated caches, CUDA graphs);
- ``fastvar-fused`` (not run by default): the same with ``fused_step_conv=True`` (Phi's convolution
  inside the sampling step's kernel: two launches per scale instead of three);
- ``fastvar-generate`` (not run by default): what ``fastvar generate`` runs per batch: the Sampler with one
  generator per image (``image_seeds``) and the VAE decode.

Every row also projects the hours of FID-50k (50,000 images, decode included: the VAE decode timed separately
is added to the providers that do not decode) on one GPU and on eight (``fastvar generate`` under torchrun: the
ranks share no data, so eight GPUs take an eighth of the time, plus start-up).

Rows in the layout of every benchmark (``fastvar.utils.benchmarking.COLUMNS``: median, p20, p80 of the wall
time of whole samples, transformer TFLOP/s, peak memory, speedup over eager, the check), then ``model``, ``L``,
``batch``, ``dtype``, ``scale``, ms per image, images/s, the VAE decode timed separately, the transformer's floors
(its FLOPs over the measured dense GEMM rate; its weights over the measured copy bandwidth,
:func:`weight_floor_ms`) and the time over the higher of the two (``over_floor``); fastvar's per-scale breakdown:
one row per scale (``scale``).
Outputs are checked before timing: shapes always; in float32 the first scale's tokens must equal the official
loop's. Results: ``<out_dir>/e2e_<gpu>_<date>.csv``.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastvar.models import build_vae_var
from fastvar.reference import var_sampling
from fastvar.sampler import Sampler
from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512
from fastvar.utils.benchmarking import metadata, plot, result_row, results_path, write_csv

MODELS = {  # name: (depth, shared_aln, schedule)
    "d16": (16, False, PATCH_NUMS_256), "d20": (20, False, PATCH_NUMS_256), "d24": (24, False, PATCH_NUMS_256),
    "d30": (30, False, PATCH_NUMS_256), "d36": (36, True, PATCH_NUMS_512),
}
SMOKE_MODEL = ("d2-smoke", 2, False, (1, 2, 3, 4), 32, 64, 8)   # name, depth, shared, schedule, ch, V, Cvae


def timed(fn, device: torch.device, reps: int, warmup: int = 1):
    """Wall times of ``fn()`` in ms (CUDA-synchronised): (median, p20, p80), and the peak memory of the
    calls above what was allocated before them in MB (None on CPU)."""
    cuda = device.type == "cuda"
    sync = functools.partial(torch.cuda.synchronize, device) if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    mem = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if cuda else None
    return tuple(times[int(q * (len(times) - 1) + 0.5)] for q in (0.5, 0.2, 0.8)), mem


def device_ms(fn, device: torch.device, reps: int) -> float:
    """Median time of ``fn()`` in ms after one warm-up call: CUDA events around each call on a GPU, the wall
    clock on CPU."""
    fn()                                        # warm-up: handles, cuBLAS heuristics
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_gbs(device: torch.device, nbytes: Optional[int] = None, reps: int = 10) -> Tuple[float, float]:
    """Measured device-to-device copy rate, bytes read + written per second in GB/s (the memory bandwidth a
    kernel can use), and the copy's ms. ``nbytes``: the buffer (default 4 GiB on a GPU, far larger than L2;
    4 MiB on CPU)."""
    nbytes = nbytes or ((4 << 30) if device.type == "cuda" else (4 << 20))
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9, ms


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                reps: int = 10) -> Tuple[float, float]:
    """Measured dense GEMM rate in TFLOP/s on random ``n x n`` operands (a product of zeros ran 13% faster on an
    H200), and the product's ms. Default ``n``: 8192 on a GPU, 256 on CPU. float32 products use TF32 here."""
    n = n or (8192 if device.type == "cuda" else 256)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    try:
        ms = device_ms(lambda: a @ b, device, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, ms


# weights applied to the condition (class or text), the same at every scale: a sampler reads them once per sample
CONDITION_WEIGHTS = ("ada_lin", "ada_gss", "ca.mat_kv", "text_", "cfg_uncond", "class_emb", "pos_", "lvl_embed")


def weight_floor_ms(model, scales: int, dtype: torch.dtype, gbs: float) -> float:
    """The weight-bandwidth floor of one sample in ms: ``model``'s weights in ``dtype`` read at ``gbs`` GB/s, those
    of the attention, MLP and head at each of ``scales`` scales, those applied to the condition
    (:data:`CONDITION_WEIGHTS`: AdaLN projections, the text path and the text's keys and values) and the
    embedding tables once. A whole sample at B = 1 is bound by it (weights dominate its memory traffic)."""
    per_scale = once = 0
    for name, p in model.named_parameters():
        if any(key in name for key in CONDITION_WEIGHTS):
            once += p.numel()
        else:
            per_scale += p.numel()
    return (per_scale * scales + once) * dtype.itemsize / (gbs * 1e9) * 1e3


def transformer_flops(var, B: int) -> float:
    """Matmul FLOPs of one CFG sample of ``B`` images (2B rows): projections, attention, head."""
    C, V = var.C, var.V
    flops, prefix = 0.0, 0
    for n in var.schedule.lens:
        prefix += n
        rows = 2 * B * n
        flops += var.depth * (2 * rows * 12 * C * C + 4 * rows * prefix * C)
        flops += 2 * rows * C * V
    return flops


def run_benchmark(models: Sequence[str] = ("d16", "d20", "d24", "d30", "d36"), batches: Sequence[int] = (1, 8, 64),
                  providers: Sequence[str] = ("eager", "compile", "fastvar"), dtype: torch.dtype = torch.bfloat16,
                  cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, reps: int = 5,
                  out_dir: Optional[str] = None, smoke: bool = False, profile: bool = False,
                  log=print) -> List[Dict]:
    """Run the benchmark; returns the rows written to the CSV. ``smoke``: a tiny model on CPU (checks the
    code path; its timings mean nothing). ``profile``: also one more call of every provider under
    ``torch.profiler``, its ops and kernels by device time in ``out_dir/profile_<model>_B<B>_<provider>.txt``
    (what limits a run that misses its target)."""
    if profile and not out_dir:
        raise ValueError("profile needs out_dir, the folder its tables are written to")
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke:
        raise RuntimeError("the sampling benchmark needs a CUDA GPU (use --smoke to check the code path on CPU)")
    meta = metadata(device)
    floor_rate = gemm_tflops(device, dtype if device.type == "cuda" else torch.float32)[0]
    gbs = copy_gbs(device)[0]
    log(f"# {meta['device']} | {meta['date']} | commit {meta['commit']} | {dtype} | dense GEMM {floor_rate:.1f} "
        f"TFLOP/s, copy {gbs:.0f} GB/s measured")
    rows: List[Dict] = []
    peak = "fp32_tflops" if dtype == torch.float32 else "bf16_tflops"
    specs = [SMOKE_MODEL] if smoke else [(m, *MODELS[m], 160, 4096, 32) for m in models]
    for name, depth, shared, schedule, ch, V, Cvae in specs:
        vae, var = build_vae_var(device, patch_nums=schedule, depth=depth, shared_aln=shared, ch=ch, V=V, Cvae=Cvae,
                                 fast_init=True, vae_kwargs=None if not smoke else dict(ch_mult=(1, 2, 2)))
        k = min(top_k, V)
        fast = Sampler(var, vae, dtype=dtype, cuda_graphs=device.type == "cuda")
        fused = Sampler(var, vae, dtype=dtype, cuda_graphs=device.type == "cuda", fused_step_conv=True) \
            if "fastvar-fused" in providers else None
        compiled = None
        if "compile" in providers:
            # Dynamo caches on the shared ``_block`` function: without a reset, the earlier models' graphs use
            # up its recompile limit (8) and "compile" silently times eager code from then on (on CPU, 4 tiny
            # models x batches 1, 8, 64: compiled graphs stop at 8 in the second model; 14 with the reset)
            torch._dynamo.reset()
            compiled = torch.compile(var_sampling._block, dynamic=True)
        for B in batches:
            labels = torch.arange(B, device=device) % var.num_classes
            kw = dict(cfg=cfg, top_k=k, top_p=top_p)
            autocast = dtype if dtype != torch.float32 else None
            runs = {
                "eager": lambda: var_sampling.official_autoregressive_infer_cfg(var, B, labels, 0, autocast=autocast,
                                                                                decode=False, **kw),
                "compile": lambda: var_sampling.official_autoregressive_infer_cfg(var, B, labels, 0, autocast=autocast,
                                                                                  decode=False, block_fn=compiled, **kw),
                "fastvar": lambda: fast.tokens(labels, seed=0, **kw),
                "fastvar-fused": lambda: fused.tokens(labels, seed=0, **kw),
                "fastvar-generate": lambda: fast.sample(labels, image_seeds=list(range(B)), **kw),
            }
            # correctness before timing: one token map per scale of the right size from every provider; in
            # float32, the first scale's tokens equal the official loop's (later scales may part on a near
            # tie of two tokens' p/q, ~1e-6 per row, then follow different f_hats: reported, not asserted)
            tokens = {}
            for p in providers:
                out = runs[p]()
                if p == "fastvar-generate":
                    assert out.shape[0] == B and torch.isfinite(out).all(), p
                    continue
                tokens[p] = out[0] if p.startswith("fastvar") else out[1]
                assert [tuple(t.shape) for t in tokens[p]] == [(B, n) for n in var.schedule.lens], p
            checks = {p: "shapes ok" for p in providers}
            if dtype == torch.float32 and {"eager", "fastvar"} <= set(tokens):
                assert torch.equal(tokens["eager"][0], tokens["fastvar"][0]), "fastvar's first-scale tokens differ"
                same = sum(int((a == b).sum()) for a, b in zip(tokens["eager"], tokens["fastvar"]))
                checks["fastvar"] = f"tokens equal to eager's: {same}/{B * var.L}"
                log(f"  tokens equal to the official loop's: {same}/{B * var.L}")
            floor_ms = transformer_flops(var, B) / (floor_rate * 1e12) * 1e3
            weights_ms = weight_floor_ms(var, len(var.schedule.lens), dtype, gbs)
            f_hat = fast.tokens(labels, seed=0, **kw)[1]
            decode_ms = timed(lambda: fast.decode(f_hat), device, reps)[0][0]
            keys = dict(model=name, L=var.L, batch=B, dtype=str(dtype))
            shape = f"B={B} L={var.L} {str(dtype).removeprefix('torch.')}"
            base = None
            for p in providers:
                ms, mem = timed(runs[p], device, reps)
                base = ms[0] if p == "eager" else base
                fid_h = 50_000 * (ms[0] + (0 if p == "fastvar-generate" else decode_ms)) / B / 3.6e6
                row = result_row(meta, "e2e", name, p, shape, ms, flops=transformer_flops(var, B), peak=peak,
                                 peak_mb=mem, speedup=base / ms[0] if base else None, check=checks[p], **keys,
                                 scale="", ms_per_image=round(ms[0] / B, 3), images_per_s=round(1e3 * B / ms[0], 2),
                                 flop_floor_ms=round(floor_ms, 3), weight_floor_ms=round(weights_ms, 3),
                                 over_floor=round(ms[0] / max(floor_ms, weights_ms), 2),
                                 vae_decode_ms=round(decode_ms, 3),
                                 # 4 significant digits: a short run's hours are fractions, where 3 decimals would break
                                 # the 1-GPU = 8 x 8-GPU relation (0.0375 -> 0.038)
                                 fid50k_hours_1gpu=float(f"{fid_h:.4g}"), fid50k_hours_8gpu=float(f"{fid_h / 8:.4g}"))
                rows.append(row)
                log(f"{name:9s} B={B:3d} {p:8s} {ms[0]:9.2f} ms  {row['images_per_s']:8.1f} img/s  "
                    f"x{row['speedup_vs_eager'] or '-'}  ({row['over_floor']} x the floor: FLOPs {floor_ms:.2f} ms, "
                    f"weights {weights_ms:.2f} ms; decode {decode_ms:.2f} ms)")
            for p, sampler in (("fastvar", fast), ("fastvar-fused", fused)):
                if p in providers:
                    per_scale = scale_breakdown(sampler, labels, kw, device)
                    for si, t in enumerate(per_scale):
                        rows.append(result_row(meta, "e2e", name, p, shape, (t, None, None), check=checks[p], **keys,
                                               scale=si))
                    log(f"  per scale ({p}, ms): {' '.join(f'{t:.3f}' for t in per_scale)}")
            if profile:   # after the timings, which the profiler's overhead would skew
                for p in providers:
                    write_profile(runs[p], device, os.path.join(out_dir, f"profile_{name}_B{B}_{p}.txt"),
                                  f"{name} B={B} {p}, {shape}, {meta['device']}, commit {meta['commit']}", log)
        vae = var = fast = fused = compiled = None   # free this model before building the next
        if out_dir:   # after every model, so a run cut off by a time limit keeps what it measured
            write_csv(rows, results_path(out_dir, "e2e", meta), log)
    if out_dir:
        plot(results_path(out_dir, "e2e", meta), x="batch", panels=("case",), y="ms_per_image",
             where=lambda r: not r["scale"])
    return rows


def write_profile(fn, device: torch.device, path: str, title: str, log=print, rows: int = 40) -> None:
    """One call of ``fn`` under ``torch.profiler``: its ops and kernels, by self device time (CPU time on a CPU),
    as torch's table under ``title``, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows)
    with open(path, "w") as f:
        f.write(f"{title}\n{table}\n")
    log(f"  profile: {path}")


class Marks:
    """Timestamps in the order the device runs the work (CUDA events, or the wall clock on CPU), the first taken
    at construction; ``intervals_ms()`` the milliseconds between consecutive ones (synchronising once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps = []
        self.mark()

    def mark(self, *_) -> None:        # *_: also a forward pre-hook
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps.append(ev)
        else:
            self.stamps.append(time.perf_counter())

    def intervals_ms(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def scale_breakdown(sampler: Sampler, labels, kw, device) -> List[float]:
    """Milliseconds of every scale of one fastvar sample (from the previous scale's end; the first includes the
    conditioning)."""
    marks = Marks(device)
    for _ in sampler.stream(labels, seed=0, **kw):
        marks.mark()
    return marks.intervals_ms()
