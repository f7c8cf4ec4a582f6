#!/usr/bin/env bash
# The GPU checks, in stages that each fit one 10-minute call on a lent H100/H200 (no network there; the
# image has torch, triton, numpy, pytest, pytest-benchmark, scikit-learn). Logs and CSVs go to $OUT (the
# device tool brings that folder back) or bench/results/gpu_run; copy the CSVs into bench/results/ and commit.
#   FASTVAR_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh tests      # pytest -m gpu
#   ... bash scripts/gpu_check.sh attention | rq_lookup | upsample | sampling | adaln | e2e [extra bench args]
# FASTVAR_COMMIT names the commit in every CSV row: the copied tree may have no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
# stage -> benchmark script (bench/bench_<op>.py per op; e2e: the end-to-end sampler, `fastvar bench`)
declare -A BENCH=(
  [attention]=bench/bench_attention.py [rq_lookup]=bench/bench_rq_lookup.py [upsample]=bench/bench_upsample.py
  [sampling]=bench/bench_sampling.py [adaln]=bench/bench_adaln.py [e2e]=bench/bench_e2e.py
)
stage=${1:-}
if [[ -z "$stage" || ( "$stage" != tests && -z "${BENCH[$stage]:-}" ) ]]; then
  echo "stage: expected tests | attention | rq_lookup | upsample | sampling | adaln | e2e, got '$stage'" >&2; exit 2
fi
shift
out=${OUT:-bench/results/gpu_run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# --no-build-isolation: setuptools comes from the image, nothing is downloaded
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
if [[ "$stage" == tests ]]; then
  "$PY" -P -m pytest -m gpu -q -rs -p no:cacheprovider --rootdir=. tests "$@" 2>&1 | tee "$out/gpu_tests.log"
elif [[ "$stage" == e2e ]]; then     # `fastvar bench` names its CSV itself, in --out-dir
  "$PY" "${BENCH[e2e]}" --out-dir "$out" "$@" 2>&1 | tee "$out/e2e.log"
else
  "$PY" "${BENCH[$stage]}" --out "$out/$stage.csv" "$@" 2>&1 | tee "$out/$stage.log"
fi
