#!/usr/bin/env bash
# Install fastvar (editable) and what it needs into the current Python.
#   bash scripts/setup.sh          the package
#   bash scripts/setup.sh test     the package and the test tools
# A torch that is already installed (a CUDA build on a GPU machine) is kept. Without one, a machine
# with no NVIDIA GPU gets the CPU build torch==2.13.0: a plain `torch` requirement would pull several
# GB of CUDA wheels there.
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
  echo "setup: no GPU and no torch: installing the CPU build torch==2.13.0"
  pip_install "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  pip_install -e ".[$extras]"
else
  pip_install -e .
fi
echo "setup: fastvar $("$PY" -c 'import fastvar; print(fastvar.__version__)') installed"
