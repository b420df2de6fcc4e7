#!/usr/bin/env bash
# The main job: installs what it needs, then prints the paper's parameter
# table and benchmarks the MoE layer against a dense FFN.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
echo "== Trainable parameters, ImageNet setup (1001 classes + pre-logits) =="
widenet params vit_b16 vit_l16 vit_moe_b16 vit_moe_l16 widenet_b16 widenet_l16 widenet_h16 \
  --num-classes 1001 --representation
echo
echo "== MoE layer benchmark (forward + backward) =="
widenet bench moe
