#!/usr/bin/env bash
# The GPU checks, in stages that each fit one 10-minute call on a lent H100/H200 (no network there; the
# image has torch, triton, numpy, pytest, pytest-benchmark, scikit-learn). Logs and CSVs go to $OUT (the
# device tool brings that folder back) or bench/results/gpu_run; copy the CSVs into bench/results/ and commit.
#   FASTVAR_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh tests      # pytest -m gpu
#   ... bash scripts/gpu_check.sh attention | quantizer | sample_kernel | sampling [extra bench args]
# FASTVAR_COMMIT names the commit in every CSV row: the copied tree may have no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
case "$stage" in tests|attention|quantizer|sample_kernel|sampling) ;; *) echo "stage: expected tests | attention | quantizer | sample_kernel | sampling, got '$stage'" >&2; exit 2 ;; esac
shift
out=${OUT:-bench/results/gpu_run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# --no-build-isolation: setuptools comes from the image, nothing is downloaded
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
case "$stage" in
  tests)         "$PY" -P -m pytest -m gpu -q -rs -p no:cacheprovider --rootdir=. tests "$@" 2>&1 | tee "$out/gpu_tests.log" ;;
  attention)     "$PY" bench/bench_attention.py --out "$out/attention.csv" "$@" 2>&1 | tee "$out/attention.log" ;;
  quantizer)     "$PY" bench/bench_quantizer.py --out "$out/quantizer.csv" "$@" 2>&1 | tee "$out/quantizer.log" ;;
  sample_kernel) "$PY" bench/bench_sample_kernel.py --out "$out/sample_kernel.csv" "$@" 2>&1 | tee "$out/sample_kernel.log" ;;
  sampling)      "$PY" bench/bench_sampling.py --out-dir "$out" "$@" 2>&1 | tee "$out/sampling.log" ;;
esac
