"""QLoRA training throughput on one GPU: the classic notebook configuration, the Colab-class recipe, the fast one.

Falcon-7B architecture with RANDOM weights (no trained Falcon exists offline; speed and memory do not depend on
weight values), the real Falcon-7B tokenizer, Guanaco-style threads of the English OASST1 validation trees.
Every configuration is its own `oasst train` process (GPU memory starts empty, nvidia-smi sees only it) for
--steps optimizer steps; numbers come from its train_summary.json:

- real tokens/s: non-padding tokens over the steps after warm-up (the first fifth, at least 2, are left out:
  cuDNN plan building and allocator growth), and over all steps. Step times as `oasst train` records them: from
  the previous step's end, on the GPU's timeline (CUDA events); results recorded before 2026-12-06 10:30 UTC timed
  each step from its begin to its end by the host clock, leaving out the data loading and logging between steps;
- MFU: real tokens/s x 4 x 6.9 GFLOP (forward + input-gradient backward through the frozen 4-bit base; LoRA and
  attention not counted; recomputation under gradient checkpointing not counted) / 790 TFLOP/s measured bf16;
- peak memory: torch's allocated peak, and the largest `memory.used` nvidia-smi showed during the run;
- GPU busy %: mean nvidia-smi utilization over the steady steps;
- training loss at equal samples: mean logged loss over the last quarter of the samples every run has seen.

Each configuration logs at its own interval (the recipes' `logging_steps`, the classic notebook's 10): a logging
step waits for the GPU (the Trainer reads the loss). Before 2026-12-06 17:00 UTC every run logged every step.

    # on the GPU machine, from the repo root (wheels unpacked into .gpu/site, see ../shared/docs/gpu.md):
    python bench/eval_falcon_speed.py prepare          # writes bench/data/falcon7b-random (~2 min)
    python bench/train_throughput.py --model bench/data/falcon7b-random --data bench/data/guanaco-all --steps 24
    python bench/train_throughput.py --only attention  # the attention microbenchmark alone (seconds)

`--only` picks configurations (comma-separated); results merge into --results across calls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TRAIN_LAUNCHER, machine, versions  # noqa: E402 - bench/ is not a package

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "train" / "recipes"
RESULTS = REPO / "bench" / "results" / f"train_throughput-{datetime.now(timezone.utc).date()}.json"
BF16_TFLOPS = 790.0  # measured bf16 dense matmul ceiling of the H200 (../shared/docs/gpu.md)
FLOPS_PER_TOKEN = 4 * 6.9e9
PROFILED_STEPS = 3  # with --profile, the last steps of each run (bench/_profile_hook.py reads the count from env)

# The notebook's settings (r 64, alpha 16, dropout 0.1, Falcon's four linears, batch 4 x accumulation 4,
# max length 512, fp16, paged AdamW 32-bit, group_by_length, gradient checkpointing, NF4 without double quant,
# transformers' own attention), with the one fix it needs to run on trl 1.16 (trainable weights kept in fp32).
CLASSIC = {
    "load_in_4bit": True, "quant_type": "nf4", "double_quant": False, "compute_dtype": "float16",
    "precision": "fp16", "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
    "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], "max_length": 512,
    "loss_on": "all", "batch_size": 4, "grad_accum": 4, "learning_rate": 2.0e-4, "lr_scheduler": "constant",
    "max_grad_norm": 0.3, "optim": "paged_adamw_32bit", "gradient_checkpointing": True, "group_by_length": True,
    "fused_attention": False, "cast_norm_outputs": False, "fused_lora": False,
    "seeded_lora_dropout": False, "pad_to_multiple_of": 0, "seed": 42, "logging_steps": 10,
}
COLAB = RECIPES / "falcon-7b-guanaco.yaml"
FAST = RECIPES / "falcon-7b-guanaco-fast.yaml"
# The recipes as they were until 2026-12-06 (unpacked, length-grouped, eager layers): the base of the one-lever
# variants measured before packing and compile_layers went into the recipes, so those names keep their meaning.
FAST_UNPACKED = {"packing": False, "batch_size": 32, "group_by_length": True, "compile_layers": False,
                 "lazy_metrics": False}
COLAB_UNPACKED = {"packing": False, "batch_size": 8, "group_by_length": True, "compile_layers": False,
                  "lazy_metrics": False}
# name -> (base: CLASSIC or a recipe file, overrides). Variants measure one lever each against their base.
CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "classic": (CLASSIC, {}),
    "classic-bf16-fused": (CLASSIC, {"precision": "bf16", "compute_dtype": "bfloat16", "fused_attention": True}),
    # The recipes as committed: packed rows through flash's varlen kernel (patch varlen_attention), compiled layers.
    # Colab-class: 5 rows of 512 x 2 hold ~16 examples a step; fast: 20 rows ~32 examples (914 examples fill 565
    # rows), at most 10,240 tokens, where an unpacked batch of 32 computes ~11,100 (9% padding).
    "colab": (COLAB, {}),
    "fast": (FAST, {}),
    "colab-packed-compiled": (COLAB, {}),  # the name these ran under before they became the recipes
    "fast-packed-compiled": (FAST, {}),
    "fast-packed": (FAST, {"compile_layers": False}),
    "fast-packed-compiled-10": (FAST, {"batch_size": 10}),  # ~16 examples a step, an 80 GB H100's half
    "colab-unpacked": (COLAB, COLAB_UNPACKED),
    "fast-unpacked": (FAST, FAST_UNPACKED),
    "colab-unfused": (COLAB, {**COLAB_UNPACKED, "fused_attention": False}),
    "colab-16x1": (COLAB, {**COLAB_UNPACKED, "batch_size": 16, "grad_accum": 1}),
    "colab-unfusedlora": (COLAB, {**COLAB_UNPACKED, "fused_lora": False}),
    "colab-seeded": (COLAB, {**COLAB_UNPACKED, "seeded_lora_dropout": True}),
    "colab-16x1-seeded": (COLAB, {**COLAB_UNPACKED, "batch_size": 16, "grad_accum": 1, "seeded_lora_dropout": True}),
    "colab-adam8bit": (COLAB, {**COLAB_UNPACKED, "optim": "paged_adamw_8bit"}),
    "colab-offload": (COLAB, {**COLAB_UNPACKED, "activation_offloading": True}),
    "colab-offload-adam8bit": (COLAB, {**COLAB_UNPACKED, "activation_offloading": True, "optim": "paged_adamw_8bit"}),
    "colab-8x2-offload": (COLAB, {**COLAB_UNPACKED, "batch_size": 8, "grad_accum": 2, "activation_offloading": True}),
    "colab-nodropout": (COLAB, {**COLAB_UNPACKED, "lora_dropout": 0.0}),
    "colab-nocast": (COLAB, {**COLAB_UNPACKED, "cast_norm_outputs": False}),
    "fast-16": (FAST, {**FAST_UNPACKED, "batch_size": 16}),
    "fast-nocast": (FAST, {**FAST_UNPACKED, "cast_norm_outputs": False}),
    "fast-unfusedlora": (FAST, {**FAST_UNPACKED, "fused_lora": False}),
    "fast-unseeded": (FAST, {**FAST_UNPACKED, "seeded_lora_dropout": False}),
    "fast-nodropout": (FAST, {**FAST_UNPACKED, "lora_dropout": 0.0}),
    "fast-unfused-16": (FAST, {**FAST_UNPACKED, "fused_attention": False, "batch_size": 16}),
    # Regional torch.compile of the decoder layers (#14) on the unpacked recipes: the first steps compile (left out
    # as warm-up when the run has enough steps; run these with --steps 30 or more).
    "fast-compiled": (FAST, {**FAST_UNPACKED, "compile_layers": True}),
    "colab-compiled": (COLAB, {**COLAB_UNPACKED, "compile_layers": True}),
    # The unpacked fast recipe at half the batch fits an 80 GB H100 (batch 32 takes 88 GiB).
    "fast-compiled-16": (FAST, {**FAST_UNPACKED, "compile_layers": True, "batch_size": 16}),
    # torch's fused AdamW (a few multi-tensor kernels) instead of bitsandbytes' paged one (one kernel per tensor,
    # 256 LoRA tensors): the same fp32 states, so the same memory unless the GPU runs out and pages.
    "colab-fusedadam": (COLAB, {**COLAB_UNPACKED, "optim": "adamw_torch_fused"}),
    "colab-compiled-fusedadam": (COLAB, {**COLAB_UNPACKED, "compile_layers": True, "optim": "adamw_torch_fused"}),
    # sdpa without cuDNN attention (flash / memory-efficient): no plan per new batch shape (bench/sdpa_backends.py:
    # 0.1-1.3 s per training shape on an H100, forward + backward) against cuDNN's faster kernels once planned.
    "colab-compiled-nocudnn": (COLAB, {**COLAB_UNPACKED, "compile_layers": True, "cudnn_attention": False}),
    "fast-compiled-nocudnn": (FAST, {**FAST_UNPACKED, "compile_layers": True, "cudnn_attention": False}),
    # lazy_metrics off: trl's and the Trainer's own waits for the GPU (the option was first tried as bench probes,
    # fast-nosync / fast-workers / fast-log5, in bench/_probe_hook.py at commit 43d42b4).
    "fast-own-metrics": (FAST, {"lazy_metrics": False}),
    "colab-own-metrics": (COLAB, {"lazy_metrics": False}),
    # The fast recipe's interval without async_inputs (before 2026-12-06 17:00 UTC the bench logged every step).
    "fast-log5": (FAST, {"logging_steps": 5, "async_inputs": False}),
    # peft's LoRA arithmetic inside the compiled layers (inductor fuses its scale and add) against fused_lora's addmm.
    "fast-peft-lora": (FAST, {"fused_lora": False}),
    # concat_lora: each 4-bit linear and its LoRA update as one GEMM (bench/lora_gemm.py measures it per layer). On
    # in the fast recipe since 2026-12-06 (fast-concat ran as the recipe plus it before): fast-addmm is that recipe
    # without it; the Colab-class recipe gained nothing from it (8,809 -> 8,814) and leaves it off.
    # carved_lora_dropout (2026-12-07): LoRA dropout masks from a quarter of the random draws inside compiled layers;
    # in both recipes since it was measured (colab-carved ran as the Colab-class recipe plus it before), the
    # -torch-dropout names are the recipes without it.
    "fast-torch-dropout": (FAST, {"carved_lora_dropout": False}),
    "colab-carved": (COLAB, {"carved_lora_dropout": True}),
    "colab-torch-dropout": (COLAB, {"carved_lora_dropout": False}),
    "fast-concat": (FAST, {"concat_lora": True}),
    "fast-addmm": (FAST, {"concat_lora": False}),
    "colab-concat": (COLAB, {"concat_lora": True}),
    # async_inputs (#14): batches pinned and copied without a host wait, packed rows' boundaries from the host. A
    # logging step still waits for the GPU (the Trainer reads the loss), so it shows at the recipes' own interval
    # (every 5th step). Every configuration runs at its own interval since 2026-12-06 17:00 UTC (the recipes' 5, the
    # classic notebook's 10); before, the bench logged every step for its loss windows: the *-log1 variants.
    # The names the first async_inputs calls ran under (the recipes were then without it, logging every step):
    "fast-async": (FAST, {"async_inputs": True, "logging_steps": 1}),
    "fast-async-log5": (FAST, {"async_inputs": True, "logging_steps": 5}),
    "colab-log5": (COLAB, {"async_inputs": False, "logging_steps": 5}),
    "colab-async-log5": (COLAB, {"async_inputs": True, "logging_steps": 5}),
    "classic-log10": (CLASSIC, {"logging_steps": 10}),
    "fast-sync-inputs": (FAST, {"async_inputs": False}),
    "colab-sync-inputs": (COLAB, {"async_inputs": False}),
    "fast-log1": (FAST, {"logging_steps": 1}),
    "colab-log1": (COLAB, {"logging_steps": 1}),
    "classic-log1": (CLASSIC, {"logging_steps": 1}),
}
DEFAULT = ("classic", "colab", "fast")


def recipe_values(base: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The full key/value mapping of one configuration."""
    import yaml

    values = dict(base) if isinstance(base, dict) else yaml.safe_load(Path(base).read_text())
    values.pop("model", None)
    values.update(overrides)
    return values


