#!/usr/bin/env bash
# Create .venv and install spool with its test tools. Safe to re-run; idempotent.
# On a machine without a GPU this takes the CPU build of torch (pinned, on disk on our dev/CI machines);
# on a GPU machine, set SPOOL_TORCH="torch" (or a CUDA wheel spec) to get a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Install torch first and explicitly: an unpinned resolve would pull a multi-GB CUDA build.
  if [ -n "${SPOOL_TORCH:-}" ]; then
    .venv/bin/python -m pip install -q "$SPOOL_TORCH"
  else
    .venv/bin/python -m pip install -q torch==2.13.0 triton==3.9.0
  fi
fi
# Every other package at the tested version (scripts/constraints.txt); SPOOL_CONSTRAINTS= (empty) resolves afresh.
CONSTRAINTS=${SPOOL_CONSTRAINTS-scripts/constraints.txt}
.venv/bin/python -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e '.[dev]'
echo "spool installed in .venv ($(.venv/bin/python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'))"
