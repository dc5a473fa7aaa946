#!/usr/bin/env bash
# Create (or reuse) ./.venv with poolformer_seg and its test extras.
# Needs only Python 3.11 and pip access to the package registry. Nothing is
# compiled: mmcv-lite is pure Python (see poolformer_seg/compat.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned, so that nothing resolves a newer (CUDA) build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[tests]"