class SmiSampler:
    """GPU utilization and memory.used every 200 ms (what nvidia-smi shows), stamped with the epoch time read.

    NVML in-process (nvidia-ml-py, installed on the GPU machine) when it loads: one query costs microseconds, so
    the sampler takes no CPU from a host-bound run. Else one `nvidia-smi --query-gpu` call per sample (its -lms
    loop block-buffers when piped). The GPU is CUDA_VISIBLE_DEVICES' first entry (NVML counts physical GPUs).
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.source = "none"
        self.error: str | None = None
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> SmiSampler:
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if not visible.isdigit()
                      else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))
        except Exception as exc:  # no NVML binding or library: fall back to the nvidia-smi binary
            self.error = f"nvml: {exc}"
            self._poll_smi(visible)
            return
        self.source = "nvml"
        while not self._stop.is_set():
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            except Exception as exc:
                self.error = f"nvml: {exc}"
            else:
                self.samples.append((time.time(), float(util), mem))
            self._stop.wait(0.2)

    def _poll_smi(self, visible: str) -> None:
        if not shutil.which("nvidia-smi"):
            return
        self.source = "nvidia-smi"
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-i", visible]
        while not self._stop.is_set():
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, mem = (float(x) for x in line.strip().split(","))
            except (subprocess.TimeoutExpired, ValueError) as exc:
                self.error = f"nvidia-smi: {exc}"
            else:
                self.samples.append((time.time(), util, mem))
            self._stop.wait(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join()

    def busy(self, window: list[float] | None) -> float | None:
        """Mean utilization % inside `window` (epoch seconds)."""
        if not window:
            return None
        inside = [u for t, u, _ in self.samples if window[0] <= t <= window[1]]
        return sum(inside) / len(inside) if inside else None

    def peak_mib(self) -> float | None:
        """Largest memory.used seen (MiB)."""
        return max((m for _, _, m in self.samples), default=None)


def run_config(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One `oasst train` process; its summary plus nvidia-smi figures."""
    import yaml

    base, overrides = CONFIGS[name]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe_values(base, overrides), sort_keys=False))
    out = work / name
    launcher = TRAIN_LAUNCHER
    if args.profile:
        launcher = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import _profile_hook; " + launcher
    logging_steps = recipe_values(base, overrides)["logging_steps"]  # the configuration's own interval
    cmd = [sys.executable, "-c", launcher, "train", "--config", str(config), "--model", args.model,
           "--data", args.data, "--out", str(out), "--max-steps", str(args.steps), "--save-steps", "100000",
           "--eval-rows", "32", "--logging-steps", str(logging_steps), "-q"]
    print(f"running {name} ...", flush=True)
    started = time.perf_counter()
    # Profiled steps come last and are left out of the steady figure below (the profiler slows them).
    env = os.environ | ({"OASST_PROFILE_OUT": str(work / f"{name}.profile.txt"),
                         "OASST_PROFILE_START": str(args.steps - PROFILED_STEPS),
                         "OASST_PROFILE_STEPS": str(PROFILED_STEPS)} if args.profile else {})
    # The run itself inside the sampler (until 2026-11-29's fourth call it ran after the sampler had stopped).
    with SmiSampler() as smi:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        print("\n".join(tail[-30:]))
        return {"error": tail[-1] if tail else "failed", "wall_seconds": round(wall, 1)}
    summary = json.loads((out / "train_summary.json").read_text())
    profile = work / f"{name}.profile.txt"
    if profile.is_file():
        print(profile.read_text())
    figures = profile.with_name(profile.name + ".json")
    kernels = json.loads(figures.read_text()) if figures.is_file() else None
    history = summary.pop("log_history", [])
    values = recipe_values(base, overrides)
    per_step = values["batch_size"] * values.get("grad_accum", 1)
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    steady, window = summary["steady_tokens_per_second"], summary.get("steady_window")
    seconds, tokens = summary["step_seconds"], summary.get("step_tokens")
    skip, end = summary["steady_skipped_steps"], len(seconds) - PROFILED_STEPS
    if kernels and tokens and end > skip:
        steady = sum(tokens[skip:end]) / sum(seconds[skip:end])
        if window:
            window = [window[0], window[1] - sum(seconds[end:])]
    return {
        "settings": {k: values[k] for k in ("precision", "batch_size", "grad_accum", "gradient_checkpointing",
                                             "optim", "fused_attention", "cast_norm_outputs", "fused_lora",
                                             "seeded_lora_dropout", "concat_lora", "packing", "compile_layers",
                                             "lazy_metrics", "async_inputs",
                                             "activation_offloading",
                                             "group_by_length", "pad_to_multiple_of", "loss_on", "lora_alpha")
                     if k in values},
        "rows_per_step": per_step,
        "logging_steps": logging_steps,
        "steps": summary["global_step"],
        "steady_tokens_per_second": steady,
        "all_steps_tokens_per_second": summary["real_tokens_per_second"],
        "mfu": steady * FLOPS_PER_TOKEN / (BF16_TFLOPS * 1e12),
        "peak_allocated_gib": summary["peak_memory_bytes"] / 2**30 if summary.get("peak_memory_bytes") else None,
        "peak_nvidia_smi_gib": (smi.peak_mib() or 0) / 1024 or None,
        "gpu_busy_percent": smi.busy(window),
        "profile": kernels,
        "gpu_sampler": {"source": smi.source, "samples": len(smi.samples), "error": smi.error},
        "linear4bit_layers": summary["linear4bit_layers"],
        "fused_attention_layers": summary.get("fused_attention_layers"),
        "fused_lora_modules": summary.get("fused_lora_modules"),
        "concat_lora_modules": summary.get("concat_lora_modules"),
        "carved_lora_modules": summary.get("carved_lora_modules"),
        "compiled_graphs": summary.get("compiled_graphs"),
        "compiled_graph_breaks": summary.get("compiled_graph_breaks"),
        "trainable_parameters": summary["trainable_parameters"],
        "load_seconds": summary["load_seconds"],
        "train_loss_first": summary["train_loss_first"],
        "train_loss_last": summary["train_loss_last"],
        "loss_by_step": losses,
        "step_seconds": summary.get("step_seconds"),
        "step_tokens": tokens,
        "wall_seconds": round(wall, 1),
        "versions": summary.get("versions"),
    }


