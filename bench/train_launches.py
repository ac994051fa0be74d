"""Operations dispatched per optimizer step of `oasst train`, eager against `compile_layers`: the host's share.

A host-bound run (the Colab-class recipe: GPU 58-68% busy) is limited by how many operations the host dispatches
per step, each a Python call, a dispatcher pass and, on a GPU, a kernel launch. This counts them with
torch.profiler over steady steps: every leaf ATen operation (no ATen operation below it), and the subset that
computes (views, allocations and other metadata-only operations left out), on the GPU also the CUDA kernels. On a
CPU it runs a scaled-down Falcon-7B (the recipe's architecture and tokenizer, width 64; `bench/eval_falcon_speed.py
prepare --tiny` writes it): the per-layer operation count does not depend on width, so the eager/compiled ratio is
the one a full model has; the step times are not.

    PYTHONPATH=.:model:train:eval .venv/bin/python bench/train_launches.py               # Colab-class recipe
    PYTHONPATH=.:model:train:eval .venv/bin/python bench/train_launches.py --recipe train/recipes/falcon-7b-guanaco-fast.yaml

Each configuration is its own process. Writes bench/results/train_launches-<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _common import add_trainer_callback, machine, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "bench" / "data" / "falcon7b-random"
DATA = REPO / "bench" / "data" / "guanaco-top-rank"
RESULTS = REPO / "bench" / "results" / f"train_launches-{datetime.now(timezone.utc).date()}.json"
PROFILED_FROM, PROFILED = 6, 2  # optimizer steps 6 and 7: after compilation and allocator warm-up
# Leaf operations that only make views, allocate or change metadata: no kernel on a GPU.
METADATA = {"as_strided", "view", "resolve_conj", "resolve_neg", "empty", "empty_strided", "detach", "lift_fresh",
            "_unsafe_view", "t", "expand", "alias", "set_", "slice", "select", "unsqueeze", "transpose", "reshape",
            "permute", "squeeze", "unbind", "split", "chunk", "narrow", "_reshape_alias", "is_nonzero",
            "_local_scalar_dense", "item", "to", "result_type"}
CONFIGS = {"eager": {}, "compile_layers": {"compile_layers": True}}


def count(recipe: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run `oasst train` in this process and count what steps PROFILED_FROM .. + PROFILED dispatch."""
    import collections
    import shutil
    import tempfile
    import time

    import torch
    from transformers import TrainerCallback

    import oasst_train.trainer as trainer_module
    from oasst_train.config import resolve_config

    ops: collections.Counter[str] = collections.Counter()
    kernels = [0]
    seconds: list[float] = []

    class Profile(TrainerCallback):
        """torch.profiler over the profiled steps; every step timed."""

        def __init__(self) -> None:
            self.prof: Any = None
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            if state.global_step == PROFILED_FROM:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > PROFILED_FROM - 2:
                seconds.append(time.perf_counter() - self.started)
            if self.prof is not None and state.global_step == PROFILED_FROM + PROFILED:
                self.prof.__exit__(None, None, None)
                for event in self.prof.events():
                    if event.device_type == torch.autograd.DeviceType.CUDA:
                        kernels[0] += 1
                    elif event.name.startswith("aten::") and not any(
                            child.name.startswith("aten::") for child in event.cpu_children):
                        ops[event.name[6:]] += 1
                self.prof = None

    add_trainer_callback(Profile)
    out = Path(tempfile.mkdtemp(prefix="train-launches-"))
    values = {"model": str(MODEL), "data": str(DATA), "out": str(out / "run"), "max_steps": PROFILED_FROM + PROFILED,
              "save_steps": 1000, "eval_steps": 1000, "max_length": 128} | overrides
    cfg = resolve_config(recipe, values)
    trainer_module.run_training(cfg, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    leaf = sum(ops.values()) / PROFILED
    computing = sum(n for name, n in ops.items() if name not in METADATA) / PROFILED
    return {"leaf_ops_per_step": leaf, "computing_ops_per_step": computing,
            "cuda_kernels_per_step": kernels[0] / PROFILED if kernels[0] else None,
            "median_step_seconds": sorted(seconds)[len(seconds) // 2],
            "top_computing_ops": dict(collections.Counter(
                {name: n / PROFILED for name, n in ops.items() if name not in METADATA}).most_common(12))}


def main() -> None:
    """Each configuration in its own process, then the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "train" / "recipes" / "falcon-7b-guanaco.yaml")
    parser.add_argument("--set", default="{}", help="JSON of settings over the recipe for every configuration")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = json.loads(args.set)
    import torch

    if not torch.cuda.is_available():
        # A CPU has no bf16 kernels worth timing and no paged optimizer: fp32 and torch's AdamW, same graph shape.
        overrides = {"precision": "fp32", "compute_dtype": "float32", "optim": "adamw_torch"} | overrides
    if args._one:
        print("RESULT " + json.dumps(count(args.recipe, overrides | CONFIGS[args._one])), flush=True)
        return
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} missing: python bench/eval_falcon_speed.py prepare [--tiny]")
    runs = {}
    for name in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--recipe", str(args.recipe), "--set", json.dumps(overrides),
                               "--_one", name], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(
                                   [str(REPO), str(REPO / "model"), str(REPO / "train"), str(REPO / "eval")])})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        runs[name] = json.loads(line[7:]) if line else {"error": (proc.stdout + proc.stderr)[-2000:]}
    config = json.loads((MODEL / "config.json").read_text())
    result = {"benchmark": "operations dispatched per optimizer step, eager vs compile_layers",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(("torch", "transformers", "peft", "trl", "bitsandbytes")),
              "recipe": str(args.recipe.relative_to(REPO)), "overrides": overrides,
              "model": {"layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size")},
              "profiled_steps": [PROFILED_FROM, PROFILED_FROM + PROFILED - 1], "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"per optimizer step, {result['recipe']} ({result['machine'].get('gpu', 'cpu')}, "
                        f"{config.get('num_hidden_layers')} layers of width {config.get('hidden_size')})")
    for col in ("configuration", "leaf ATen ops", "computing ops", "CUDA kernels", "median step s"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for name, row in runs.items():
        if "error" in row:
            table.add_row(name, "failed", "-", "-", "-")
            continue
        table.add_row(name, f"{row['leaf_ops_per_step']:.0f}", f"{row['computing_ops_per_step']:.0f}",
                      f"{row['cuda_kernels_per_step']:.0f}" if row["cuda_kernels_per_step"] else "-",
                      f"{row['median_step_seconds']:.3f}")
    Console(width=120).print(table)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
