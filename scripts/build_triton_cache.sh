#!/usr/bin/env bash
# A Triton cache for the lent GPU's image (Python 3.12, Triton 3.6.0, sm_90), built on a CPU machine: every
# kernel that the real code paths launch (tests/sm90_compile.py records and compiles them) and their
# host-side launchers, so that the GPU's first sample loads instead of compiling. Not committed (git-ignored):
# carry it with the campaign (device tool: carry=[".triton_cache_sm90"]); scripts/gpu_check.sh seeds the
# run's cache with it and scripts/gpu_coldstart.py reports its hits and misses on the GPU.
#
#   bash scripts/build_triton_cache.sh [OUT_DIR]       # default .triton_cache_sm90 (about 3 min on 2 cores, 16 MB)
#
# Needs this checkout's Python (torch, fastvar) and a Python 3.12 ($PY312; default python3.12 or pyenv's),
# and network for the two Triton wheels (cached under ~/.cache/fastvar). Cache entries are named by
# triton_key(), which hashes libtriton's shared object: the cp312 wheel's key is computed with Python 3.12
# and used by the compile here ($FASTVAR_TRITON_KEY); launchers are built by Python 3.12 itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.triton_cache_sm90}
TV=3.6.0
PY=${PYTHON:-python3}
if [ -z "${PY312:-}" ]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do      # the first that really runs 3.12
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then PY312=$c; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "no Python 3.12 found (set PY312)" >&2; exit 2; }
DEPS=${FASTVAR_CACHE_DEPS:-$HOME/.cache/fastvar}
T_HERE=$DEPS/triton-$TV
T_312=$DEPS/triton-$TV-py312
[ -d "$T_HERE/triton-$TV.dist-info" ] || "$PY" -m pip install -q --no-deps --target "$T_HERE" "triton==$TV"
[ -d "$T_312/triton-$TV.dist-info" ] || "$PY312" -m pip install -q --no-deps --target "$T_312" "triton==$TV"
KEY=$(PYTHONPATH=$T_312 "$PY312" -c "from triton.runtime.cache import triton_key; print(triton_key())")
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
env PYTHONPATH="$T_HERE" FASTVAR_TRITON_KEY="$KEY" TRITON_CACHE_DIR="$OUT" \
  "$PY" -P tests/sm90_compile.py --jobs "$(nproc)" --json "$OUT/launches.json" >"$OUT/build.log" 2>&1 \
  || { tail -n 30 "$OUT/build.log"; exit 1; }
grep "^#" "$OUT/build.log"
# launchers link against libcuda.so.1, which resolves on the GPU: an empty stub of that name links here
STUB=$(mktemp -d)
: >"$STUB/empty.c"
gcc -shared -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/empty.c"
env PYTHONPATH="$T_312" TRITON_CACHE_DIR="$OUT" TRITON_LIBCUDA_PATH="$STUB" "$PY312" scripts/build_launchers.py \
  "$OUT/launches.json"
rm -rf "$STUB"
"$PY" scripts/relocate_triton_cache.py "$OUT" --prune     # cubins and metadata only (the carry limit: 64 MiB)
echo "$OUT: $(du -sh "$OUT" | cut -f1), $(ls "$OUT" | wc -l) entries"
