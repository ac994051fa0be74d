"""The classic Falcon-7B QLoRA notebook configuration against `train/recipes/falcon-7b-guanaco.yaml`, same run.

Superseded by bench/train_throughput.py (more configurations, steady-state figures); kept because
bench/results/train_falcon_recipes-2026-11-29.json came from it, with the recipe as it was then.

Falcon-7B architecture with RANDOM weights (no trained Falcon is available offline; speed and memory do not
depend on weight values), the real Falcon tokenizer, the Guanaco-style threads of the English OASST1
validation trees. Each configuration runs as its own `oasst train` process for --steps optimizer steps; the
numbers come from its train_summary.json. Run on the GPU machine (see README "Benchmarks"):

    python bench/eval_falcon_speed.py prepare        # writes bench/data/falcon7b-random
    python bench/train_falcon_recipes.py --model bench/data/falcon7b-random --data bench/data/guanaco-all \
        --steps 30 --results bench/results/train_falcon_recipes.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import TRAIN_LAUNCHER  # bench/ is on sys.path when run as a script

# The notebook's settings (r 64, alpha 16, dropout 0.1, Falcon's four linears, batch 4 x accumulation 4,
# max length 512, fp16, paged AdamW 32-bit, group_by_length, gradient checkpointing, NF4 without double quant).
CLASSIC = """
load_in_4bit: true
quant_type: nf4
double_quant: false
compute_dtype: float16
precision: fp16
lora_r: 64
lora_alpha: 16
lora_dropout: 0.1
target_modules: [query_key_value, dense, dense_h_to_4h, dense_4h_to_h]
max_length: 512
loss_on: all
batch_size: 4
grad_accum: 4
learning_rate: 2.0e-4
lr_scheduler: constant
max_grad_norm: 0.3
optim: paged_adamw_32bit
gradient_checkpointing: true
group_by_length: true
seed: 42
"""
BF16_TFLOPS = 790.0  # measured bf16 dense matmul ceiling of the H200 (../shared/docs/gpu.md)
FLOPS_PER_TOKEN = 4 * 6.9e9  # forward + backward through frozen 4-bit base (no weight grads) + LoRA: ~4 x params


def run(name: str, config: Path, args: argparse.Namespace, work: Path) -> dict:
    """One `oasst train` process; returns its summary plus wall time."""
    out = work / name
    cmd = [sys.executable, "-c", TRAIN_LAUNCHER, "train", "--config", str(config), "--model", args.model,
           "--data", args.data, "--out", str(out), "--max-steps", str(args.steps), "--save-steps", "100000",
           "--eval-rows", "32"]
    print("running", name, flush=True)
    started = dt.datetime.now()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = (dt.datetime.now() - started).total_seconds()
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    summary = json.loads((out / "train_summary.json").read_text())
    summary.pop("log_history", None)
    summary["name"], summary["wall_seconds"] = name, wall
    tps = summary["real_tokens_per_second"]
    summary["mfu"] = tps * FLOPS_PER_TOKEN / (BF16_TFLOPS * 1e12)
    return summary


def main() -> None:
    """Run both configurations and print a table last."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--results", default="bench/results/train_falcon_recipes.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainbench-"))
    classic = work / "classic.yaml"
    classic.write_text(CLASSIC)
    rows = [run("classic", classic, args, work), run("falcon-7b-guanaco", Path("train/recipes/falcon-7b-guanaco.yaml"),
                                                    args, work)]
    base = rows[0].get("real_tokens_per_second")
    import torch

    result = {
        "date": dt.date.today().isoformat(),
        "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "note": "Falcon-7B architecture with random weights, real tokenizer; steps include warm-up",
        "steps": args.steps,
        "versions": rows[-1].get("versions"),
        "runs": rows,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(f"{'config':20s} {'4bit':>5s} {'tok/s':>8s} {'x classic':>9s} {'MFU':>6s} {'peak GiB':>9s} {'load s':>7s} "
          f"{'loss first->last':>18s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:20s} ERROR {r['error']}")
            continue
        tps = r["real_tokens_per_second"]
        print(f"{r['name']:20s} {r['linear4bit_layers']:5d} {tps:8.0f} {tps / base if base else 0:9.2f} "
              f"{r['mfu']:6.1%} {r.get('peak_memory_bytes', 0) / 2**30:9.1f} {r.get('load_seconds', 0):7.1f} "
              f"{r['train_loss_first']:8.3f}->{r['train_loss_last']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
