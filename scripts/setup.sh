#!/usr/bin/env bash
# Install fastvar (editable) and what it needs into the current Python.
#   bash scripts/setup.sh          the package
#   bash scripts/setup.sh test     the package and the test tools
# A torch that is already installed (a CUDA build on a GPU machine) is kept. Without one, a machine
# with no NVIDIA GPU gets torch==2.13.0, the version CI tests: the CPU build where pip's index serves it
# (CI's does). PyPI's Linux torch wheels are CUDA builds (several GB): elsewhere, install the CPU build
# first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found and no torch: installing the default (CUDA) torch build"
  pip_install torch
else
  echo "setup: no GPU and no torch: installing torch==2.13.0 (PyPI serves a CUDA build of several GB; to get" \
       "the CPU build, install it first: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
  pip_install "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  pip_install -e ".[$extras]"
else
  pip_install -e .
fi
echo "setup: fastvar $("$PY" -c 'import fastvar; print(fastvar.__version__)') installed"
