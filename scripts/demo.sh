#!/usr/bin/env bash
# The main job end to end on the bundled fixtures, after set-up (scripts/setup.sh):
#   1. oasst build: real OASST1 trees -> a Guanaco-style dataset (train + test split by tree)
#   2. oasst train: a short 4-bit LoRA run on stories260K (a real tiny Llama) on the CPU
#   3. oasst eval:  HellaSwag (fixture rows) and the held-out conversations, base vs adapter
# Outputs go to runs/demo/ (replaced on every run). About 3-4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=runs/demo
rm -rf "$OUT" && mkdir -p "$OUT"
.venv/bin/oasst build --input fixtures/oasst1/validation-en-sample.messages.jsonl \
    --input fixtures/oasst1/en-20.trees.jsonl.gz --lang en --top-rank --test-size 0.25 --seed 1 --out "$OUT/data"
.venv/bin/oasst train --config train/recipes/tiny-cpu.yaml --data "$OUT/data" --out "$OUT/adapter" --max-steps 12 --eval-steps 4
# No --model: the adapter records its base and how it was loaded (4-bit NF4, float32 compute), and eval loads it so.
.venv/bin/oasst eval --adapter "$OUT/adapter" --compare-base \
    --tasks hellaswag,guanaco_test --data "$OUT/data" --limit 40 --out "$OUT/eval"
echo "demo outputs: $OUT/data $OUT/adapter $OUT/eval"
