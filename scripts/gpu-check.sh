#!/usr/bin/env bash
# The GPU fast path on one CUDA GPU, in under 5 minutes: the CUDA tests, the
# MoE benchmark (per-expert loop vs grouped matmuls) and widenet_b16 at 224 px
# (images/s and MFU, with the grouped experts and with the loop).
# Usage: bash scripts/gpu-check.sh   (after bash scripts/install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q tests/test_cuda.py tests/test_moe.py -s
widenet bench moe --device cuda --tokens 16384 --dim 768 --hidden 4096 --repeats 10
for backend in auto loop; do
  widenet bench model widenet_b16 --batch-size 64 --steps 20 --device cuda --set expert_backend=$backend
done
widenet bench model vit_b16 --batch-size 64 --steps 20 --device cuda
