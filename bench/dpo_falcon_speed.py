"""DPO real tokens/s and peak memory on a Falcon-7B architecture (random weights): `oasst train --method dpo` against
trl's DPOTrainer set up plainly.

Random weights: no trained Falcon exists offline; speed and memory do not depend on weight values (losses and
reward accuracies do: they only show that both arms trained, nothing about quality). Each arm is its own process
(GPU memory starts empty, nvidia-smi sees only it), with a timeout: an arm that fails or hangs is recorded as
failed with the last lines of its output, and the other still runs.

- ours: `oasst train --method dpo` through the CLI (the `oasst` entry with the train plug-in registered
  in-process, as _common.TRAIN_LAUNCHER does), with train/recipes/falcon-7b-dpo.yaml when it exists, else
  falcon-7b-guanaco.yaml's settings with method dpo (beta 0.1, sigmoid; group_by_length and loss_on left out:
  DPO refuses / ignores them): NF4 with the Falcon 4-bit fix, fused attention, fused LoRA, LayerNorm output
  casts, lengths padded to multiples of 64, double quantization.
- plain: trl's DPOTrainer as its documentation sets it up: `AutoModelForCausalLM.from_pretrained(dir,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16, device_map={"": 0})`, a peft LoraConfig as
  `peft_config`, a DPOConfig with our batch size, accumulation, max_length, learning rate and schedule, optimizer,
  clipping, bf16, gradient checkpointing (non-reentrant), beta, loss type and seed. No patches. On transformers
  5.x that loading quantizes nothing in Falcon (FalconLinear is skipped): the plain arm trains over a bf16 base
  of 12.9 GiB. `Linear4bit` modules are counted in both arms and reported; that is the honest plain baseline.

Same data: the train split of `oasst build --pairs best` (default bench/data/pairs-best), Guanaco format (Falcon
has no chat template). Ours renders prompt = Guanaco text ending in "### Assistant:", chosen/rejected =
" " + reply + EOS; plain gets the same prompt and " " + reply, and trl 1.16 appends EOS itself to a non-chat
completion that does not end with it (DPOTrainer._prepare_dataset.add_eos): both tokenize the same strings and
train the same tokens. Both drop pairs whose prompt alone fills max_length and cut longer ones (trl's collator).
What still differs, on purpose (these are ours): pad token (ours a spare special token, plain EOS: masked out of
attention and loss on both sides), padding to multiples of 64 (not counted as real tokens), double quantization,
the 4-bit fix and the fused kernels. Both start from a fresh adapter (the recipe's --init-adapter is not used), so
both references are the base with the adapter disabled; trl turns dropout off in both. trl casts the LoRA weights to
bf16 when the model says it is 4-bit (the plain one says so though nothing in it is): the same under bf16; in the
fp32 smoke the plain arm's LoRA weights are bf16, ours fp32. Our test split is left out (no evaluation in either
arm). The same seed and data seed give both arms the same pairs in the same order: `same_tokens_per_step` in the
results checks it.

Figures per arm, from the per-step log (logging every step):
- real tokens: non-padding tokens of the chosen + rejected sequences fed (the prompt once in each), i.e. the
  attention_mask sums of each micro-batch that transformers' Trainer counts with
  include_num_input_tokens_seen="non_padding" (ours: train_summary.json's log history; plain: the same count);
- step time: optimizer step begin to end (a callback on both sides); steady = after warm-up, the first fifth of
  the steps, at least 2 (cuDNN plan building, allocator growth);
- peak allocated / reserved GiB: torch's peaks over training (reset just before trainer.train() in both);
  nvidia-smi peak: the largest memory.used seen during the whole process (loading included);
- final loss and reward accuracy (trl's rewards/accuracies) at the last step, and the reward accuracy mean.

Usage (the GPU machine has no network; see ../shared/docs/gpu.md):

    # here, once: the pairs and a copy of the Falcon tokenizer under bench/data (both carried to the GPU run)
    oasst build --input ../shared/data/oasst1/validation-en.messages.jsonl --pairs best --test-size 0.1 \\
        --seed 0 --out bench/data/pairs-best
    mkdir -p bench/data/falcon-7b-tokenizer && cp ../shared/models/falcon-7b-tokenizer/* bench/data/falcon-7b-tokenizer/
    python bench/dpo_falcon_speed.py --cpu-smoke       # both arms on a tiny random Falcon, 2 fp32 steps (~1 min)

    # on the GPU machine, from the repo root (carry bench/data/pairs-best and bench/data/falcon-7b-tokenizer):
    export PYTHONPATH=/root/site:$PWD:$PWD/model:$PWD/train:$PWD/eval HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    python bench/eval_falcon_speed.py prepare          # bench/data/falcon7b-random (~2 min)
    python bench/dpo_falcon_speed.py --steps 12 --results $OUT/dpo_falcon_speed-$(date -u +%F).json
                                                       # ours, then plain trl (~3-4 min); copy the JSON into
                                                       # bench/results/ afterwards

`--only ours` / `--only plain` runs one arm; `--timeout` bounds each arm (seconds). Writes
bench/results/dpo_falcon_speed-<date>.json (--results; /tmp/dpo_falcon_speed-smoke-<date>.json with --cpu-smoke)
and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402 - bench/ is not a package

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "train" / "recipes"
DPO_RECIPE = RECIPES / "falcon-7b-dpo.yaml"
GUANACO_RECIPE = RECIPES / "falcon-7b-guanaco.yaml"
MODEL_DIR = REPO / "bench" / "data" / "falcon7b-random"
PAIRS_DIR = REPO / "bench" / "data" / "pairs-best"
TODAY = datetime.now(timezone.utc).date()
RESULTS = REPO / "bench" / "results" / f"dpo_falcon_speed-{TODAY}.json"
SMOKE_RESULTS = Path(tempfile.gettempdir()) / f"dpo_falcon_speed-smoke-{TODAY}.json"
VERSIONS = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# falcon-7b-guanaco.yaml keys that DPO refuses (group_by_length) or ignores with a warning (loss_on), and keys
# this benchmark sets itself.
NOT_FOR_DPO = ("model", "group_by_length", "loss_on", "init_adapter", "data", "out")
DPO_SETTINGS = {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid", "format": "guanaco"}
# --cpu-smoke: a few rows in fp32 on the CPU (bitsandbytes 4-bit runs there; paged optimizers need CUDA).
SMOKE_SETTINGS = {"precision": "fp32", "compute_dtype": "float32", "optim": "adamw_torch", "batch_size": 2,
                  "grad_accum": 2, "max_length": 128}
GIB = 2**30


# ------------------------------------------------------------------------------------------------ settings, data

def tokenizer_dir() -> Path:
    """The Falcon-7B config + tokenizer: carried into bench/data, else ../shared/models."""
    local = REPO / "bench" / "data" / "falcon-7b-tokenizer"
    return local if local.is_dir() else REPO.parent / "shared" / "models" / "falcon-7b-tokenizer"


def our_settings(recipe: Path | None, smoke: bool) -> tuple[dict[str, Any], str]:
    """The recipe values of our arm (and so of the plain arm's matching settings), and where they came from."""
    import yaml

    if recipe is None:
        recipe = DPO_RECIPE if DPO_RECIPE.is_file() else None
    if recipe is not None:
        values = yaml.safe_load(Path(recipe).read_text()) or {}
        source = str(Path(recipe).resolve().relative_to(REPO) if Path(recipe).resolve().is_relative_to(REPO)
                     else recipe)
        values["method"] = "dpo"
    else:
        values = yaml.safe_load(GUANACO_RECIPE.read_text()) | DPO_SETTINGS
        source = f"{GUANACO_RECIPE.relative_to(REPO)} + {DPO_SETTINGS} (no {DPO_RECIPE.name} yet)"
    for key in NOT_FOR_DPO:
        values.pop(key, None)
    values.setdefault("format", "guanaco")
    if smoke:
        values.update(SMOKE_SETTINGS)
    return values, source


def resolved(values: dict[str, Any]) -> dict[str, Any]:
    """`values` completed with TrainConfig's defaults (what our run uses for the keys the recipe leaves out)."""
    import dataclasses

    from oasst_train.config import TrainConfig

    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    full = defaults | values
    for key in ("precision", "compute_dtype", "gradient_checkpointing", "batch_size", "grad_accum"):
        if full[key] == "auto":
            raise SystemExit(f"{key} is `auto` in the recipe: this benchmark needs it set, so both arms match")
    return full


def prepare_data(pairs: Path, work: Path, eos: str) -> tuple[Path, Path, int]:
    """Our data folder (the train split alone: no evaluation) and the plain arm's rows (JSONL of prompt / chosen /
    rejected text in the Guanaco format, replies without EOS: trl appends it); and the number of pairs."""
    from oasst_tools.conversation import ASSISTANT_CUE, render_guanaco

    train = pairs / "train.jsonl"
    if not train.is_file():
        raise SystemExit(f"{train} missing: build it first with `oasst build --input "
                         "../shared/data/oasst1/validation-en.messages.jsonl --pairs best --test-size 0.1 --seed 0 "
                         f"--out {pairs}`")
    ours = work / "pairs-train"
    ours.mkdir(parents=True, exist_ok=True)
    shutil.copy2(train, ours / "train.jsonl")
    plain = work / "plain-rows.jsonl"
    n = 0
    with train.open() as src, plain.open("w") as dst:
        for line in src:
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = render_guanaco(row["prompt"]) + ASSISTANT_CUE
            replies = {k: " " + row[k][0]["content"] for k in ("chosen", "rejected")}
            assert not any(r.endswith(eos) for r in replies.values()), "a reply ends with EOS already"
            dst.write(json.dumps({"prompt": prompt, **replies}) + "\n")
            n += 1
    return ours, plain, n


def tiny_falcon(work: Path) -> Path:
    """--cpu-smoke's model: the Falcon-7B config shrunk to 2 layers of width 64 (4 heads), random fp32 weights,
    saved with the real Falcon tokenizer."""
    import torch
    from transformers import AutoConfig, FalconForCausalLM

    src = tokenizer_dir()
    folder = work / "falcon-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    config_json = json.loads((src / "config.json").read_text())
    config_json.pop("auto_map", None)  # remote code must not load (a saved null breaks AutoConfig on 5.17)
    config_json.update(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    for item in src.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, folder / item.name)
    torch.manual_seed(0)
    model = FalconForCausalLM(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ the two arms

def ours_entry(argv: list[str]) -> None:
    """`_ours EXTRA_JSON OASST_ARGS...`: `oasst OASST_ARGS` with the train plug-in registered in-process (the GPU
    machine has the repo on PYTHONPATH, no installed entry points); torch's peak memory written to EXTRA_JSON."""
    import oasst_tools.cli as core_cli

    extra = Path(argv[0])
    core_cli.DISCOVER_ENTRY_POINTS = False
    core_cli.EXTRA_COMMANDS["train"] = "oasst_train.cli:train"
    code: int | str | None = 0
    try:
        core_cli.main(argv[1:])
    except SystemExit as exc:
        code = exc.code
    finally:
        extra.write_text(json.dumps(_peaks()))
    sys.exit(code)


def _peaks() -> dict[str, Any]:
    """torch's peak allocated / reserved bytes (since the last reset), or the process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    import resource

    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def plain_entry(spec_file: str) -> None:
    """`_plain SPEC_JSON`: trl's DPOTrainer set up plainly (see the module docstring); results to spec["out"]."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    s = spec["settings"]
    import bitsandbytes as bnb
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        """Wall time and real tokens of every optimizer step (what our ProgressCallback records)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []
            self.began: list[float] = []
            self._t0 = 0.0
            self._tokens0 = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._t0 = time.perf_counter()
            self.began.append(time.time())
            self._tokens0 = int(state.num_input_tokens_seen)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds.append(time.perf_counter() - self._t0)
            self.tokens.append(int(state.num_input_tokens_seen) - self._tokens0)

    cuda = torch.cuda.is_available()
    compute = getattr(torch, s["compute_dtype"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                                               bnb_4bit_compute_dtype=compute),
        dtype=compute, device_map={"": 0} if cuda else {"": "cpu"})
    load_seconds = time.perf_counter() - started
    linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                             target_modules=list(s["target_modules"]), bias="none", task_type="CAUSAL_LM")
    # The checkpointing flag under the installed transformers' name (5.24 renamed it activation_checkpointing).
    import dataclasses

    names = {f.name for f in dataclasses.fields(DPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = {ckpt: bool(s["gradient_checkpointing"])}
    if s["gradient_checkpointing"]:
        checkpointing[f"{ckpt}_kwargs"] = {"use_reentrant": False}  # ours, and transformers 5's default
    args = DPOConfig(
        output_dir=spec["work"], max_steps=spec["steps"], per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler"], warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], optim=s["optim"], bf16=s["precision"] == "bf16",
        fp16=s["precision"] == "fp16", max_length=s["max_length"], beta=s["beta"], loss_type=[s["loss_type"]],
        seed=s["seed"], data_seed=s["seed"], logging_steps=1, save_strategy="no", report_to=[],
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, use_cpu=not cuda, **checkpointing)
    clock = StepClock()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    out = {
        "global_step": trainer.state.global_step,
        "step_seconds": clock.seconds, "step_tokens": clock.tokens, "step_began": clock.began,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "log_history": trainer.state.log_history,
        "load_seconds": load_seconds,
        "linear4bit_layers": linear4bit,
        "trl_sees_quantized_model": bool(getattr(model, "is_loaded_in_4bit", False)),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "pairs_trained_on": len(trainer.train_dataset),
        "pad_token": tokenizer.pad_token,
        "transformers": transformers.__version__,
        **_peaks(),
    }
    Path(spec["out"]).write_text(json.dumps(out))


def run_arm(name: str, cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """One arm in its own process group under the nvidia-smi sampler: rc, wall time, samples; a run past
    `timeout` is ended (TERM, then KILL) and recorded as timed out."""
    from train_throughput import SmiSampler

    print(f"running {name} ...", flush=True)
    started = time.perf_counter()
    timed_out = False
    with SmiSampler() as smi, log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | OFFLINE,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"wall_seconds": round(wall, 1), "smi": smi}
    if timed_out or proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {proc.returncode}"
        print(f"{name} failed ({why}):\n" + "\n".join(tail), flush=True)
        result["error"] = why
        result["stderr_tail"] = tail
    return result


def step_figures(seconds: list[float], tokens: list[int]) -> dict[str, Any]:
    """Real tokens/s over all steps and after warm-up (the first fifth, at least 2, never all), seconds per step."""
    n = len(seconds)
    skip = min(max(2, n // 5), max(n - 1, 0))
    steady_s, steady_t = sum(seconds[skip:]), sum(tokens[skip:])
    return {
        "steps_timed": n, "steady_skipped_steps": skip,
        "real_tokens_total": sum(tokens),
        "real_tokens_per_step": sum(tokens) / n if n else None,
        "tokens_per_second": sum(tokens) / sum(seconds) if sum(seconds) else None,
        "steady_tokens_per_second": steady_t / steady_s if steady_s else None,
        "seconds_per_step": sum(seconds) / n if n else None,
        "steady_seconds_per_step": steady_s / (n - skip) if n > skip else None,
        "step_tokens": tokens,
        "step_seconds": [round(x, 4) for x in seconds],
    }


def metric_figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Last logged loss and reward accuracy, and the reward accuracy's mean over the logged steps."""
    loss = [e["loss"] for e in history if "loss" in e and "step" in e]
    acc = [e["rewards/accuracies"] for e in history if "rewards/accuracies" in e and "eval_loss" not in e]
    margin = [e["rewards/margins"] for e in history if "rewards/margins" in e and "eval_loss" not in e]
    return {"loss_first": loss[0] if loss else None, "loss_last": loss[-1] if loss else None,
            "loss_by_step": loss, "reward_accuracy_last": acc[-1] if acc else None,
            "reward_accuracy_mean": sum(acc) / len(acc) if acc else None,
            "reward_margin_last": margin[-1] if margin else None}


def tokens_from_history(history: list[dict[str, Any]], steps: int) -> list[int] | None:
    """Per-step real tokens from the cumulative num_input_tokens_seen of a log written every step."""
    seen = {e["step"]: e["num_input_tokens_seen"] for e in history
            if "num_input_tokens_seen" in e and "step" in e and "loss" in e}
    if sorted(seen) != list(range(1, steps + 1)):
        return None
    cumulative = [seen[s] for s in range(1, steps + 1)]
    return [int(b - a) for a, b in zip([0] + cumulative[:-1], cumulative)]


def memory_figures(peaks: dict[str, Any], smi: Any) -> dict[str, Any]:
    """Peak memory in GiB: torch's allocated / reserved over training (or the process RSS on CPU), nvidia-smi's."""
    out = {"peak_allocated_gib": peaks.get("peak_allocated_bytes", 0) / GIB or None,
           "peak_reserved_gib": peaks.get("peak_reserved_bytes", 0) / GIB or None,
           "peak_nvidia_smi_gib": (smi.peak_mib() or 0) / 1024 or None,
           "gpu_sampler": {"source": smi.source, "samples": len(smi.samples), "error": smi.error}}
    if "peak_rss_bytes" in peaks:
        out["peak_cpu_rss_gib"] = peaks["peak_rss_bytes"] / GIB
    return out


def measure_ours(values: dict[str, Any], model: Path, data: Path, steps: int, timeout: float,
                 work: Path) -> dict[str, Any]:
    """Our arm: `oasst train --method dpo` in its own process; figures from its train_summary.json."""
    import yaml

    config, out, extra = work / "ours.yaml", work / "ours", work / "ours-extra.json"
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    cmd = [sys.executable, __file__, "_ours", str(extra), "train", "--config", str(config), "--model", str(model),
           "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--save-steps", "100000",
           "--logging-steps", "1", "-q"]
    run = run_arm("ours", cmd, timeout, work / "ours.log")
    smi = run.pop("smi")
    if "error" in run:
        return run
    summary = json.loads((out / "train_summary.json").read_text())
    history = summary.pop("log_history", [])
    seconds = summary.get("step_seconds") or []
    tokens = tokens_from_history(history, len(seconds))
    row: dict[str, Any] = {"global_step": summary["global_step"], "tokens_seen": summary["tokens_seen"]}
    if tokens is None:  # no per-step log: the summary's own figures
        row |= {"tokens_per_second": summary["real_tokens_per_second"],
                "steady_tokens_per_second": summary["steady_tokens_per_second"],
                "seconds_per_step": sum(seconds) / len(seconds) if seconds else None,
                "real_tokens_per_step": summary["tokens_seen"] / max(summary["global_step"], 1)}
    else:
        row |= step_figures(seconds, tokens)
    row["summary_steady_tokens_per_second"] = summary.get("steady_tokens_per_second")
    row |= metric_figures(history)
    row["reward_accuracy_last_summary"] = summary.get("reward_accuracy_last")
    # Reserved: written by ours_entry on the way out. Allocated: the summary's, read right after training (as the
    # other benchmarks report it; on a CPU the summary holds the process's peak RSS instead).
    peaks = json.loads(extra.read_text()) if extra.is_file() else {}
    on_gpu = "peak_reserved_bytes" in peaks or bool(smi.samples)
    if summary.get("peak_memory_bytes"):
        peaks["peak_allocated_bytes" if on_gpu else "peak_rss_bytes"] = summary["peak_memory_bytes"]
    row |= memory_figures(peaks, smi)
    row["gpu_busy_percent"] = smi.busy(summary.get("steady_window"))
    row |= {k: summary.get(k) for k in ("linear4bit_layers", "fused_attention_layers", "fused_lora_modules",
                                        "trainable_parameters", "load_seconds", "format", "method", "patches",
                                        "device", "versions")}
    row["data"] = (summary.get("data") or {}).get("train")
    return row | run


def measure_plain(values: dict[str, Any], model: Path, rows: Path, steps: int, timeout: float,
                  work: Path) -> dict[str, Any]:
    """The plain arm: trl's DPOTrainer in its own process (plain_entry)."""
    spec, out = work / "plain-spec.json", work / "plain-result.json"
    spec.write_text(json.dumps({"settings": values, "model": str(model), "rows": str(rows), "steps": steps,
                                "work": str(work / "plain"), "out": str(out)}, default=list))
    run = run_arm("plain", [sys.executable, __file__, "_plain", str(spec)], timeout, work / "plain.log")
    smi = run.pop("smi")
    if "error" in run:
        return run
    result = json.loads(out.read_text())
    history = result.pop("log_history")
    seconds, tokens, began = result.pop("step_seconds"), result.pop("step_tokens"), result.pop("step_began")
    row: dict[str, Any] = {"global_step": result.pop("global_step"), "tokens_seen": result.pop("tokens_seen")}
    row |= step_figures(seconds, tokens)
    row |= metric_figures(history)
    peaks = {k: result.pop(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes")
             if k in result}
    row |= memory_figures(peaks, smi)
    skip = row["steady_skipped_steps"]
    row["gpu_busy_percent"] = smi.busy([began[skip], began[-1] + seconds[-1]] if len(began) > skip else None)
    return row | result | run


# ------------------------------------------------------------------------------------------------ report

def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """ours / plain of the headline figures (None where either is missing)."""
    ours, plain = runs.get("ours", {}), runs.get("plain", {})

    def ratio(key: str) -> float | None:
        a, b = ours.get(key), plain.get(key)
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    return {k: ratio(k) for k in ("steady_tokens_per_second", "tokens_per_second", "steady_seconds_per_step",
                                  "peak_allocated_gib", "peak_reserved_gib", "peak_nvidia_smi_gib",
                                  "peak_cpu_rss_gib")}


def table(result: dict[str, Any]) -> None:
    """The short table printed last."""
    from rich.console import Console
    from rich.table import Table

    def f(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    runs = result["runs"]
    smoke = result["cpu_smoke"]
    where = (result["machine"] or {}).get("gpu", "cpu")
    title = (f"DPO, Falcon-7B random weights, {result['steps']} steps ({where})" if not smoke else
             f"CPU SMOKE: DPO on a 2-layer random Falcon, {result['steps']} steps (not a measurement)")
    t = Table(title=title)
    cols = ("arm", "tok/s steady", "tok/s all", "s/step", "tok/step", "alloc GiB", "reserved GiB", "smi GiB",
            "busy %", "Linear4bit", "loss last", "reward acc")
    if smoke:
        cols = cols[:5] + ("RSS GiB",) + cols[9:]
    for c in cols:
        t.add_column(c, justify="left" if c == "arm" else "right")
    for name, r in runs.items():
        if "error" in r:
            t.add_row(name, f"FAILED: {r['error']}", *["-"] * (len(cols) - 2))
            continue
        head = [name, f(r.get("steady_tokens_per_second"), ",.0f"), f(r.get("tokens_per_second"), ",.0f"),
                f(r.get("steady_seconds_per_step"), ".2f"), f(r.get("real_tokens_per_step"), ",.0f")]
        mem = ([f(r.get("peak_cpu_rss_gib"), ".2f")] if smoke else
               [f(r.get("peak_allocated_gib"), ".1f"), f(r.get("peak_reserved_gib"), ".1f"),
                f(r.get("peak_nvidia_smi_gib"), ".1f"), f(r.get("gpu_busy_percent"), ".0f")])
        tail = [str(r.get("linear4bit_layers")), f(r.get("loss_last"), ".4f"), f(r.get("reward_accuracy_last"), ".2f")]
        t.add_row(*head, *mem, *tail)
    rat = result["ours_over_plain"]
    if any(v is not None for v in rat.values()):
        mem = ([f(rat["peak_cpu_rss_gib"], ".2f")] if smoke else
               [f(rat["peak_allocated_gib"], ".2f"), f(rat["peak_reserved_gib"], ".2f"),
                f(rat["peak_nvidia_smi_gib"], ".2f"), "-"])
        t.add_row("ours/plain", f(rat["steady_tokens_per_second"], ".2f"), f(rat["tokens_per_second"], ".2f"),
                  f(rat["steady_seconds_per_step"], ".2f"), "-", *mem, "-", "-", "-")
    Console(width=150).print(t)
    same = result.get("same_tokens_per_step")
    if same is not None:
        print(f"same real tokens in every step in both arms: {same}")


def save(result: dict[str, Any], path: Path) -> None:
    """Write the results through a temp file (a run cut short keeps what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)


def main() -> None:
    """Prepare the data (and, for --cpu-smoke, the tiny model), run the arms, write the results, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="random Falcon-7B from eval_falcon_speed.py "
                                                                       "prepare")
    parser.add_argument("--data", type=Path, default=PAIRS_DIR, help="an `oasst build --pairs best` folder")
    parser.add_argument("--recipe", type=Path, default=None,
                        help=f"our settings (default: {DPO_RECIPE.name} if present, else {GUANACO_RECIPE.name} "
                             "+ method dpo)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each arm")
    parser.add_argument("--only", default="ours,plain", help="arms to run: ours, plain")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each arm may run")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny random Falcon, 2 fp32 steps on the CPU: checks this script end to end")
    args = parser.parse_args()
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    if set(arms) - {"ours", "plain"}:
        sys.exit(f"--only: unknown arms {', '.join(sorted(set(arms) - {'ours', 'plain'}))}; known: ours, plain")
    work = Path(tempfile.mkdtemp(prefix="dpo-falcon-speed-"))
    steps = 2 if args.cpu_smoke and args.steps == 12 else args.steps
    model = args.model
    if args.cpu_smoke:
        model = tiny_falcon(work)
    elif not (model / "config.json").is_file():
        sys.exit(f"{model} missing: run `python bench/eval_falcon_speed.py prepare` first")
    values, source = our_settings(args.recipe, args.cpu_smoke)
    full = resolved(values)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model).eos_token
    ours_data, plain_rows, n_pairs = prepare_data(args.data, work, eos)
    results = args.results or (SMOKE_RESULTS if args.cpu_smoke else RESULTS)
    result: dict[str, Any] = {
        "benchmark": "DPO real (non-padding) tokens/s and peak memory, Falcon-7B architecture with RANDOM weights "
                     "(losses and reward accuracies meaningless), real Falcon tokenizer, Guanaco format, "
                     "`oasst build --pairs best` train split; ours (`oasst train --method dpo`) vs trl's "
                     "DPOTrainer set up plainly, each in its own process",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": args.note,
        "cpu_smoke": args.cpu_smoke,
        "machine": None,  # filled in after the arms: torch.cuda here would hold a context beside them
        "versions": versions(VERSIONS),
        "steps": steps,
        "model": str(model),
        "data": {"pairs": str(args.data), "train_pairs": n_pairs, "test_split": "left out (no evaluation)"},
        "our_settings": values,
        "our_settings_source": source,
        "plain_settings": {
            "loading": {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": full["quant_type"],
                                                "bnb_4bit_compute_dtype": full["compute_dtype"]},
                        "dtype": full["compute_dtype"], "device_map": {"": "cpu" if args.cpu_smoke else 0}},
            "lora": {k: full[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules")},
            "dpo_config": {k: full[k] for k in ("batch_size", "grad_accum", "max_length", "learning_rate",
                                                "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
                                                "optim", "precision", "gradient_checkpointing", "beta", "loss_type",
                                                "seed")},
            "trl_defaults_kept": "no pad_to_multiple_of, pad token = EOS (the tokenizer has none), dropout off "
                                 "(disable_dropout, as in ours), sdpa attention, no double quantization",
        },
        "warmup": "first fifth of the steps, at least 2, left out of the steady figures",
        "runs": {},
    }
    for arm in arms:
        measure = measure_ours if arm == "ours" else measure_plain
        try:
            row = (measure(values, model, ours_data, steps, args.timeout, work) if arm == "ours" else
                   measure(full, model, plain_rows, steps, args.timeout, work))
        except Exception as exc:  # a broken result file: record it, keep the other arm
            row = {"error": f"{type(exc).__name__}: {exc}"}
        result["runs"][arm] = row | {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        result["ours_over_plain"] = ratios(result["runs"])
        save(result, results)
    runs = result["runs"]
    ours_t, plain_t = runs.get("ours", {}).get("step_tokens"), runs.get("plain", {}).get("step_tokens")
    result["same_tokens_per_step"] = (ours_t == plain_t) if ours_t and plain_t else None
    result["ours_over_plain"] = ratios(runs)
    result["machine"] = machine()
    save(result, results)
    print(f"work folder (logs, configs): {work}")
    print(f"wrote {results}")
    table(result)


if __name__ == "__main__":
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        ours_entry(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_entry(sys.argv[2])
    else:
        main()
