"""Device-aware defaults on a CPU: 5 steps of stories260K with no recipe against the tiny-cpu recipe's 5 steps.

Issue 12's acceptance: a no-recipe CPU run takes at most 6x the tiny-cpu recipe's time for the same number of steps
(the defaults feed up to 4x the tokens per step: 16 rows of 512 tokens against 8 of 256). Both run `oasst train` in
a fresh process each, alternating, on the Guanaco fixture's train split alone (no test split: no evaluation to time);
the figure is the sum of the optimizer steps' times from train_summary.json (model loading excluded), median over
--repeats. --old-defaults also times the no-recipe run as it was before (bf16 autocast, bf16 compute, gradient
checkpointing), once: that is what the issue measured at over 20 minutes for 40 steps.

    PYTHONPATH=.:model:train:eval .venv/bin/python bench/train_device_defaults.py [--repeats 3] [--old-defaults] \
        [--threads 1]

Prints both times and the ratio; writes bench/results/train_device_defaults-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import TRAIN_LAUNCHER, machine, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
RECIPE = REPO / "train" / "recipes" / "tiny-cpu.yaml"
STEPS = 5
GOAL = 6.0
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")
RUNS = {
    "no_recipe": [],
    "tiny_cpu_recipe": ["--config", str(RECIPE)],
    # The defaults before they followed the device (precision bf16, compute_dtype bfloat16, checkpointing on).
    "old_defaults": ["--precision", "bf16", "--compute-dtype", "bfloat16", "--gradient-checkpointing"],
}


def run(name: str, model: Path, data: Path, work: Path, index: int, threads: int | None) -> dict[str, Any]:
    """One `oasst train` of STEPS steps in a fresh process; its step times, wall time and resolved settings."""
    out = work / f"{name}-{index}"
    path = os.pathsep.join([*(str(REPO / p) for p in (".", "model", "train", "eval")), os.environ.get("PYTHONPATH", "")])
    # CUDA hidden: a CPU measurement, also on a machine with a GPU.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", TRAIN_LAUNCHER, "train", *RUNS[name], "--model", str(model), "--data", str(data),
           "--out", str(out), "--max-steps", str(STEPS), "--save-steps", "1000", "-q"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    config = (out / "train_config.yaml").read_text(encoding="utf-8")
    shutil.rmtree(out)
    settings = {k: v for line in config.splitlines() if ": " in line
                for k, v in [line.split(": ", 1)] if k in ("batch_size", "grad_accum", "max_length", "precision",
                                                          "compute_dtype", "gradient_checkpointing", "load_in_4bit")}
    return {"steps_seconds": round(sum(summary["step_seconds"]), 3), "wall_seconds": round(wall, 2),
            "tokens_seen": summary["tokens_seen"], "settings": settings,
            "device_defaults": summary.get("device_defaults")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (alternating)")
    parser.add_argument("--old-defaults", action="store_true", help="also time the former defaults once")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--model", type=Path, default=STORIES, help="the stories260K folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the runs (default: torch's own choice)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-device-defaults-"))
    data = work / "data"
    data.mkdir()
    shutil.copy2(REPO / "fixtures" / "guanaco-en" / "train.jsonl", data / "train.jsonl")

    runs: dict[str, list[dict[str, Any]]] = {"no_recipe": [], "tiny_cpu_recipe": []}
    for i in range(args.repeats):
        for name in runs:
            runs[name].append(run(name, args.model, data, work, i, args.threads))
            print(f"{name} #{i + 1}: {runs[name][-1]['steps_seconds']:.2f} s for {STEPS} steps "
                  f"({runs[name][-1]['wall_seconds']:.1f} s wall)", flush=True)
    if args.old_defaults:
        runs["old_defaults"] = [run("old_defaults", args.model, data, work, 0, args.threads)]
        print(f"old_defaults: {runs['old_defaults'][0]['steps_seconds']:.2f} s for {STEPS} steps", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(r["steps_seconds"] for r in results) for name, results in runs.items()}
    ratio = median["no_recipe"] / median["tiny_cpu_recipe"]
    result = {
        "benchmark": f"{STEPS} optimizer steps of stories260K on the CPU (sum of step times, loading excluded, median "
                     f"of {args.repeats}): no recipe (device-aware defaults) vs train/recipes/tiny-cpu.yaml",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "threads": args.threads or os.environ.get("OMP_NUM_THREADS", "torch default"),
        "versions": versions(LIBRARIES),
        "median_steps_seconds": {k: round(v, 3) for k, v in median.items()},
        "ratio_no_recipe_to_recipe": round(ratio, 2), "goal": f"at most {GOAL}x", "passes": ratio <= GOAL,
        "runs": runs,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"train_device_defaults-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nno recipe: {median['no_recipe']:.2f} s; tiny-cpu recipe: {median['tiny_cpu_recipe']:.2f} s; "
          f"ratio {ratio:.2f}x (goal <= {GOAL}x: {'pass' if ratio <= GOAL else 'FAIL'})")
    if "old_defaults" in median:
        print(f"former defaults: {median['old_defaults']:.2f} s ({median['old_defaults'] / median['no_recipe']:.1f}x "
              "the new ones)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
