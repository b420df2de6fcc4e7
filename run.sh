#!/usr/bin/env bash
# The main job: installs what it needs (widenet, torch CPU build, Fashion-MNIST),
# then trains ViT, ViT-MoE, ALBERT-style and WideNet (plus WideNet with shared
# LayerNorms) with one recipe on Fashion-MNIST and writes runs/compare/report.md.
# About 13 minutes on a 2-core CPU. A rerun resumes or reuses finished runs.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
bash scripts/get-data.sh
echo "== Trainable parameters, the paper's ImageNet setup (1001 classes + pre-logits) =="
widenet params vit_b16 vit_l16 vit_moe_b16 vit_moe_l16 widenet_b16 widenet_l16 widenet_h16 \
  --num-classes 1001 --representation
echo
echo "== Comparison on Fashion-MNIST (widenet compare --preset quick) =="
widenet compare --preset quick --out runs/compare "$@"
