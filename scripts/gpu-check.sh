#!/usr/bin/env bash
# The GPU fast path on one CUDA GPU, in about 5 minutes (a budget for one rerun):
#  1. the CUDA tests: kernels against the CPU, grouped matmuls under bf16, a capacity-mode training step
#     under torch.cuda.set_sync_debug_mode("error"), compiled widenet_tiny (widenet logs the grouped-kernel
#     probe's decision, with its reason, on stderr);
#  2. the MoE layer against the dense FFN of equal active FLOPs at 16384 tokens, D 768, H 4096, bf16 and fp32;
#  3. widenet_b16 against vit_b16 (images/s, MFU), interleaved, eager then compiled.
# Usage: bash scripts/gpu-check.sh   (after bash scripts/install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python -m pytest -q tests/test_cuda.py -s -p no:cacheprovider || true
widenet bench moe --device cuda --tokens 16384 --dim 768 --hidden 4096 --repeats 10 --amp bf16
widenet bench moe --device cuda --tokens 16384 --dim 768 --hidden 4096 --repeats 10
widenet bench model vit_b16 widenet_b16 --batch-size 64 --steps 20 --device cuda
widenet bench model vit_b16 widenet_b16 --batch-size 64 --steps 10 --device cuda --compile
