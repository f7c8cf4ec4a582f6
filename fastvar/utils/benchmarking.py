"""What every benchmark records (the device and its ceilings, the date, the commit, the versions) and the one
runner, row layout and plot of ``bench/``: a script builds :class:`Case` s (providers, their correctness checks,
the work of one call), :func:`run_cases` times them and writes rows in the layout of :data:`COLUMNS`."""
from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

# Datasheet ceilings (dense, no sparsity). Measure the achieved ones once per machine: the benchmarks
# print measured GEMM rates beside these.
CEILINGS = {   # name fragment: HBM TB/s, bf16 tensor-core TFLOP/s, fp32 (non-tensor-core) TFLOP/s
    "H200": dict(hbm_tbs=4.8, bf16_tflops=989.0, fp32_tflops=67.0),
    "H100 PCIe": dict(hbm_tbs=2.0, bf16_tflops=756.0, fp32_tflops=51.0),
    "H100": dict(hbm_tbs=3.35, bf16_tflops=989.0, fp32_tflops=67.0),
    "A100": dict(hbm_tbs=2.0, bf16_tflops=312.0, fp32_tflops=19.5),
}


def ceiling(device_name: str, key: str, default: Optional[float] = float("nan")) -> Optional[float]:
    """The datasheet ceiling ``key`` (``hbm_tbs``, ``bf16_tflops``, ``fp32_tflops``) of a GPU, or ``default``."""
    for fragment, values in CEILINGS.items():      # longest fragments first by insertion order
        if fragment in device_name:
            return values[key]
    return default


