#!/usr/bin/env bash
# The GPU campaign: everything worth knowing from a lent H100/H200, in one call, under a time budget.
#
#   FASTVAR_COMMIT=<hash> bash scripts/gpu_check.sh all [--budget 540] [--out DIR]
#   bash scripts/gpu_check.sh STAGE [--out DIR] [extra args]   # one stage, e.g. tests, attention, sampling
#   bash scripts/gpu_check.sh e2e,attention,tiles [--budget S]  # several, as `all` runs them (after the install)
#   FASTVAR_GPU_CHECK_WORK=DIR bash scripts/gpu_check.sh rest [--budget S]   # the stages of `all` that an earlier
#                                 call with that work folder did not reach (its results are bundled with them)
#   bash scripts/gpu_check.sh all --dry-run --out DIR           # CPU: each stage's smallest variant
#
# `all` runs the stages of the table below in order of value, each under `timeout` with its own budget
# (never past what is left of the total): a stage cut off keeps what it wrote, and the next one starts.
# Logs, CSVs and JUnit files go to a work folder; after every stage they are bundled into the output folder
# ($OUT, or --out, default bench/results/gpu_run): summary.txt, campaign.tar.gz (everything) and the headline
# CSVs, at most 8 files (what the device tool brings back). The last thing printed is summary.txt (at most
# 80 lines). The install is offline (the machine has no network). FASTVAR_COMMIT names the commit in every
# CSV row: the device tool's copy of the tree has no .git, so write the hash that `git rev-parse --short HEAD`
# prints on your machine into the command. tests/test_gpu_check.py runs the dry run on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------------------------------------------------
# THE STAGE TABLE: the one place that names stages, budgets (seconds) and scripts. Order = order of value.
# precompile (all cores) before the tests, which would compile one kernel at a time; coldstart uses caches of its own
# issue 16's measurements first (tests, end to end, attention, sampling, the quantizer step), then Infinity (issue 15)
STAGES_ALL=(install ceilings cuda precompile tests e2e attention sampling upsample rq_lookup infinity coldstart adaln
            profile e2e_compile tiles bit_sampling cross_attention)
declare -A BUDGET=([install]=60 [ceilings]=40 [cuda]=120 [precompile]=90 [tests]=240 [e2e]=110 [coldstart]=75
                   [attention]=60 [sampling]=40 [rq_lookup]=30 [upsample]=30 [adaln]=25 [infinity]=90
                   [profile]=75 [e2e_compile]=150 [bit_sampling]=25 [cross_attention]=25 [tiles]=150)
declare -A SCRIPT=(
  [ceilings]=scripts/gpu_ceilings.py          # device-to-device copy GB/s, dense bf16 GEMM TFLOP/s
  [cuda]=scripts/build_cuda.sh                # the CUDA extension's build: run only if it exists
  [coldstart]=scripts/gpu_coldstart.py        # first and second sample's wall time, Triton cache hits
  [precompile]=tests/sm90_compile.py          # every recorded launch compiled into the campaign's cache
  [e2e]=bench/bench_e2e.py                    # end-to-end: official eager loop vs fastvar (= `fastvar bench`)
  [attention]=bench/bench_attention.py        # kernel benchmarks, bench/bench_<op>.py (each takes --out CSV)
  [sampling]=bench/bench_sampling.py
  [rq_lookup]=bench/bench_rq_lookup.py
  [upsample]=bench/bench_upsample.py
  [adaln]=bench/bench_adaln.py
  [infinity]=bench/bench_infinity.py          # Infinity-2B at 1024 px, the official loop vs the Sampler (--out-dir)
  [profile]=bench/bench_e2e.py                # one sample per provider under torch.profiler (--profile): the
                                              # per-kernel table behind a missed end-to-end target
  [e2e_compile]=bench/bench_e2e.py            # the official loop under torch.compile, beside eager (--out-dir)
  [bit_sampling]=bench/bench_bit_sampling.py
  [cross_attention]=bench/bench_cross_attention.py
  [tiles]="bench/bench_attention.py --tiles"  # the attention kernels' candidate tiles against the pinned ones
)
declare -A CAMPAIGN_ARGS=(                    # sizes under `all` (a stage run alone takes only your args)
  [cuda]="90a"                                # the lent H100 / H200 are sm_90: not the default sm_80 too
  [e2e]="--models d16 d30 --batches 1 64 --providers eager fastvar --reps 3"
  [profile]="--models d30 --batches 1 64 --providers eager fastvar --reps 1"
  [e2e_compile]="--models d16 d30 --batches 1 64 --providers eager compile --reps 3"   # Inductor's compile: minutes
  [sampling]="--batches 1 64 --no-compile"
  [rq_lookup]="--batches 1 64"
  [upsample]="--batches 1 64"
  [adaln]="--models d16 d30 --batches 1 64"
  [infinity]="--batches 1 --reps 2"          # B = 8 on its own: `gpu_check.sh infinity --batches 8` (see the script)
  [tiles]="--cases kv256 d30 kv1024 1024px --warmup 10 --rep 40"   # bf16: the candidates st_tiles compiles
)
# GPU tests, most important first: one pytest run per group under `timeout`; a last group takes the rest
TEST_GROUPS=(
  "tests/test_attention.py tests/test_attention_hazards.py tests/test_attention_rope.py"
  "tests/test_sampler.py tests/test_sampling.py"
  "tests/test_upsample.py tests/test_rq_lookup.py tests/test_adaln.py"
  "tests/test_cuda_ext.py"
  "tests/test_infinity_sampler.py tests/test_generate.py"
)
PER_TEST_TIMEOUT=${FASTVAR_PER_TEST_TIMEOUT:-90}
HEADLINE_CSVS=(ceilings.csv coldstart.csv e2e.csv attention.csv sampling.csv infinity.csv)
# ------------------------------------------------------------------------------------------------------------

