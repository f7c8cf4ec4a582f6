"""End-to-end sampling benchmark: official eager loop vs torch.compile vs fastvar.Sampler.

    python bench/bench_e2e.py                          # all models, batch 1, 8, 64, bf16 (GPU)
    python bench/bench_e2e.py --models d16 --batches 1 64
    python bench/bench_e2e.py --smoke                  # tiny model on CPU: checks the code path only

The same as ``fastvar bench``; see fastvar/benchmark.py for what is measured. Results:
bench/results/e2e_<gpu>_<date>.csv (``--out-dir`` for another folder).
"""
import os
import sys

from fastvar.cli import main as cli

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    return cli(["bench", "--out-dir", RESULTS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