def loss_at_equal_samples(runs: dict[str, dict[str, Any]]) -> None:
    """Add `loss_at_samples`: each run's mean loss over the last quarter of the samples all runs of a call saw.

    A packed row holds several examples, so for packed runs rows are not samples: `loss_at_equal_tokens` is the
    comparison that holds across packing."""
    done = {n: r for n, r in runs.items() if "loss_by_step" in r and r["loss_by_step"]}
    ends = {n: [r["rows_per_step"] * step for step in range(1, r["steps"] + 1)] for n, r in done.items()}
    common, means = _last_quarter_losses(done, ends)
    for name, run in done.items():
        run["loss_at_samples"] = {"samples": common, "mean_loss": means[name]}


def loss_at_equal_tokens(runs: dict[str, dict[str, Any]]) -> None:
    """Add `loss_at_tokens`: each run's mean loss over the steps that end in the last quarter of the real tokens
    all runs of a call trained on (packed or not). Runs recorded without per-step tokens use their mean tokens per
    step (`approximate`)."""
    done = {n: r for n, r in runs.items() if r.get("loss_by_step") and r.get("step_seconds")}
    ends = {}
    for name, run in done.items():
        tokens = run.get("step_tokens")
        if not tokens:
            seconds = run["step_seconds"]
            tokens = [run["all_steps_tokens_per_second"] * sum(seconds) / len(seconds)] * len(seconds)
        ends[name] = list(itertools.accumulate(tokens))
    common, means = _last_quarter_losses(done, ends)
    for name, run in done.items():
        run["loss_at_tokens"] = {"tokens": round(common), "mean_loss": means[name],
                                 "approximate": not run.get("step_tokens")}