def git_commit() -> str:
    """``$FASTVAR_COMMIT`` if set (a copy of the tree without ``.git``, e.g. on a lent GPU machine), else the
    short hash of the checkout's HEAD, or ``unknown``."""
    if os.environ.get("FASTVAR_COMMIT"):
        return os.environ["FASTVAR_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: Optional[torch.device] = None) -> Dict[str, str]:
    """The columns every result row starts with: the device (``device`` None: the GPU if one is here), the
    date, the commit, the versions."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "triton": triton_version}


def results_path(folder: str, prefix: str, meta: Dict[str, str]) -> str:
    """``<folder>/<prefix>_<device>_<date>.csv``."""
    tag = "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_")
    return os.path.join(folder, f"{prefix}_{tag}_{meta['date']}.csv")


def write_csv(rows: List[Dict], path: str, log=print) -> None:
    """Write result rows (the union of their keys as columns, in first-seen order) to ``path``; ``log`` None:
    silently."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    if log:
        log(f"wrote {path} ({len(rows)} rows)")


def timing_options(parser, prefix: str) -> None:
    """Adds ``--warmup`` and ``--rep`` (ms, for ``triton.testing.do_bench``) and ``--out`` (the CSV path)."""
    parser.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement")
    parser.add_argument("--rep", type=int, default=100, help="ms of repetitions per measurement")
    parser.add_argument("--out", default=None, help=f"CSV path (default bench/results/{prefix}_<gpu>_<date>.csv)")


def require_cuda(script: str) -> bool:
    """True if a CUDA GPU is here; else says so on stderr (the caller exits with status 2)."""
    if torch.cuda.is_available():
        return True
    print(f"{script} needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
          f"Run it on an H100/H200 (python bench/{script}).", file=sys.stderr)
    return False


def device_ops_per_call(fn) -> Optional[int]:
    """GPU operations (kernels, memsets, copies) one call of ``fn`` issues, counted by the profiler after a
    warm-up call (which compiles and autotunes), or None when the profiler records none (e.g. no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return n or None


def compare(out: torch.Tensor, ref: torch.Tensor) -> str:
    """A check column: ``out`` against the reference's output, relative error and bit equality."""
    return f"rel_err={rel_err(out, ref):.2e} bitwise={torch.equal(out, ref)}"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|a - ref| / max|ref|`` in float64; the absolute error when ``ref`` is all zeros."""
    a, ref = a.double(), ref.double()
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


# ------------------------------------------------------------------------------------------ one row layout
# The leading columns of every benchmark's CSV; the script's own key columns follow them.
COLUMNS = ("device", "date", "commit", "torch", "triton", "bench", "case", "provider", "shape", "ms", "ms_p20",
           "ms_p80", "GB/s", "pct_hbm", "TFLOP/s", "pct_peak", "peak_MB", "gpu_ops", "speedup_vs_eager", "check")


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def result_row(meta: Dict[str, str], bench: str, case: str, provider: str, shape: str, ms: Sequence[Optional[float]],
               nbytes: Optional[float] = None, flops: Optional[float] = None, peak: str = "fp32_tflops",
               peak_mb: Optional[float] = None, gpu_ops: Optional[int] = None, speedup: Optional[float] = None,
               check: str = "", **keys) -> Dict[str, object]:
    """One CSV row in the common layout (:data:`COLUMNS`, then ``keys``). ``ms``: (median, p20, p80), the
    quantiles None where not measured; ``nbytes`` / ``flops``: the work of one call (None: blank columns);
    ``peak``: the :func:`ceiling` key ``TFLOP/s`` is a fraction of."""
    med, p20, p80 = ms
    gbs = nbytes / med / 1e6 if nbytes else None
    tflops = flops / med / 1e9 if flops else None
    hbm, top = ceiling(meta["device"], "hbm_tbs", None), ceiling(meta["device"], peak, None)
    row = dict(meta, bench=bench, case=case, provider=provider, shape=shape, ms=_fmt(med, ".4f"),
               ms_p20=_fmt(p20, ".4f"), ms_p80=_fmt(p80, ".4f"))
    row.update({"GB/s": _fmt(gbs, ".1f"), "pct_hbm": _fmt(gbs and hbm and 100 * gbs / (hbm * 1e3), ".1f"),
                "TFLOP/s": _fmt(tflops, ".2f"), "pct_peak": _fmt(tflops and top and 100 * tflops / top, ".1f"),
                "peak_MB": _fmt(peak_mb, ".1f"), "gpu_ops": gpu_ops or "", "speedup_vs_eager": _fmt(speedup, ".3f"),
                "check": check})
    row.update(keys)
    return row


# ------------------------------------------------------------------------------------------ the runner
@dataclasses.dataclass
class Case:
    """Providers timed side by side on the same inputs: ``providers`` {name: fn()}, the baseline ``eager`` first
    (so that every later row carries its speedup); ``checks`` {provider: its correctness check, computed before
    timing}; ``nbytes`` / ``flops`` the work of one call, the same for every provider (so the columns compare)
    or {provider: number}; ``keys`` the script's own columns; ``also_vs`` other providers to compare to (a
    ``speedup_vs_<name>`` column each); ``scales`` > 0: a ``gpu_ops_per_scale`` column."""
    name: str
    providers: Dict[str, Callable[[], object]]
    checks: Dict[str, str]
    shape: str
    keys: Dict[str, object] = dataclasses.field(default_factory=dict)
    nbytes: Union[None, float, Dict[str, float]] = None
    flops: Union[None, float, Dict[str, float]] = None
    peak: str = "fp32_tflops"
    eager: str = "eager"
    also_vs: Tuple[str, ...] = ()
    scales: int = 0


def peak_mb(fn) -> float:
    """Peak memory of one call of ``fn`` above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_cases(bench: str, cases: Iterable[Tuple[str, Callable[[], Union[Case, Sequence[Case]]]]], args,
              results_dir: str, log=print, default_name: Optional[str] = None) -> Tuple[str, List[Dict]]:
    """On a GPU, times every provider of every case with ``triton.testing.do_bench`` (median, p20, p80 of CUDA
    events; ``args.warmup``, ``args.rep``), then its peak memory and GPU operations per call, and writes a row each
    to ``args.out`` or ``<results_dir>/<default_name or bench>_<gpu>_<date>.csv``, rewritten after every row (a
    run cut off keeps what it measured). ``cases``: (label, build) pairs; ``build()`` makes the inputs, checks
    every provider and returns one :class:`Case` or several; out of memory skips that case, or that provider.
    Returns (path, rows)."""
    if not require_cuda(f"bench_{bench}.py"):
        raise SystemExit(2)
    # fastvar's providers run the Triton kernels unless a backend is forced; the caller's setting is restored
    return with_backend(os.environ.get("FASTVAR_BACKEND") or "triton",
                        lambda: _run_cases(bench, cases, args, results_dir, log, default_name or bench))


