#!/usr/bin/env bash
# Set up fedsim in ./.venv. Usage: bash setup.sh [dev]
#   dev: also install the test tools (pytest, ruff, import-linter, scikit-learn for reference metrics).
# torch is installed first and pinned, so that pip does not pull a multi-GB CUDA build on CPU-only machines.
# On a GPU machine, set FEDSIM_TORCH to the torch requirement you want (e.g. FEDSIM_TORCH="torch==2.13.0" with the
# matching --index-url in PIP_INDEX_URL), or install torch into .venv yourself before running this script.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${FEDSIM_TORCH:-torch==2.13.0}"
fi
extras="hqq,bnb,eval"
if [ "${1:-}" = "dev" ]; then extras="$extras,dev"; fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
