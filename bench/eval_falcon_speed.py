"""HellaSwag items/s on a Falcon-7B-architecture model (random weights): `oasst eval` vs plain lm-eval.

Random weights: no trained Falcon exists offline, and speed and memory do not depend on weight values
(scores do: they are meaningless here and not reported). Every configuration runs in its own process so
GPU memory starts empty; each scores the first `--limit` HellaSwag items (4 requests each) zero-shot.
Timed span, the same for all: lm-eval's `simple_evaluate` on already-built tasks and an already-loaded model,
so it includes request building, the batch-size search of `auto`, scoring and metrics, not imports or loading.

    # on the GPU machine, from the repo root (wheels unpacked into .gpu/site, see docs/gpu.md):
    PYTHONPATH=.:model:train:eval:.gpu/site python bench/eval_falcon_speed.py prepare     # ~2 min, 14 GB on disk
    PYTHONPATH=.:model:train:eval:.gpu/site python bench/eval_falcon_speed.py run --limit 2000

Configurations (`run --only a,b` picks some; `--merge` keeps earlier runs in the same JSON; the default set is
lm_eval_bs64, oasst_nf4_adapter, oasst_nf4_adapter_unshared, oasst_nf4_adapter_tok32k, oasst_bf16_adapter):
    lm_eval_bs64                 plain lm-eval, bf16, batch 64 (its best setting measured so far: 164 items/s)
    lm_eval_auto                 plain lm-eval, bf16, --batch_size auto (capped at 64)
    oasst_bf16_adapter           oasst eval --adapter (LoRA r64 on Falcon's 4 linears), bf16, defaults: adapter
                                 merged, token-budget batches
    oasst_bf16_adapter_unmerged  the same with --no-merge-adapter (the merge's effect)
    oasst_bf16_adapter_bs64      the same with --batch-size 64 (the token budget's effect: lm-eval's batch, our
                                 head-only logits and batched reads)
    oasst_nf4_adapter            --load-in-4bit (NF4, Falcon fix: 128 Linear4bit layers expected), adapter folded
                                 into each layer's dequantized weight per forward (the default, oasst_eval.lora4bit)
    oasst_nf4_adapter_peft       the same with --no-merge-adapter: peft's own unmerged adapter forward
    oasst_nf4_adapter_unshared   the same with --no-shared-context: one row per request (the shared-context
                                 lever's effect; every oasst configuration shares contexts by default)
    oasst_nf4_adapter_cudnn      oasst_nf4_adapter with --cudnn-attention (torch's own sdpa choice, cuDNN on an
                                 H100/H200, which plans every new batch shape; the default turns it off since
                                 2026-12-06; bench/sdpa_backends.py times it alone; not run by default). The
                                 2026-12-06 H100 calls named the default-to-be `oasst_nf4_adapter_nocudnn`.
    oasst_bf16_adapter_unshared  the bf16 one with --no-shared-context (not run by default)
    oasst_nf4_adapter_tok32k     folded, token budget capped at 32,768 (not run by default)
    oasst_nf4_adapter_tok64k     folded, token budget capped at 65,536 (not run by default)
    lm_eval_bs1                  plain lm-eval's default batch size 1 (slow: ~5 min for 2,000 items; not by default)
    oasst_bf16_base              oasst eval without adapter, bf16 (not run by default)
    oasst_bf16_adapter_tok4k     merged, token budget capped at 4,096 instead of 16,384 (not run by default)
    oasst_bf16_adapter_tok64k    merged, token budget capped at 65,536 (more rows, more padding; not by default)

The hardware floor printed first: the exact tokens the run feeds through the model (lm-eval's own tokenization
of the first `--limit` items with the Falcon tokenizer, context + continuation minus its last token, each
distinct input once), x 2 x 6.9 GFLOP per token forward, over the H200's measured 790 TFLOP/s bf16 ceiling.
No padding is counted. Two floors: lm-eval's rows (each context once per ending), and shared contexts (each
context once per item, what `oasst eval` feeds by default: oasst_eval.shared.plan over the same requests).

Writes bench/results/eval_falcon_speed.json (or --results) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _common import machine, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "oasst_eval" / "tasks"
MODEL_DIR = REPO / "bench" / "data" / "falcon7b-random"
ADAPTER_DIR = REPO / "bench" / "data" / "falcon7b-random-lora"
RESULTS = REPO / "bench" / "results" / f"eval_falcon_speed-{datetime.now(timezone.utc).date()}.json"
DEFAULT_CONFIGS = ("lm_eval_bs64", "oasst_nf4_adapter", "oasst_nf4_adapter_unshared", "oasst_nf4_adapter_tok32k",
                   "oasst_bf16_adapter")
ALL_CONFIGS = DEFAULT_CONFIGS + ("lm_eval_auto", "oasst_bf16_adapter_unmerged", "oasst_bf16_adapter_bs64",
                                 "oasst_nf4_adapter_peft", "lm_eval_bs1", "oasst_bf16_base",
                                 "oasst_bf16_adapter_tok4k", "oasst_bf16_adapter_tok64k", "oasst_nf4_adapter_tok64k",
                                 "oasst_bf16_adapter_unshared", "oasst_nf4_adapter_cudnn")
# Extra `oasst eval` flags per configuration, beyond --adapter / --load-in-4bit read from the name.
OASST_FLAGS = {
    "oasst_bf16_adapter_unmerged": ["--no-merge-adapter"],
    "oasst_bf16_adapter_bs64": ["--batch-size", "64"],
    "oasst_bf16_adapter_tok4k": ["--max-batch-tokens", "4096"],
    "oasst_bf16_adapter_tok64k": ["--max-batch-tokens", "65536"],
    "oasst_nf4_adapter_peft": ["--no-merge-adapter"],
    "oasst_nf4_adapter_unshared": ["--no-shared-context"],
    "oasst_nf4_adapter_cudnn": ["--cudnn-attention"],
    "oasst_bf16_adapter_unshared": ["--no-shared-context"],
    "oasst_nf4_adapter_tok32k": ["--max-batch-tokens", "32768"],
    "oasst_nf4_adapter_tok64k": ["--max-batch-tokens", "65536"],
}
FORWARD_FLOP_PER_TOKEN = 2 * 6.9e9  # 2 x parameters (Falcon-7B: 6.9B) per token, forward only
BF16_CEILING = 790e12  # dense bf16 matrix product on the H200, measured (docs/gpu.md)
FALCON_MAX_LENGTH = 2048  # what HFLM resolves for this config: lm-eval left-truncates inputs to it
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tokenizer_dir() -> Path:
    """The Falcon-7B config + tokenizer folder: carried into bench/data, else ../shared/models."""
    local = REPO / "bench" / "data" / "falcon-7b-tokenizer"
    return local if local.is_dir() else REPO.parent / "shared" / "models" / "falcon-7b-tokenizer"


def data_dir() -> Path:
    """bench/data when the HellaSwag file was carried there, else ../shared/data."""
    local = REPO / "bench" / "data"
    return local if (local / "hellaswag").is_dir() else REPO.parent / "shared" / "data"


def prepare(tiny: bool = False) -> None:
    """Save a random bf16 Falcon-7B (config and tokenizer of falcon-7b-tokenizer) and a random LoRA adapter.

    `tiny` shrinks it to 2 layers of width 64: a CPU smoke test of this script, not a measurement.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, FalconForCausalLM

    src = tokenizer_dir()
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config_json = json.loads((src / "config.json").read_text())
    # A remote-code auto_map must go (models/README.md): drop the key, a saved null breaks AutoConfig on 5.17.
    config_json.pop("auto_map", None)
    if tiny:
        config_json.update(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
    for item in src.iterdir():
        if item.name != "config.json" and item.is_file():
            shutil.copy2(item, tmp / item.name)
    config = AutoConfig.from_pretrained(tmp)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = FalconForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(tmp, max_shard_size="4GB")
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    tmp.rename(MODEL_DIR)
    model.config._name_or_path = model.name_or_path = str(MODEL_DIR)  # peft records it in adapter_config.json
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter random Falcon to {MODEL_DIR} "
          f"in {time.perf_counter() - t0:.0f} s")

    # The classic Falcon QLoRA adapter shape (r 64, alpha 16), with B non-zero so the adapter is not a no-op.
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    tmp = ADAPTER_DIR.with_name(ADAPTER_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if ADAPTER_DIR.exists():
        shutil.rmtree(ADAPTER_DIR)
    tmp.rename(ADAPTER_DIR)
    print(f"saved LoRA r64 adapter ({', '.join(LORA_TARGETS)}) to {ADAPTER_DIR}")


def plain_lm_eval(batch_size: str, limit: int) -> None:
    """One plain lm-eval measurement (the CLI's code path: HFLM from a model path); prints a JSON line."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = HFLM.create_from_arg_string(f"pretrained={MODEL_DIR},dtype=bfloat16",
                                     {"batch_size": batch_size, "max_batch_size": 64,
                                      "device": "cuda" if torch.cuda.is_available() else "cpu"})
    load = time.perf_counter() - t0
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir())})
    tasks = list(manager.load(["hellaswag"])["tasks"].values())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "items": results["n-samples"]["hellaswag"]["effective"], "seconds": seconds, "load_seconds": load,
        "batch_sizes": results["config"].get("batch_sizes") or batch_size,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "linear4bit_layers": 0,
    }))


def run_oasst(argv: list[str]) -> None:
    """`oasst ARGV` with the eval plug-in registered by hand: the GPU machine has the repo, not an install.

    With OASST_BENCH_PROFILE=FILE the scoring runs under cProfile and the functions with the most own time are
    written to FILE: host work shows as own time, waits for the GPU as the own time of the reads that sync. With
    OASST_BENCH_KERNELS=FILE it runs under torch.profiler instead and FILE gets the GPU time and the CUDA kernels by
    their own device time: what the scoring's GPU seconds are made of (GEMMs, dequantization, attention, ...).
    """
    import oasst_tools.cli as core_cli

    core_cli.DISCOVER_ENTRY_POINTS = False
    core_cli.EXTRA_COMMANDS["eval"] = "oasst_eval.cli:eval_command"
    profile_out, kernels_out = os.environ.get("OASST_BENCH_PROFILE"), os.environ.get("OASST_BENCH_KERNELS")
    if not profile_out and not kernels_out:
        core_cli.main(argv)
        return
    import oasst_eval.run as eval_run

    if profile_out:
        import cProfile

        profiler: Any = cProfile.Profile()
        start, stop = profiler.enable, profiler.disable
    else:
        import torch

        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        profiler = torch.profiler.profile(activities=activities)
        _label_eval_phases()

        def stop() -> None:
            if cuda:
                torch.cuda.synchronize()
            profiler.__exit__(None, None, None)

        start = profiler.__enter__
    score = eval_run._score

    def profiled_score(*args: object, **kwargs: object) -> object:
        start()
        try:
            return score(*args, **kwargs)
        finally:
            stop()

    eval_run._score = profiled_score
    try:
        core_cli.main(argv)  # exits through SystemExit; the profile is written on the way out
    finally:
        if profile_out:
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            Path(profile_out).write_text(text.getvalue())
        else:
            Path(kernels_out).write_text(_kernel_table(profiler) + _idle_table(profiler))


def _label_eval_phases() -> None:
    """Name the scoring's host phases in the kernel profile (this process only; a missing target is skipped)."""
    from lm_eval.api.task import ConfigurableTask

    import oasst_eval.fastlm as fastlm
    import oasst_eval.shared as shared
    from _gaps import label_calls

    label_calls(ConfigurableTask, "build_all_requests", "lm_eval.build_all_requests")
    label_calls(ConfigurableTask, "process_results", "lm_eval.process_results")
    label_calls(ConfigurableTask, "apply_filters", "lm_eval.apply_filters")
    for name in ("_encode_all", "_run_shared", "_head_logits", "_finish", "_check_shared", "_measure_batch_tokens",
                 "_score_unshared"):
        label_calls(fastlm.FastHFLM, name, name.lstrip("_"))
    label_calls(fastlm._Batch, "score", "log_softmax")
    for name in ("plan", "pack", "block_mask", "batches"):
        label_calls(shared, name, "shared." + name)


def _idle_table(profiler: Any) -> str:
    """GPU idle time over the scoring span, charged to the host phase running meanwhile (bench/_gaps.py)."""
    from _gaps import idle_gaps

    gaps = idle_gaps(profiler.events(), 1)
    lines = [f"GPU idle {gaps['idle_ms_per_step']} ms of {gaps['span_ms_per_step']} ms while scoring; host phase "
             "meanwhile (ms):"]
    lines += [f"{ms:9.1f}  {label}" for label, ms in list(gaps["idle_by_phase"].items())[:15]]
    lines.append("largest stretches (ms, phase, innermost host op):")
    lines += [f"{ms:9.2f}  {label}  {op}" for ms, label, op in gaps["largest"][:12]]
    return "\n".join(lines) + "\n"


def _kernel_table(profiler: Any) -> str:
    """GPU milliseconds, kernel count and the top CUDA kernels by own device time of a finished torch.profiler."""
    import torch

    from _gaps import _label_range

    averages = profiler.key_averages()
    # Kernels only: the CPU ops that launch them report the same device time again, and the GPU-side ranges of
    # our record_function labels span kernels and idle time alike.
    kernels = sorted((e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and not _label_range(e)),
                     key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    lines = [f"{total:.0f} ms GPU time in {sum(e.count for e in kernels)} kernels while scoring",
             f"{'ms':>9} {'share':>6} {'calls':>7}  kernel"]
    for e in kernels[:25]:
        ms = e.self_device_time_total / 1e3
        lines.append(f"{ms:9.1f} {ms / max(total, 1e-9):6.1%} {e.count:7d}  {e.key[:90]}")
    return "\n".join(lines) + "\n"


def measure(name: str, limit: int, work: Path, profile: str | None = None) -> dict[str, object]:
    """Run one configuration in a fresh process and return its numbers (and print its `profile`: "host", cProfile's
    functions, or "kernels", torch.profiler's CUDA kernels)."""
    env = os.environ | OFFLINE
    profile_file = work / f"{name}.profile.txt"
    if profile and not name.startswith("lm_eval_"):
        env["OASST_BENCH_KERNELS" if profile == "kernels" else "OASST_BENCH_PROFILE"] = str(profile_file)
    log = work / f"{name}.log"
    if name.startswith("lm_eval_"):
        batch = {"lm_eval_bs64": "64", "lm_eval_auto": "auto", "lm_eval_bs1": "1"}[name]
        cmd = [sys.executable, __file__, "_plain", batch, str(limit)]
    else:
        out = work / name
        cmd = [sys.executable, __file__, "_oasst", "eval", "--model", str(MODEL_DIR), "--tasks", "hellaswag",
               "--limit", str(limit), "--data-dir", str(data_dir()), "--out", str(out)]
        if "adapter" in name:
            cmd += ["--adapter", str(ADAPTER_DIR)]
        if "nf4" in name:
            cmd += ["--load-in-4bit"]
        cmd += OASST_FLAGS.get(name, [])
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if profile_file.is_file():
        lines = profile_file.read_text().splitlines()
        what = "CUDA kernels by own GPU time" if profile == "kernels" else "functions with the most own time"
        print(f"--- {name}: {what} while scoring ---")
        print("\n".join(line[:150] for line in lines if line.strip())[:9000])
    if proc.returncode != 0:
        return {"error": text[-2000:], "wall_seconds": round(wall, 1)}
    if name.startswith("lm_eval_"):
        row = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    else:
        settings = json.loads((out / "eval_summary.json").read_text())["settings"]
        label = "adapter" if "adapter" in name else "base"
        row = {"items": settings["items_scored"][label], "seconds": settings["seconds"][label],
               "load_seconds": settings["load_seconds"], "batch_sizes": settings["batch_size_used"][label],
               "peak_gpu_memory_gib": (settings.get("peak_memory_bytes") or 0) / 2**30 or None,
               "linear4bit_layers": settings["linear4bit_layers"],
               "batch_tokens": settings.get("batch_tokens"), "adapter_merged": settings.get("adapter_merged"),
               "shared_context_used": settings.get("shared_context_used"),
               # tokenizing and scoring inside FastHFLM (GPU included); the rest of `seconds` is lm-eval's own
               "loglikelihood_seconds": settings.get("loglikelihood_seconds")}
    row["items_per_second"] = row["items"] / row["seconds"]
    if profile_file.is_file():
        row["profile"] = [line.rstrip() for line in profile_file.read_text().splitlines() if line.strip()]
    row["wall_seconds"] = round(wall, 1)
    return row


def hardware_floor(limit: int) -> dict[str, float | int]:
    """Exact tokens of the first `limit` HellaSwag items through lm-eval's tokenization, and the time they need."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos_text = tokenizer.decode(prefix)

    class Encoder:
        """What `TemplateLM._encode_pair` needs from HFLM: its `tok_encode` (add_bos_token unset)."""

        backend = "causal"

        def tok_encode(self, string: str) -> list[int]:
            return tokenizer.encode(string, **({"add_special_tokens": False} if string.startswith(bos_text) else {}))

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir())})
    task = manager.load(["hellaswag"])["tasks"]["hellaswag"]
    task.build_all_requests(limit=limit)
    from oasst_eval.shared import plan

    inputs = set()
    requests = []
    for instance in task.instances:
        context, continuation = TemplateLM._encode_pair(Encoder(), *instance.args)
        # HFLM's model input; requests with the same input share one row (lm-eval's context grouping).
        inputs.add(tuple((context + continuation)[-(FALCON_MAX_LENGTH + 1):][:-1]))
        requests.append((None, context, continuation))
    tokens = sum(len(x) for x in inputs)
    groups, rest = plan(requests, FALCON_MAX_LENGTH)
    shared_tokens = sum(g.length for g in groups) + sum(len(requests[i][1]) + len(requests[i][2]) - 1 for i in rest)
    seconds = tokens * FORWARD_FLOP_PER_TOKEN / BF16_CEILING
    shared_seconds = shared_tokens * FORWARD_FLOP_PER_TOKEN / BF16_CEILING
    items = len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
    return {"items": items, "requests": len(task.instances), "model_inputs": len(inputs), "tokens": tokens,
            "flop": tokens * FORWARD_FLOP_PER_TOKEN, "seconds": seconds, "items_per_second": items / seconds,
            "shared_tokens": shared_tokens, "shared_seconds": shared_seconds,
            "shared_items_per_second": items / shared_seconds}


def run(limit: int, configs: list[str], results_file: Path, profile: str | None = None, merge: bool = False) -> None:
    """Measure the configurations, merge them into the results file, print the table."""
    if not (MODEL_DIR / "config.json").is_file() or not (ADAPTER_DIR / "adapter_config.json").is_file():
        sys.exit(f"{MODEL_DIR} or {ADAPTER_DIR} missing: run `python {Path(__file__).name} prepare` first")
    floor = hardware_floor(limit)
    print(f"hardware floor: {floor['tokens']:,} tokens in {floor['model_inputs']:,} model inputs "
          f"({floor['requests']:,} requests, {floor['items']:,} items) x {FORWARD_FLOP_PER_TOKEN / 1e9:.1f} GFLOP "
          f"= {floor['flop'] / 1e15:.2f} PFLOP; at {BF16_CEILING / 1e12:.0f} TFLOP/s {floor['seconds']:.2f} s, "
          f"{floor['items_per_second']:.0f} items/s; each context once: {floor['shared_tokens']:,} tokens, "
          f"{floor['shared_seconds']:.2f} s, {floor['shared_items_per_second']:.0f} items/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-falcon-"))
    previous = json.loads(results_file.read_text()) if merge and results_file.is_file() else {}
    runs = previous.get("runs", {}) if previous.get("limit") == limit else {}
    for name in configs:
        print(f"measuring {name} ...", flush=True)
        runs[name] = measure(name, limit, work, profile) | {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result = {
        "benchmark": "HellaSwag zero-shot items/s, Falcon-7B architecture with random weights (scores meaningless)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(("torch", "transformers", "lm_eval", "peft", "datasets", "accelerate", "bitsandbytes")),
        "limit": limit,
        "timed": "simple_evaluate on pre-built tasks and a loaded model (request building, batch-size search, scoring)",
        "reference_items_per_second_2026_11_29": {"lm_eval_bs1": 7.2, "lm_eval_auto": 134, "lm_eval_bs64": 164,
                                                  "plain_nf4_with_falcon_fix": 124},
        "hardware_floor": floor | {"flop_per_token": FORWARD_FLOP_PER_TOKEN, "ceiling_flop_per_second": BF16_CEILING,
                                   "note": "unpadded tokens x 2 x 6.9e9 FLOP / 790e12 FLOP/s; forward only; "
                                           "shared_*: each context once per item"},
        "runs": runs,
    }
    results_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(results_file)

    from rich.console import Console
    from rich.table import Table

    gpu = result["machine"].get("gpu", "cpu")
    table = Table(title=f"HellaSwag items/s, Falcon-7B random weights, first {limit} items ({gpu})")
    baseline = runs.get("lm_eval_bs64", {}).get("items_per_second")
    for col in ("configuration", "batch", "items/s", "x lm_eval bs64", "x shared floor", "scoring s", "load s",
                "peak GiB", "Linear4bit"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for name, row in runs.items():
        if "error" in row:
            table.add_row(name, "failed", "-", "-", "-", "-", "-", "-", "-")
            continue
        batch = f"{row['batch_tokens']} tok" if row.get("batch_tokens") else str(row["batch_sizes"])
        table.add_row(name, batch, f"{row['items_per_second']:.1f}",
                      f"{row['items_per_second'] / baseline:.2f}" if baseline else "-",
                      f"{row['seconds'] / floor['shared_seconds']:.1f}", f"{row['seconds']:.1f}",
                      f"{row['load_seconds']:.1f}", f"{row['peak_gpu_memory_gib'] or 0:.1f}",
                      str(row["linear4bit_layers"]))
    Console(width=120).print(table)
    print(f"wrote {results_file}")


def main() -> None:
    """`prepare` or `run` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_prep = sub.add_parser("prepare", help="save the random Falcon-7B and its LoRA adapter under bench/data")
    p_prep.add_argument("--tiny", action="store_true", help="2 layers of width 64: a CPU smoke test only")
    p_run = sub.add_parser("run", help="measure items/s")
    p_run.add_argument("--limit", type=int, default=2000)
    p_run.add_argument("--results", type=Path, default=RESULTS, help="JSON file written (replaced)")
    p_run.add_argument("--merge", action="store_true",
                       help="keep the runs of the same --limit already in --results (calls on other machines: "
                            "compare with care)")
    p_run.add_argument("--only", default=",".join(DEFAULT_CONFIGS),
                       help=f"comma-separated, from {', '.join(ALL_CONFIGS)}")
    p_run.add_argument("--profile", nargs="?", const="host", choices=("host", "kernels"),
                       help="run the oasst configurations under cProfile (host, the default) or torch.profiler "
                            "(kernels: the CUDA kernels' GPU time) and print where the scoring time goes")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(tiny=args.tiny)
        return
    configs = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        sys.exit(f"unknown configurations {', '.join(unknown)}; known: {', '.join(ALL_CONFIGS)}")
    run(args.limit, configs, args.results, args.profile, args.merge)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_lm_eval(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_oasst":
        run_oasst(sys.argv[2:])
    else:
        main()
