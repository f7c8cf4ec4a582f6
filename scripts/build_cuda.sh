#!/usr/bin/env bash
# Build the CUDA extension fastvar._C (csrc/, CMakeLists.txt) in place, offline: fastvar/_C*.so next to the
# Python sources, which an editable install (or PYTHONPATH=.) then imports. Needs nvcc, CMake >= 3.24,
# pybind11 (the Python package, or CMake's pybind11Config) and, for speed, ninja; no network, no pip, no torch
# headers. ptxas's register / spill / shared-memory report per kernel goes to build/cuda/ptxas.log.
#   bash scripts/build_cuda.sh            # sm_80 and sm_90a
#   bash scripts/build_cuda.sh "90a"      # one architecture (CMAKE_CUDA_ARCHITECTURES syntax): faster
# Environment: PYTHON (default python3), CUDACXX (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${1:-${FASTVAR_CUDA_ARCHS:-80;90a}}
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
args=(-S . -B build/cuda --fresh -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")"
      -DFASTVAR_CUDA_ARCHS="$ARCHS" -DFASTVAR_PTXAS_VERBOSE=ON)
if pb=$("$PY" -m pybind11 --cmakedir 2>/dev/null); then args+=(-Dpybind11_DIR="$pb"); fi
if command -v ninja >/dev/null 2>&1; then args+=(-G Ninja); fi
cmake "${args[@]}"
if ! cmake --build build/cuda -j "$(nproc 2>/dev/null || echo 4)" > build/cuda/ptxas.log 2>&1; then
  grep -v "ptxas info" build/cuda/ptxas.log | tail -60
  echo "build_cuda: the build failed (full log: build/cuda/ptxas.log)" >&2
  exit 1
fi
grep -B2 -E "[1-9][0-9]* bytes spill stores" build/cuda/ptxas.log | grep -oE "(Compiling entry function '[^']+' for '[^']+'|[0-9]+ bytes spill stores)" \
  | paste - - | sed 's/^/build_cuda: spill: /' || true
"$PY" - <<'PY'
import fastvar._C as C
from fastvar.ops._backend import cuda_extension, unavailable_reason
assert not C.HOST_EMULATION
assert cuda_extension() is C, unavailable_reason("cuda", "cuda")     # its fingerprint is the sources'
print(f"build_cuda: fastvar._C built at {C.__file__}")
PY
