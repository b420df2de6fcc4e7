#!/usr/bin/env bash
# Installs widenet and what it needs into the current Python environment.
# torch: an existing install is kept (users with CUDA builds keep theirs);
# otherwise torch 2.13.0 is pinned here (this project's machines serve its CPU
# build, so that no multi-GB CUDA build is pulled; plain PyPI gives Linux a CUDA
# build). Override with WIDENET_TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${WIDENET_TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
