#!/usr/bin/env bash
# Kill one rank of a 2-GPU run after its first complete checkpoint, then --resume (issue: multi-GPU fault tolerance).
# NOT YET RUN: written 2026-11-29 when the 2-GPU kind was withdrawn; run it where nvidia-h200-x2 is lent.
# Run on nvidia-h200-x2 from the repository root after `python bench/eval_falcon_speed.py prepare`, PYTHONPATH set.
set -uo pipefail
MODEL=${MODEL:-bench/data/falcon7b-random}
DATA=${DATA:-bench/data/guanaco-all}
OUT=/tmp/killrank
args=(train --config train/recipes/falcon-7b-guanaco.yaml --model "$MODEL" --data "$DATA" --out "$OUT"
      --max-steps 16 --save-steps 4 --eval-rows 16)
launch=(python -m accelerate.commands.launch --config_file train/recipes/accelerate-2gpu.yaml -m oasst_tools)
rm -rf "$OUT"
"${launch[@]}" "${args[@]}" > /tmp/kill1.log 2>&1 &
launcher=$!
for _ in $(seq 600); do
    [ -f "$OUT/checkpoints/checkpoint-4/adapter_model.safetensors" ] && [ -f "$OUT/checkpoints/checkpoint-4/trainer_state.json" ] && break
    sleep 1
done
sleep 3
victim=""
for p in $(pgrep -f "oasst_tools"); do
    if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "LOCAL_RANK=1"; then victim=$p; fi
done
echo "killing rank 1 (pid $victim) after: $(ls $OUT/checkpoints)"
kill -9 $victim
wait $launcher; echo "launcher exit code: $?"
grep -iE "error|failed|signal" /tmp/kill1.log | tail -5
echo "checkpoints left: $(ls $OUT/checkpoints)"
"${launch[@]}" "${args[@]}" --resume > /tmp/kill2.log 2>&1; echo "resume exit code: $?"
tail -3 /tmp/kill2.log
python -c "import json; s=json.load(open('$OUT/train_summary.json')); print('resumed_from', s['resumed_from'], 'global_step', s['global_step'], 'world', s['world_size'])"
