#!/usr/bin/env bash
# Fashion-MNIST from Debian's package when this machine can install it
# (root + apt); elsewhere widenet downloads it with SHA-256 checks on first use.
set -uo pipefail
if [ -d /usr/share/datasets/fashion-mnist ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: apt-get could not install dataset-fashion-mnist; widenet will try to download it"
fi
exit 0
