"""End-to-end sampling benchmark: official eager loop vs torch.compile vs fastvar.Sampler.

    python bench/bench_sampling.py                          # all models, batch 1, 8, 64, bf16 (GPU)
    python bench/bench_sampling.py --models d16 --batches 1 64
    python bench/bench_sampling.py --smoke                  # tiny model on CPU: checks the code path only

The same as ``fastvar bench``; see fastvar/benchmark.py for what is measured. Results:
bench/results/sampling_<gpu>_<date>.csv.
"""
import os
import sys

from fastvar.cli import main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(main(["bench", "--out-dir", os.path.join(here, "results"), *sys.argv[1:]]))
