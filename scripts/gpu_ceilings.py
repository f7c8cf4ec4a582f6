"""Measured ceilings of this GPU, the yardsticks for every benchmark: device-to-device copy bandwidth (bytes
read + written per second) and dense matrix-product rates (bf16, fp16, TF32), to a CSV.

    python scripts/gpu_ceilings.py --out ceilings.csv          # a GPU (about 10 s)
    python scripts/gpu_ceilings.py --smoke --out ceilings.csv  # CPU, tiny sizes: checks the code path only

The measurements are ``fastvar.benchmark``'s (``copy_gbs``, ``gemm_tflops``), which the end-to-end benchmarks also
take for their floors: random inputs, warm-up first, the median of timed repeats (CUDA events), a copy buffer far
larger than L2.
"""
import argparse
import sys

import torch

from fastvar.benchmark import copy_gbs, gemm_tflops
from fastvar.utils.benchmarking import metadata, write_csv


def measure(device: torch.device, smoke: bool):
    reps = 3 if smoke else 10
    nbytes = (4 << 20) if smoke else (4 << 30)
    gbs, ms = copy_gbs(device, nbytes, reps)
    rows = [dict(metric="copy_d2d", value=round(gbs, 1), unit="GB/s", shape=f"{nbytes >> 20} MiB read + written",
                 ms=round(ms, 4))]
    n = 256 if smoke else 8192
    dtypes = [("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32)]
    for name, dtype in dtypes if not smoke else dtypes[2:]:
        tflops, ms = gemm_tflops(device, dtype, n, reps)
        rows.append(dict(metric=f"gemm_{name}", value=round(tflops, 1), unit="TFLOP/s", shape=f"{n}x{n}x{n}",
                         ms=round(ms, 4)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="CSV path")
    p.add_argument("--smoke", action="store_true", help="CPU and tiny sizes: the code path only")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_ceilings.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    meta = metadata(device)
    rows = [dict(meta, **r) for r in measure(device, args.smoke)]
    for r in rows:
        print(f"{r['metric']:10s} {r['value']:10.1f} {r['unit']:8s} ({r['shape']}, {r['ms']} ms)")
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