def _last_quarter_losses(runs: dict[str, dict[str, Any]],
                         ends: dict[str, list[float]]) -> tuple[float, dict[str, float | None]]:
    """(common, run name -> mean logged loss over the last quarter of `common`, the amount every run reached).

    A logged loss is the mean over the steps since the previous log; `ends[name][step - 1]` is the samples or tokens
    seen by the end of `step`. `common` ends at the last logged step of the run that saw least by then, and each
    logged interval counts by how much of the window it covers, so runs logging every step and every 10th are
    compared over the same window (an interval straddling its lower edge adds its whole-interval mean, a small bias
    for runs logging seldom)."""
    if not runs:
        return 0, {}
    logged = {name: [step for step, _ in run["loss_by_step"] if step <= len(ends[name])] for name, run in runs.items()}
    common = min(ends[name][steps[-1] - 1] if steps else ends[name][-1] for name, steps in logged.items())
    low = 0.75 * common
    means: dict[str, float | None] = {}
    for name, run in runs.items():
        marks = ends[name]
        total = weight = 0.0
        previous = 0
        for step, loss in run["loss_by_step"]:
            if step > len(marks):
                break
            start, end = (marks[previous - 1] if previous else 0.0), marks[step - 1]
            previous = step
            covered = max(0.0, min(end, common) - max(start, low))
            if covered > 0:
                total += loss * covered
                weight += covered
        means[name] = total / weight if weight else None
    return common, means


