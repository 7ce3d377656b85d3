#!/usr/bin/env bash
# Tests: set up, lint, then run the whole test suite on the real data in ../shared/datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
