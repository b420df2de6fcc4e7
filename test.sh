#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (slow tests included), one worker per
# core, at most 4 (pytest-xdist; add -n 0 for one process, e.g. with -x or --pdb).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
python3 -m pytest -q -n auto --maxprocesses 4 "$@"
