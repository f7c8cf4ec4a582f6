"""Measured ceilings of this GPU, the yardsticks for every benchmark: device-to-device copy bandwidth (bytes
read + written per second) and dense matrix-product rates (bf16, fp16, TF32), to a CSV.

    python scripts/gpu_ceilings.py --out ceilings.csv          # a GPU (about 10 s)
    python scripts/gpu_ceilings.py --smoke --out ceilings.csv  # CPU, tiny sizes: checks the code path only

Random inputs (a product of zeros ran 13% faster on an H200), warm-up first, the median of timed repeats
(CUDA events), buffers far larger than L2 for the copy.
"""
import argparse
import sys
import time

import torch

from fastvar.utils.benchmarking import metadata, write_csv


def _median_ms(fn, device, reps):
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


def measure(device: torch.device, smoke: bool):
    rows = []
    n_copy = (1 << 20) if smoke else (1 << 30)             # float32 elements: 4 MiB (smoke) or 4 GiB
    src = torch.rand(n_copy, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, 3 if smoke else 10)
    rows.append(dict(metric="copy_d2d", value=round(2 * src.numel() * 4 / (ms * 1e-3) / 1e9, 1), unit="GB/s",
                     shape=f"{src.numel() * 4 >> 20} MiB read + written", ms=round(ms, 4)))
    src = dst = None                            # free 8 GiB before the products
    n = 256 if smoke else 8192
    dtypes = [("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32)]
    for name, dtype in dtypes if not smoke else dtypes[2:]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            ms = _median_ms(lambda: a @ b, device, 3 if smoke else 10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rows.append(dict(metric=f"gemm_{name}", value=round(2 * n ** 3 / (ms * 1e-3) / 1e12, 1), unit="TFLOP/s",
                         shape=f"{n}x{n}x{n}", ms=round(ms, 4)))
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
