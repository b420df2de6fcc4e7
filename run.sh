#!/usr/bin/env bash
# The main job: installs what it needs (widenet, torch CPU build, Fashion-MNIST,
# the GCIDE dictionary), then
#  1. trains ViT, ViT-MoE, ALBERT-style and WideNet with one recipe on
#     Fashion-MNIST, 1.2 minutes per run and 2 seeds -> runs/compare/report.md;
#  2. pretrains BERT-style, ALBERT-style and WideNet text models (masked LM +
#     sentence order) on GCIDE and fine-tunes them, and the same models from
#     random weights, on a task derived from it -> runs/compare-text/report_text.md.
# About 14 minutes on an idle 2-core CPU. A rerun resumes or reuses finished runs.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
bash scripts/get-data.sh
echo "== Trainable parameters, the paper's ImageNet setup (1001 classes + pre-logits) =="
widenet params vit_b16 vit_l16 vit_moe_b16 vit_moe_l16 widenet_b16 widenet_l16 widenet_h16 \
  --num-classes 1001 --representation
echo "== Trainable parameters, the paper's text models (pretraining heads) =="
widenet params albert_base bert_factorized widenet_text_4e widenet_text_8e widenet_text_16e
echo
echo "== Comparison on Fashion-MNIST (widenet compare --preset quick) =="
widenet compare --preset quick --out runs/compare "$@"
echo
echo "== Text comparison on GCIDE (widenet compare-text --preset quick) =="
if [ -f /usr/share/dictd/gcide.dict.dz ]; then
  widenet compare-text --preset quick --out runs/compare-text
else
  echo "skipped: the GCIDE dictionary is not installed (apt-get install dict-gcide);"
  echo "run widenet compare-text --corpus TEXT... --task-train F --task-validation F instead"
fi
