"""Benchmark of Infinity's bit draw after the head, ``ops.sample_bits``: the temperature, CFG on the logits,
top-k / top-p over the two values of every bit, the categorical draw and the codes of the next scale's input.

Providers: ``eager`` (the op's eager implementation: the official op order of ``fastvar.reference.infinity``, about
ten kernels) and ``fastvar`` (the Triton kernel: one pass). Sizes: the last three scales of Infinity-2B's 1024-px
schedule (32 x 32, 48 x 48 and 64 x 64 tokens of d = 32 bits), B = 1 and 8 with CFG (2B rows of logits), the
logits in ``bfloat16`` (the head's output under autocast) and ``float32``; cfg 3, tau 0.5, top-p 0.97 (the
official defaults). Checked before timing: ``bits_differing``, the kernel's bits against the eager draw with the
same Exp(1) noise (a bit can only differ where its two ratios to the noise tie within float32 rounding), and
``codes_equal``. ``GB/s`` counts the bytes one call must move (read the logits and the noise, write the bits and
the float32 codes), that size being ``MB_moved``. Key columns ``tokens``, ``d``, ``B``, ``N``, ``dtype``,
``MB_moved``.

    python bench/bench_bit_sampling.py
    python bench/bench_bit_sampling.py --grids 64 --batches 8 --dtypes bfloat16
"""
import argparse
import functools
import os
import sys

import torch

from fastvar.utils.benchmarking import Case, plot, run_cases, timing_options, with_backend

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GRIDS = (32, 48, 64)              # h = w of the scale's token map
BITS = 32                         # d: bits per token (Infinity-2B)
DTYPES = ("bfloat16", "float32")
SETTINGS = dict(cfg=3.0, tau=0.5, top_k=0, top_p=0.97)
DEVICE = "cuda"


def case(hw, B, dtype_name):
    from fastvar import ops
    n, dtype = hw * hw * BITS, getattr(torch, dtype_name)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (2 * torch.randn(2 * B, n, 2, device=DEVICE, generator=g)).to(dtype)
    noise = torch.empty(B * n, 2, device=DEVICE).exponential_(generator=g)

    def draw():
        return ops.sample_bits(logits, B, noise=noise, grid=(hw, hw), validate=False, **SETTINGS)
    providers = {"eager": functools.partial(with_backend, "eager", draw),
                 "fastvar": functools.partial(with_backend, "triton", draw)}
    want_bits, want_codes = providers["eager"]()
    checks = {}
    for name, fn in providers.items():
        bits, codes = fn()
        checks[name] = (f"bits_differing={int((bits != want_bits).sum())} "
                        f"codes_equal={int(torch.equal(codes, want_codes))}")
    nbytes = 2 * B * n * 2 * dtype.itemsize + B * n * 2 * 4 + B * n * (1 + 4)
    return Case("sample_bits", providers, checks, f"N={2 * B} tokens={hw}x{hw} d={BITS} {dtype_name}",
                nbytes=nbytes, keys=dict(tokens=f"{hw}x{hw}", d=BITS, B=B, N=2 * B, dtype=dtype_name,
                                         MB_moved=f"{nbytes / 1e6:.1f}"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", type=int, default=list(GRIDS), help="h = w of the token maps")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    timing_options(parser, "bit_sampling")
    args = parser.parse_args(argv)
    cases = ((f"sample_bits {hw}x{hw} B={B} {dt}", functools.partial(case, hw, B, dt)) for dt in args.dtypes
             for hw in args.grids for B in args.batches)
    with torch.no_grad():
        path, _ = run_cases("bit_sampling", cases, args, RESULTS)
    plot(path, x="MB_moved", panels=("case", "dtype"), y="GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
