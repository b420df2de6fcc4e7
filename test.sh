#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (slow tests included).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
python3 -m pytest -q "$@"
