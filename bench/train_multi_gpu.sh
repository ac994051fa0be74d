#!/usr/bin/env bash
# 1 GPU vs 2 GPUs (accelerate DDP, one 4-bit replica per process) on the falcon-7b-guanaco recipe, Falcon-7B
# architecture with RANDOM weights. Run on an nvidia-h200-x2 machine from the repository root with PYTHONPATH set
# to the checkout (see README "Benchmarks"); prints one JSON line per run and a table last.
set -euo pipefail
STEPS=${STEPS:-20}
MODEL=${MODEL:-bench/data/falcon7b-random}
DATA=${DATA:-bench/data/guanaco-all}
common=(train --config train/recipes/falcon-7b-guanaco.yaml --model "$MODEL" --data "$DATA" --max-steps "$STEPS"
        --save-steps 100000 --eval-rows 32)
rm -rf /tmp/mg1 /tmp/mg2
CUDA_VISIBLE_DEVICES=0 python -m oasst_tools "${common[@]}" --out /tmp/mg1 > /tmp/mg1.log 2>&1 || { tail -20 /tmp/mg1.log; exit 1; }
python -m accelerate.commands.launch --config_file train/recipes/accelerate-2gpu.yaml -m oasst_tools "${common[@]}" \
    --out /tmp/mg2 > /tmp/mg2.log 2>&1 || { tail -30 /tmp/mg2.log; exit 1; }
python - <<'PY'
import json, datetime
one = json.load(open("/tmp/mg1/train_summary.json")); two = json.load(open("/tmp/mg2/train_summary.json"))
for s in (one, two):
    s.pop("log_history", None)
eff = two["real_tokens_per_second"] / (2 * one["real_tokens_per_second"])
out = {"date": datetime.date.today().isoformat(), "note": "Falcon-7B architecture, random weights",
       "one_gpu": one, "two_gpus": two, "scaling_efficiency": eff}
print(json.dumps(out))
print(f"1 GPU {one['real_tokens_per_second']:.0f} tok/s, 2 GPUs {two['real_tokens_per_second']:.0f} tok/s "
      f"(world {two['world_size']}), efficiency {eff:.2f}, peak/GPU {two['peak_memory_bytes']/2**30:.1f} GiB")
PY
