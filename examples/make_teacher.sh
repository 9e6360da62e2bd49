#!/usr/bin/env bash
# Rebuild examples/teacher/tiny_esm1b_t4_192.pt: the quickstart's stand-in for ESM-1b.
# It is an ESM-1b-architecture model (4 layers x 192 dim x 4 heads, FFN 4 x dim like ESM-1b,
# 2.0M parameters) pretrained with plain masked LM (--lam 0) on examples/train.fasta, then
# written in fair-esm's checkpoint format, so `--teacher` loads it through esm.pretrained exactly
# as it loads the real esm1b_t33_650M_UR50S.pt. It is NOT ESM-1b: use it to try the tool, not for science.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/tiny-teacher
distill fit examples/train.fasta --valid examples/valid.fasta --lam 0 \
  --preset custom --layers 4 --dim 192 --heads 4 --ffn 768 \
  --epochs 12 --batch-size 32 --lr 1e-3 --seed 1 --out runs/tiny-teacher --quiet
distill export esm runs/tiny-teacher/student -o examples/teacher/tiny_esm1b_t4_192.pt