usage() {
  local IFS='|'
  echo "usage: gpu_check.sh all|rest|STAGE[,STAGE...] [--budget S] [--out DIR] [--dry-run] [extra args: one STAGE" \
    "alone]" >&2
  echo "  STAGE: ${STAGES_ALL[*]}${1:+ ($1)}" >&2
  exit 2
}
stage=${1:-}
[ $# -gt 0 ] && shift
TOTAL=540; OUTDIR=${OUT:-bench/results/gpu_run}; DRY=${FASTVAR_GPU_CHECK_DRY:-0}; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) TOTAL=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
is_stage() { local t; for t in "${STAGES_ALL[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
# `all`, `rest` or a comma-separated list: the campaign's sizes, each stage capped by what is left of the total
STAGES=()
if [ "$stage" = all ]; then STAGES=("${STAGES_ALL[@]}")
elif [[ $stage == *,* ]]; then IFS=, read -r -a STAGES <<<"$stage"
elif [ "$stage" = rest ]; then
  RAN=${FASTVAR_GPU_CHECK_WORK:-}/stages.tsv
  [ -f "$RAN" ] || usage "rest: FASTVAR_GPU_CHECK_WORK must name an earlier call's work folder (no $RAN)"
  for s in "${STAGES_ALL[@]}"; do grep -qE "^$s"$'\t'"(ok|timeout|failed)" "$RAN" || STAGES+=("$s"); done
  [ ${#STAGES[@]} -gt 0 ] || echo "rest: every stage of all has run ($RAN)"
fi
for s in "${STAGES[@]}"; do is_stage "$s" || usage "no stage '$s'"; done
[ ${#STAGES[@]} -gt 0 ] && [ ${#EXTRA[@]} -gt 0 ] && usage "extra arguments (${EXTRA[*]}) go to one stage alone"
[ ${#STAGES[@]} -gt 0 ] || [ "$stage" = __stage ] || [ "$stage" = rest ] || is_stage "$stage" || usage

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 FASTVAR_GPU_CHECK_DRY=$DRY
if [ -z "${FASTVAR_COMMIT:-}" ] && [ "$stage" != __stage ]; then
  FASTVAR_COMMIT=$(git rev-parse --short HEAD 2>/dev/null) || FASTVAR_COMMIT=
  [ -n "$FASTVAR_COMMIT" ] || echo "WARNING: FASTVAR_COMMIT is not set and git cannot name this tree's commit:" \
    "every result row will say commit=unknown (run it as FASTVAR_COMMIT=<hash> bash scripts/gpu_check.sh ...)" >&2
  export FASTVAR_COMMIT
fi
PY=${PYTHON:-python3}

# ------------------------------------------------------------------------------------------------ stages
# Each runs inside `timeout` (as `gpu_check.sh __stage NAME`), with $W the work folder and $DRY set.
st_install() {
  # --no-build-isolation: setuptools comes from the image, nothing is downloaded. FASTVAR_BUILD_CUDA=0: with nvcc
  # and a GPU, setup.py would build fastvar._C inside pip, past this stage's budget (killed, nothing installed);
  # the `cuda` stage builds it under its own budget
  local cmd=(env FASTVAR_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .)
  if [ "$DRY" = 1 ]; then
    echo "dry run: not installing (${cmd[*]})"
  else
    "${cmd[@]}" || return 1
  fi
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1
    "$PY" -c "import sys, torch, triton, numpy, setuptools; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '| numpy', numpy.__version__, \
'| setuptools', setuptools.__version__, '| cpus', __import__('os').cpu_count())"
    echo "commit ${FASTVAR_COMMIT:-unknown}"; } >"$W/env.txt" 2>&1
  cat "$W/env.txt"
}
st_ceilings() {
  "$PY" "${SCRIPT[ceilings]}" --out "$W/ceilings.csv" $([ "$DRY" = 1 ] && echo --smoke) "$@"
}
st_cuda() {
  if [ ! -f "${SCRIPT[cuda]}" ]; then echo "skipped: ${SCRIPT[cuda]} does not exist"; return 0; fi
  local args=()
  [ "${ALL:-0}" = 1 ] && read -r -a args <<<"${CAMPAIGN_ARGS[cuda]}"
  if [ "$DRY" = 1 ]; then echo "dry run: not building (bash ${SCRIPT[cuda]} ${args[*]} $*)"; return 0; fi
  bash "${SCRIPT[cuda]}" "${args[@]}" "$@"
}
st_coldstart() {
  "$PY" "${SCRIPT[coldstart]}" --work "$W" --out "$W/coldstart.csv" $([ "$DRY" = 1 ] && echo --smoke) "$@"
}
st_precompile() {
  if [ "$DRY" = 1 ]; then
    "$PY" -P "${SCRIPT[precompile]}" --record-only --paths "^sample d16 B=1 plain$" "$@"
  else
    "$PY" -P "${SCRIPT[precompile]}" --jobs "$(nproc)" --launchers --json "$W/precompile.json" "$@"
  fi
}
st_tests() {
  # A per-test alarm (scripts/pytest_deadline.py, no extra package) fails a test that overruns and goes on; a
  # group stuck in C code (a hung kernel) is killed by its `timeout` and the next group runs.
  local listed=" " g f n=0 rest=""
  for g in "${TEST_GROUPS[@]}"; do listed="$listed$g "; done
  for f in tests/test_*.py; do case "$listed" in *" $f "*) ;; *) rest="$rest $f" ;; esac; done
  local deadline=$(( $(date +%s) + ${STAGE_BUDGET:-${BUDGET[tests]}} - 5 ))
  for g in "${TEST_GROUPS[@]}" "$rest"; do
    n=$((n + 1))
    local files=()
    for f in $g; do [ -f "$f" ] && files+=("$f"); done
    [ ${#files[@]} -eq 0 ] && continue
    [ "$DRY" = 1 ] && files=("${files[0]}")       # dry run: the group logic, one file each (no GPU: all skip)
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 10 ]; then echo "group $n: no time left (${files[*]})" | tee "$W/tests_$n.log"; continue; fi
    echo "--- group $n (${left} s left): ${files[*]}"
    timeout --signal=TERM --kill-after=10 "$left" env PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" \
      "$PY" -P -m pytest -m gpu -q -rfEs -p no:cacheprovider -p pytest_deadline --deadline "$PER_TEST_TIMEOUT" \
      -o faulthandler_timeout=$((PER_TEST_TIMEOUT + 20)) --junitxml="$W/tests_$n.xml" --rootdir=. \
      "${files[@]}" "$@" >"$W/tests_$n.log" 2>&1
    local rc=$?
    tail -n 4 "$W/tests_$n.log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "group $n: killed by its timeout" | tee -a "$W/tests_$n.log"; fi
  done
  return 0
}
merge_csvs() {   # merge_csvs NAME: every CSV the stage wrote into $W/NAME/ as one $W/NAME.csv
  "$PY" - "$W" "$1" <<'EOF'
import csv, glob, os, sys
w, name = sys.argv[1:]
rows = [r for p in sorted(glob.glob(os.path.join(w, name, "*.csv"))) for r in csv.DictReader(open(p))]
if rows:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(w, name + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
EOF
}
st_e2e() {      # st_e2e e2e|e2e_compile|profile [args]: the script names its CSVs by device and date, in --out-dir
  local name=$1; shift
  mkdir -p "$W/$name"
  local args=()
  if [ "$DRY" = 1 ]; then args=(--smoke --batches 2 --providers eager fastvar --reps 1 --dtype float32); elif [ "${ALL:-0}" = 1 ]; then read -r -a args <<<"${CAMPAIGN_ARGS[$name]}"; fi
  [ "$name" = profile ] && args+=(--profile)     # its tables: $W/profile/profile_<model>_B<batch>_<provider>.txt
  "$PY" "${SCRIPT[$name]}" "${args[@]}" --out-dir "$W/$name" "$@"
  local rc=$?
  merge_csvs "$name"
  return $rc
}
st_infinity() {
  mkdir -p "$W/infinity"
  local args=()
  if [ "$DRY" = 1 ]; then args=(--smoke --batches 1 --reps 1); elif [ "${ALL:-0}" = 1 ]; then read -r -a args <<<"${CAMPAIGN_ARGS[infinity]}"; fi
  "$PY" "${SCRIPT[infinity]}" "${args[@]}" --out-dir "$W/infinity" "$@"
  local rc=$?
  merge_csvs infinity
  return $rc
}
st_bench() {    # a kernel benchmark of the table: st_bench STAGE [args]
  local name=$1; shift
  local cmd args=()
  read -r -a cmd <<<"${SCRIPT[$name]}"       # the script and its fixed arguments
  local script=${cmd[0]}
  if [ ! -f "$script" ]; then echo "skipped: $script does not exist (update the stage table)"; return 0; fi
  [ "${ALL:-0}" = 1 ] && read -r -a args <<<"${CAMPAIGN_ARGS[$name]:-}"
  "$PY" "${cmd[@]}" --out "$W/$name.csv" "${args[@]}" "$@"
  local rc=$?
  if [ "$DRY" = 1 ] && [ $rc -eq 2 ] && grep -q "needs a CUDA GPU" "$W/$name.log" 2>/dev/null; then
    echo "dry run: $script parsed its arguments and asked for a GPU (exit 2)"; return 0
  fi
  return $rc
}

st_tiles() {    # the candidates compiled on every core first (the benchmark alone compiles them one by one)
  local pre=("$PY" -P "${SCRIPT[precompile]}" --all --paths "^candidate .*bfloat16")
  if [ "$DRY" = 1 ]; then "${pre[@]}" --record-only; else "${pre[@]}" --jobs "$(nproc)" --launchers; fi
  st_bench tiles "$@"
}

if [ "$stage" = __stage ]; then          # internal: one stage, run by run_stage under `timeout`
  name=${EXTRA[0]}
  case "$name" in
    attention|sampling|rq_lookup|upsample|adaln|bit_sampling|cross_attention) st_bench "$name" "${EXTRA[@]:1}" ;;
    e2e|e2e_compile|profile) st_e2e "$name" "${EXTRA[@]:1}" ;;
    *) "st_$name" "${EXTRA[@]:1}" ;;
  esac
  exit $?
fi

# ------------------------------------------------------------------------------------------------ driver
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
W=${FASTVAR_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$W"
export W
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$W/triton_cache}   # one cache for the campaign (coldstart: its own)
SHIPPED=.triton_cache_sm90      # scripts/build_triton_cache.sh, carried with the call: seeds the campaign's cache
if [ -d "$SHIPPED" ] && [ "$DRY" != 1 ]; then
  mkdir -p "$TRITON_CACHE_DIR" && cp -r "$SHIPPED"/. "$TRITON_CACHE_DIR"/ \
    && "$PY" scripts/relocate_triton_cache.py "$TRITON_CACHE_DIR" >"$W/seed_cache.log" 2>&1
fi
START=$(date +%s)
# rest adds to the earlier call's record (stages and budgets); every call writes its own verdict
[ "$stage" = rest ] || { : >"$W/stages.tsv"; : >"$W/budgets"; }
echo "$TOTAL" >>"$W/budgets"
rm -f "$W/verdict.txt"
elapsed() { echo $(( $(date +%s) - START )); }

bundle() {      # the work folder into $OUTDIR: summary.txt, campaign.tar.gz, the headline CSVs (<= 8 files)
  local total
  total=$(awk '{s += $1} END {print s}' "$W/budgets")
  "$PY" scripts/gpu_summary.py "$W" --out "$OUTDIR/summary.txt" --total "$total" --stages "${STAGES_ALL[*]}" \
    >/dev/null 2>"$W/summary.err" \
    || { echo "gpu_summary.py failed:"; tail -n 5 "$W/summary.err"; } >"$OUTDIR/summary.txt"
  tar -czf "$OUTDIR/campaign.tar.gz.part" -C "$W" --exclude=./triton_cache --exclude='./coldstart_cache*' . \
    2>/dev/null && mv "$OUTDIR/campaign.tar.gz.part" "$OUTDIR/campaign.tar.gz" \
    || rm -f "$OUTDIR/campaign.tar.gz.part"      # never a 9th file for the device tool
  local f
  for f in "${HEADLINE_CSVS[@]}"; do [ -f "$W/$f" ] && cp "$W/$f" "$OUTDIR/$f"; done
  return 0
}

run_stage() {   # run_stage NAME [args]: the stage under `timeout`, output in $W/NAME.log, status in stages.tsv
  local name=$1; shift
  local budget=${BUDGET[$name]}
  [ "$TOTAL" -gt 540 ] && budget=$(( budget * TOTAL / 540 ))     # a larger total (CI runner): longer stages too
  if [ "$ALL" = 1 ]; then
    local left=$(( TOTAL - $(elapsed) - 15 ))     # 15 s kept for the last bundle and the summary
    if [ "$left" -lt 10 ]; then
      printf '%s\tskipped\t0\t0\tno time left of the %s s budget\n' "$name" "$TOTAL" >>"$W/stages.tsv"; return
    fi
    [ "$budget" -gt "$left" ] && budget=$left
  else
    budget=$(( budget > TOTAL ? budget : TOTAL ))     # one stage alone: its budget or --budget, the larger
  fi
  echo "=== $name: budget ${budget} s (at $(elapsed) s of $TOTAL)"
  [ -f "$W/$name.log" ] && mv "$W/$name.log" "$W/$name.earlier.log"     # rest: a stage the device tool cut off
  local t0 rc dt status=ok
  t0=$(date +%s)
  STAGE_BUDGET=$budget timeout --signal=TERM --kill-after=10 "$budget" bash "$0" __stage "$name" "$@" \
    >"$W/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status="failed(rc=$rc)"; fi
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$dt" "$budget" >>"$W/stages.tsv"
  echo "    $status in ${dt} s; last lines:"
  tail -n 3 "$W/$name.log" | cut -c1-160 | sed 's/^/    | /'
  bundle
}

export STAGE_BUDGET ALL=0
if [ ${#STAGES[@]} -gt 0 ] || [ "$stage" = rest ]; then
  ALL=1
  # a list may run on a fresh machine: it installs first; rest runs on the warm machine of the call before (its
  # record is in /tmp there), whose install it repeats only if that did not pass
  if [ "$stage" != rest ] && [ "$DRY" != 1 ]; then
    case " ${STAGES[*]} " in *" install "*) ;; *) STAGES=(install "${STAGES[@]}") ;; esac
  fi
  for s in "${STAGES[@]}"; do run_stage "$s"; done
  [ ${#STAGES[@]} -gt 0 ] || bundle        # nothing left to run: the summary of the record as it stands
else
  [ "$stage" != install ] && [ "$DRY" != 1 ] && run_stage install    # a lone stage on a fresh machine
  run_stage "$stage" "${EXTRA[@]}"
fi
echo
echo "=== output: $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' ')); work folder: $W"
cat "$OUTDIR/summary.txt"
# exit 1 if a stage failed or a GPU test failed (verdict.txt, written by gpu_summary.py): CI reads this
grep -q "stages_failed=0 tests_failed=0" "$W/verdict.txt" 2>/dev/null || exit 1
exit 0
