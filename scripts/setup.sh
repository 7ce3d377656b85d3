#!/usr/bin/env bash
# Set up: a virtual environment in .venv with torch (CPU) first, then medscreen and its tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # The environment takes about 2.0 GiB (torch, onnxruntime, MLflow, BentoML); pip unpacks
  # beside it. Say so at once rather than fail half-installed with "No space left on device".
  free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
  if [ "$free_kib" -lt $((3 * 1024 * 1024)) ]; then
    echo "setup: $((free_kib / 1024)) MiB free in $(pwd); installing needs about 3 GiB" >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
# A fresh CI machine never reuses pip's cache: a second copy of every wheel only costs disk.
if [ "${CI:-}" = true ]; then
  export PIP_NO_CACHE_DIR=1
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first and pinned: an unpinned torch pulls a CUDA build of several GB.
pip install -q -c constraints.txt "torch==2.13.*"
pip install -q -c constraints.txt -e ".[dev]"
echo "setup: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
