"""Markdown tables of benchmark CSVs, for the README's benchmark section (``fastvar.utils.benchmarking``:
the columns per benchmark, whole-sample rows only).

    python scripts/results_table.py bench/results/e2e_NVIDIA_H100_80GB_HBM3_2026-12-01.csv [more CSVs]
"""
import argparse
import sys

from fastvar.utils.benchmarking import markdown_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csvs", nargs="+")
    args = p.parse_args(argv)
    print("\n\n".join(markdown_table(path) for path in args.csvs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
