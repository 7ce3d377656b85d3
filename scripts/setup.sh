#!/usr/bin/env bash
# Set up: a virtual environment in .venv with torch (CPU) first, then medscreen and its tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first and pinned: an unpinned torch pulls a CUDA build of several GB.
pip install -q -c constraints.txt "torch==2.13.*"
pip install -q -c constraints.txt -e ".[dev]"
echo "setup: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
