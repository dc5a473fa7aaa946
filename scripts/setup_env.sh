#!/usr/bin/env bash
# Create (or reuse) ./.venv with poolformer_seg, mmcv-lite and the test
# extras, at the tested versions of constraints.txt. Needs only Python 3.11
# and pip access to the package registry; nothing is compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q -c constraints.txt)
# torch first, so that nothing resolves a newer (CUDA) build.
"${PIP[@]}" torch
"${PIP[@]}" -e ".[lite,tests]"
# timm's model file is a test reference only; its package requires
# torchvision, which has no CPU build here, so it is installed alone.
"${PIP[@]}" --no-deps timm