def _run_cases(bench, cases, args, results_dir, log, file_prefix):
    import triton.testing
    meta = metadata()
    path, rows = args.out or results_path(results_dir, file_prefix, meta), []
    log(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; HBM "
        f"{ceiling(meta['device'], 'hbm_tbs')} TB/s, bf16 {ceiling(meta['device'], 'bf16_tflops')} TFLOP/s, "
        f"fp32 {ceiling(meta['device'], 'fp32_tflops')} TFLOP/s")
    for label, build in cases:
        try:
            built = build()
        except torch.cuda.OutOfMemoryError:
            log(f"{label}: out of memory while checking; skipped")
            torch.cuda.empty_cache()
            continue
        for case in [built] if isinstance(built, Case) else built:
            ms_of = {}
            for name, fn in case.providers.items():
                try:
                    ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
                    mem, n_ops = peak_mb(fn), device_ops_per_call(fn)
                except torch.cuda.OutOfMemoryError:
                    log(f"{label} {case.name} {name}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                ms_of[name] = ms[0]
                vs = {f"speedup_vs_{p}": _fmt(ms_of[p] / ms[0] if p in ms_of else None, ".3f") for p in case.also_vs}
                if case.scales:
                    vs["gpu_ops_per_scale"] = _fmt(n_ops and n_ops / case.scales, ".1f")
                per = [w.get(name) if isinstance(w, dict) else w for w in (case.nbytes, case.flops)]
                row = result_row(meta, bench, case.name, name, case.shape, ms, *per, case.peak, mem, n_ops,
                                 ms_of[case.eager] / ms[0] if case.eager in ms_of else None,
                                 case.checks.get(name, ""), **case.keys, **vs)
                rows.append(row)
                write_csv(rows, path, log=None)
                log(f"{label:24s} {case.name:8s} {name:20s} {ms[0]:9.4f} ms [{ms[1]:.4f}, {ms[2]:.4f}]"
                    f"  {row['GB/s'] or '-':>7s} GB/s  {row['TFLOP/s'] or '-':>7s} TFLOP/s  peak {row['peak_MB']} MB"
                    f"  x{row['speedup_vs_eager'] or '-'}  ops {n_ops}  {row['check']}")
        del built
        torch.cuda.empty_cache()
    log(f"\nresults: {path}")
    return path, rows


def with_backend(name: str, fn):
    """``fn()`` with ``FASTVAR_BACKEND=name`` (read by each op call; a few microseconds of host time)."""
    old = os.environ.get("FASTVAR_BACKEND")
    os.environ["FASTVAR_BACKEND"] = name
    try:
        return fn()
    finally:
        del os.environ["FASTVAR_BACKEND"]
        if old is not None:
            os.environ["FASTVAR_BACKEND"] = old


def cuda_extension_built(device) -> bool:
    """A ``fastvar-cuda`` provider runs where the CUDA extension is built and the tensors are on a GPU."""
    from fastvar.ops._backend import cuda_extension
    return torch.device(device).type == "cuda" and cuda_extension() is not None


# ------------------------------------------------------------------------------------------ the plot
def plot(path: str, x: str, panels: Sequence[str], y: str = "ms", where: Optional[Callable[[Dict], bool]] = None):
    """One panel per value of the ``panels`` columns, one line per provider: ``y`` against ``x`` (log scales;
    ``x`` categorical when not numeric), saved beside the CSV (``.png``); rows filtered by ``where``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib not installed: no plot")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(y) and (where is None or where(r))]
    if not rows:
        return None
    groups = list(dict.fromkeys(tuple(r[c] for c in panels) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups) + 1, 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        sel = [r for r in rows if tuple(r[c] for c in panels) == group]
        xs = list(dict.fromkeys(r[x] for r in sel))
        numeric = all(v.replace(".", "", 1).isdigit() for v in xs)
        for provider in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((float(r[x]) if numeric else xs.index(r[x]), float(r[y])) for r in sel
                         if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        if numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(xs)), xs, fontsize=8)
        ax.set_yscale("log")
        ax.set(title=" ".join(group), xlabel=x)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(y)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['bench']}, {rows[0]['device']}, {rows[0]['date']}, {rows[0]['commit']}", fontsize=9)
    fig.tight_layout()
    png = path[:-4] + ".png"
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")
    return png


# the columns of a README table per benchmark (the rest: TABLE_DEFAULT); whole-sample rows only (no ``scale``)
TABLE_COLUMNS = {
    "e2e": ("case", "batch", "provider", "ms", "images_per_s", "speedup_vs_eager", "over_floor", "flop_floor_ms",
            "weight_floor_ms", "peak_MB"),
    "infinity_e2e": ("case", "batch", "provider", "ms", "speedup_vs_eager", "over_floor", "flop_floor_ms",
                     "weight_floor_ms", "peak_MB"),
}
TABLE_DEFAULT = ("case", "provider", "shape", "ms", "TFLOP/s", "pct_peak", "GB/s", "pct_hbm", "speedup_vs_eager")


def markdown_table(path: str) -> str:
    """A benchmark CSV as a Markdown table for the README: the columns of :data:`TABLE_COLUMNS` (by the rows'
    ``bench``) that hold a value, whole-sample rows only, under a line naming the device, date, commit and
    versions. A CSV of another layout (a study's: no ``bench`` column) shows all its columns but those."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if not r.get("scale")]
    if not rows:
        raise ValueError(f"{path}: no rows")
    first, about = rows[0], ("device", "date", "commit", "torch", "triton")
    bench = first.get("bench")
    cols = TABLE_COLUMNS.get(bench, TABLE_DEFAULT) if bench else [c for c in first if c not in about]
    cols = [c for c in cols if any(r.get(c) for r in rows)]
    where = ", ".join(f"{'' if k in ('device', 'date') else k.replace('triton', 'Triton') + ' '}{first[k]}"
                      for k in about if first.get(k))
    lines = [f"{bench or os.path.splitext(os.path.basename(path))[0]} on {where} (`{os.path.basename(path)}`):", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return "\n".join(lines)
