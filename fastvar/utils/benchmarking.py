"""What every benchmark records: the device and its ceilings, the date, the commit, the versions."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional

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


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def metadata(device: Optional[torch.device] = None) -> Dict[str, str]:
    """The columns every result row starts with."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(device), "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "triton": triton_version}


def results_path(folder: str, prefix: str, meta: Dict[str, str]) -> str:
    """``<folder>/<prefix>_<device>_<date>.csv``."""
    tag = "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_")
    return os.path.join(folder, f"{prefix}_{tag}_{meta['date']}.csv")


def write_csv(rows: List[Dict], path: str, log=print) -> None:
    """Write result rows (the union of their keys as columns, in first-seen order) to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
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


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (and a line saying so) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save_plot(fig, csv_path: str) -> str:
    """Saves ``fig`` beside the CSV (``.csv`` -> ``.png``); returns the PNG's path."""
    fig.tight_layout()
    png = csv_path[:-4] + ".png"
    fig.savefig(png, dpi=120)
    return png


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


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|a - ref| / max|ref|`` in float64; the absolute error when ``ref`` is all zeros."""
    a, ref = a.double(), ref.double()
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)