def attention_microbench() -> dict[str, Any]:
    """One Falcon-7B attention layer (bf16, random weights), 16 x 512, forward + backward: each path's time and
    memory."""
    import torch
    from transformers import AutoConfig
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconRotaryEmbedding

    from oasst_model import attention

    tokenizer_dir = REPO / "bench" / "data" / "falcon-7b-tokenizer"
    config = AutoConfig.from_pretrained(tokenizer_dir if tokenizer_dir.is_dir()
                                        else REPO.parent / "shared" / "models" / "falcon-7b-tokenizer")
    config._attn_implementation = "sdpa"
    batch, length = 16, 512
    layer = FalconAttention(config, layer_idx=0).cuda().to(torch.bfloat16)
    rotary = FalconRotaryEmbedding(config).cuda()
    x = torch.randn(batch, length, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(length, device="cuda")[None].expand(batch, -1)
    cos_sin = tuple(t.to(torch.bfloat16) for t in rotary(x, positions))
    causal = torch.full((length, length), float("-inf"), device="cuda").triu(1).to(torch.bfloat16)
    mask = causal[None, None].expand(batch, 1, length, length)
    results: dict[str, Any] = {"shape": [batch, length]}
    plan = attention._Plan()
    original = layer.forward

    def step(forward: Any) -> None:
        out, _ = forward(x, None, mask, position_embeddings=cos_sin)
        out.float().sum().backward()

    for label, mode, kv in (("transformers", None, None), ("fused_expand_causal", "causal", "expand"),
                            ("fused_gqa_causal", "causal", "gqa"), ("fused_expand_mask", "given", "expand")):
        if mode is None:
            forward = original
        else:
            layer._oasst_plan, layer._oasst_original = plan, original
            plan.mode, plan.mask = mode, None
            attention.KV_MODE = kv
            forward = lambda *a, **k: attention._fused_forward(layer, *a, **k)  # noqa: E731
        try:
            for _ in range(3):
                step(forward)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(10):
                step(forward)
            torch.cuda.synchronize()
            results[label] = {"ms": (time.perf_counter() - t0) * 100,
                              "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        except RuntimeError as exc:
            results[label] = {"error": str(exc).splitlines()[0][:200]}
    attention.KV_MODE = "expand"
    return results


def table(call: dict[str, Any]) -> None:
    """The short table printed last: one call's runs, ratios against that call's classic run."""
    runs = call["runs"]
    base = runs.get("classic", {}).get("steady_tokens_per_second")
    print(f"\n{'config':24s} {'tok/s':>7s} {'x classic':>9s} {'MFU':>6s} {'alloc GiB':>9s} {'smi GiB':>8s} "
          f"{'busy %':>6s} {'4bit':>4s} {'loss@tokens':>11s} {'kernels/step':>12s}")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:24s} ERROR {r['error'][:90]}")
            continue
        tps = r["steady_tokens_per_second"]
        loss = (r.get("loss_at_tokens") or {}).get("mean_loss")
        print(f"{name:24s} {tps:7.0f} {tps / base if base else float('nan'):9.2f} {r['mfu']:6.1%} "
              f"{r['peak_allocated_gib'] or 0:9.1f} {r['peak_nvidia_smi_gib'] or 0:8.1f} "
              f"{r['gpu_busy_percent'] or 0:6.0f} {r['linear4bit_layers']:4d} "
              f"{loss if loss is not None else float('nan'):11.4f} "
              f"{(r.get('profile') or {}).get('kernels_per_step', '-'):>12}")
    micro = call.get("attention_microbench")
    if micro:
        print("\nattention layer 16x512 fwd+bwd: " + ", ".join(
            f"{k} {v['ms']:.2f} ms / {v['peak_extra_gib']:.2f} GiB" if "ms" in v else f"{k} {v.get('error')}"
            for k, v in micro.items() if isinstance(v, dict)))


def save(result: dict[str, Any], path: Path) -> None:
    """Write the results file through a temp file (a call cut short keeps what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    """Run the chosen configurations as one call appended to the results file; print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "bench" / "data" / "falcon7b-random"))
    parser.add_argument("--data", default=str(REPO / "bench" / "data" / "guanaco-all"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--only", default=",".join(DEFAULT), help=f"from attention, {', '.join(CONFIGS)}")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="what this call's code had that earlier calls did not")
    parser.add_argument("--profile", action="store_true",
                        help="profile the last 3 steps of each run with torch.profiler (left out of its steady "
                             "tokens/s): kernels per step, GPU ms per step, the top CUDA kernels")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS) - {"attention"})
    if unknown:
        sys.exit(f"unknown configurations: {', '.join(unknown)}")
    result = json.loads(args.results.read_text()) if args.results.is_file() else {
        "benchmark": "QLoRA real tokens/s, Falcon-7B architecture with random weights, real tokenizer, English "
                     "OASST1 validation threads; every call is its own machine: compare runs within a call",
        "flops_per_token": FLOPS_PER_TOKEN,
        "bf16_ceiling_tflops": BF16_TFLOPS,
        "calls": [],
    }
    call: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": args.note,
        "machine": machine(),
        "versions": versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")),
        "steps": args.steps,
        "runs": {},
    }
    result["calls"].append(call)
    if "attention" in names:
        call["attention_microbench"] = attention_microbench()
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    for name in names:
        if name == "attention":
            continue
        call["runs"][name] = run_config(name, args, work) | {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        loss_at_equal_samples(call["runs"])
        loss_at_equal_tokens(call["runs"])
        save(result, args.results)
    save(result, args.results)
    table(call)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    main()
