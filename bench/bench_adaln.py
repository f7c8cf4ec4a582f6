"""Benchmark of the adaptive LayerNorm steps of VAR's blocks: ``adaln_modulate`` (``LN(x) * (1 + scale) +
shift``) and ``gated_residual_adaln`` (``x + y * gamma``, then the next block's modulated LayerNorm).

Providers: ``eager`` (``fastvar.reference.adaln``: the official op order) and ``fastvar`` (the Triton kernel:
one pass). Sizes: the widths of VAR-d16, d30, d36 (C = 1024, 1920, 2304), the tokens of a 256-px and a 512-px
schedule (L = 680, 2240: every scale of a sample), B = 1 and 64 with CFG (N = 2B rows), in ``bfloat16`` (the
sampler's layout: a float32 residual stream ``x``; ``y``, the modulation and ``h`` in bf16) and ``float32``.
Checked before timing against float64 on the first sample (relative errors of ``h`` and ``x_new``). ``GB/s``
counts the bytes one pass must move (read ``x`` (+ ``y``) and the modulation, write ``h`` (+ ``x_new``)), that
size being ``MB_moved``. Key columns ``model``, ``C``, ``schedule``, ``l``, ``B``, ``N``, ``dtype``, ``MB_moved``.

    python bench/bench_adaln.py
    python bench/bench_adaln.py --ops gated_residual_adaln --models d30 --batches 64 --dtypes bfloat16
"""
import argparse
import functools
import os
import sys

import torch

from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512
from fastvar.utils.benchmarking import Case, plot, rel_err, run_cases, timing_options

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WIDTHS = {"d16": 1024, "d30": 1920, "d36": 2304}
SCHEDULES = {"256": PATCH_NUMS_256, "512": PATCH_NUMS_512}
OPS = ("adaln_modulate", "gated_residual_adaln")
DTYPES = ("bfloat16", "float32")
EPS = 1e-6
DEVICE = "cuda"


def case(op, model, sched, B, dtype_name):
    from fastvar import ops
    from fastvar.reference import adaln as ref
    C, l, N = WIDTHS[model], sum(p * p for p in SCHEDULES[sched]), 2 * B
    dtype, modulate = getattr(torch, dtype_name), op == "adaln_modulate"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(N, l, C, device=DEVICE, generator=g)                     # the residual stream: float32
    y = torch.randn(N, l, C, device=DEVICE, generator=g).to(dtype)
    gamma, scale, shift = ((0.5 * torch.randn(N, 1, C, device=DEVICE, generator=g)).to(dtype) for _ in range(3))
    inputs = (x, scale, shift) if modulate else (x, y, gamma, scale, shift)
    providers = {"eager": functools.partial(getattr(ref, op), *inputs, EPS),
                 "fastvar": functools.partial(getattr(ops, op), *inputs, EPS)}

    def h_first(out):            # (h,) or (h, x_new)
        return (out,) if modulate else out[::-1]
    want = h_first(getattr(ref, op)(*(t[:1].double() for t in inputs), EPS))
    checks = {name: " ".join(f"{what}_rel_err={rel_err(got[:1], ref64):.2e}"
                             for what, got, ref64 in zip(("h", "x_new"), h_first(fn()), want))
              for name, fn in providers.items()}
    size = dtype.itemsize
    nbytes = N * l * C * (4 + size) + 2 * N * C * size if modulate else \
        N * l * C * (2 * 4 + 2 * size) + 3 * N * C * size
    return Case(op, providers, checks, f"N={N} l={l} C={C} {dtype_name}", nbytes=nbytes,
                keys=dict(model=model, C=C, schedule=sched, l=l, B=B, N=N, dtype=dtype_name,
                          MB_moved=f"{nbytes / 1e6:.1f}"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--models", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    timing_options(parser, "adaln")
    args = parser.parse_args(argv)
    cases = ((f"{op} {m} {s}px B={B} {dt}", functools.partial(case, op, m, s, B, dt)) for op in args.ops
             for dt in args.dtypes for m in args.models for s in args.schedules for B in args.batches)
    with torch.no_grad():
        path, _ = run_cases("adaln", cases, args, RESULTS)
    plot(path, x="MB_moved", panels=("case", "dtype"), y="GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
