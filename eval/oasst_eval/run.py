"""Score a base model and/or base + adapter with lm-eval, on the same items, from one loaded model.

The model is loaded once with `oasst_model.load` (the loader `oasst train` uses: 4-bit with the Falcon fix,
GGUF, adapters) and handed to lm-eval as an object (`HFLM(pretrained=model)`), which is what lets 4-bit
Falcon and adapters run at all under transformers 5. With `--compare-base` the base model is the same
object with the adapter switched off (`PeftModel.disable_adapter()`), so nothing is loaded twice.

Speed: lm-eval gets a `FastHFLM` (oasst_eval.fastlm: logits only where lm-eval reads them, a measured token
budget per batch on GPU), a 16/32-bit adapter is merged into the weights before it is scored (after the base
model's run, which needs the weights untouched), and lm-eval's prompt templates are compiled once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oasst_model.spec import LOAD_FIELDS, peak_memory_bytes
from oasst_tools.errors import OasstError
from oasst_eval.config import EvalConfig
from oasst_eval.data import register_tokenizer
from oasst_eval.taskset import check_local_data, load_tasks, task_manager

if TYPE_CHECKING:
    from oasst_model.spec import ModelSpec

CPU_BATCH_SIZE = 8
# Tasks that render `oasst build` output in the model's conversation format, with its tokenizer.
FORMAT_TASKS = ("guanaco_test", "guanaco_pairs")


@dataclass
class ModelRun:
    """lm-eval's results for one model label, plus its per-item samples and timing."""

    label: str
    results: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]]
    seconds: float
    items: int = field(default=0)


def split_model(model: str) -> tuple[str, str | None]:
    """`dir/x.gguf` -> (`dir`, `x.gguf`); anything else is passed through unchanged (`ModelSpec.check_model` checked
    the model before)."""
    if model.endswith(".gguf"):
        path = Path(model)
        return str(path.parent), path.name
    return model, None


def check_adapter(adapter: str) -> dict[str, Any]:
    """The adapter's adapter_config.json, or one line saying why the folder is not an adapter (its config or its
    weights), checked before a large model loads for nothing."""
    from oasst_model.load import read_adapter_config

    return read_adapter_config(Path(adapter))


def pick_device(device: str | None) -> str:
    """The requested device, else cuda when present, else cpu."""
    import torch

    if device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise OasstError(f"--device {device}: not a device torch knows; use cpu, cuda or cuda:N") from None
        if parsed.type not in ("cpu", "cuda"):
            raise OasstError(f"--device {device}: oasst eval runs on cpu or cuda, not {parsed.type}")
        if parsed.type == "cuda":
            if not torch.cuda.is_available():
                raise OasstError(f"--device {device} asked for, but torch sees no CUDA device")
            if parsed.index is not None and parsed.index >= torch.cuda.device_count():
                raise OasstError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                                 f"numbered from 0")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_batch_size(batch_size: str, device: str) -> str | int:
    """`default` means lm-eval's auto search on GPU (fast) and a fixed small batch on CPU.

    On CPU an out-of-memory ends the process instead of raising, so lm-eval's search cannot back off there.
    """
    if batch_size == "default":
        return "auto" if device.startswith("cuda") else CPU_BATCH_SIZE
    return "auto" if batch_size == "auto" else int(batch_size)


def model_spec(cfg: EvalConfig) -> ModelSpec:
    """How the base (+ adapter) loads: the adapter's record (train_config.yaml) with the loading flags given on top,
    or, without an adapter, the flags alone (a base model alone loads unquantized unless --load-in-4bit)."""
    from oasst_model.spec import FROM_CONFIG, ModelSpec

    options = cfg.load_options()
    options["model"] = options["model"] or None  # "" is "not given": the adapter names its base
    origins = {name: FROM_CONFIG for name in cfg.from_config}
    if cfg.adapter:
        return ModelSpec.from_adapter(cfg.adapter, origins=origins, **options)
    return ModelSpec.from_options(options, load_in_4bit=False, origins=origins)


def scored_format(cfg: EvalConfig) -> str:
    """The conversation format guanaco_test and guanaco_pairs score: --format, else the one the adapter was trained
    in, else guanaco."""
    from oasst_model.spec import recorded_format

    if cfg.format:
        return cfg.format
    return recorded_format(cfg.adapter) if cfg.adapter else "guanaco"


def load(spec: ModelSpec, device: str) -> tuple[Any, Any]:
    """Base model (+ adapter) and tokenizer through the model layer's one loader, in eval mode."""
    try:
        from oasst_model.spec import load as load_spec
    except ImportError as exc:
        raise OasstError(f"`oasst eval` loads models with oasst_model, which is missing ({exc})") from None

    model, tokenizer = load_spec(spec, device=device)
    model.eval()
    return model, tokenizer


def evaluate(cfg: EvalConfig, *, log: Callable[[str], None] = print,
             verbose: bool = False) -> tuple[list[ModelRun], dict[str, Any]]:
    """Score every requested label; returns the runs and the settings actually used. `verbose`: the full settings
    and lm-eval's own progress bars instead of one rich bar per phase."""
    from oasst_model import patches

    patches.begin_run()
    spec = model_spec(cfg)  # the adapter (config, weights, record) is checked first
    adapter_config = check_adapter(cfg.adapter) if cfg.adapter else None
    metadata = check_local_data(cfg.tasks, cfg.data_dir, cfg.data, cfg.num_fewshot)
    # Missing, damaged config or weights, a hub id while offline: before anything heavy loads (a base an adapter
    # records is named with the file that records it).
    spec.check_model()
    name, gguf_file = split_model(spec.model)
    if any(task in FORMAT_TASKS for task in cfg.tasks):
        metadata["tokenizer"] = name
        metadata["format"] = scored_format(cfg)
        if gguf_file:
            metadata["gguf_file"] = gguf_file
    manager = task_manager(cfg.tasks, metadata)
    tasks = load_tasks(manager, cfg.tasks)

    device = pick_device(cfg.device)
    from oasst_model.spec import device_profile

    spec = spec.resolved(device_profile(device))
    batch_size = pick_batch_size(cfg.batch_size, device)
    # Printed only once the inputs are known to be good, so a bad input is the only line of output.
    if verbose:
        # By default the next lines say what matters (how the model loads, device, batch size); all of it here.
        log(f"oasst eval {cfg.as_dict()} device={device} batch_size={batch_size}")
    from oasst_eval.report import loaded_as

    log(loaded_as(spec.describe()))
    from oasst_eval.envinfo import env_info_prefetched

    # lm-eval's environment report (seconds of subprocesses) is gathered while the model loads.
    with env_info_prefetched():
        t0 = time.perf_counter()
        model, tokenizer = load(spec, device)
        load_seconds = time.perf_counter() - t0
        if any(task in FORMAT_TASKS for task in cfg.tasks):
            register_tokenizer(name, tokenizer)
        from oasst_model.load import count_linear4bit

        linear4bit = count_linear4bit(model)

        from oasst_eval.fastlm import cache_jinja_templates

        lm = make_lm(model, tokenizer, batch_size, cfg)
        merge = bool(cfg.adapter and cfg.merge_adapter and not spec.load_in_4bit)
        # 4-bit weights are not re-quantized with the adapter in them (another model): it folds in per forward.
        fold = bool(cfg.adapter and cfg.merge_adapter and spec.load_in_4bit)
        labels = (["base", "adapter"] if cfg.compare_base else ["adapter"]) if cfg.adapter else ["base"]
        runs = []
        merge_seconds = None
        undo = cache_jinja_templates()
        if "guanaco_pairs" in cfg.tasks:
            from oasst_eval.preference import set_window

            set_window(lm.max_length)  # pairs with a reply longer than this are left out (lm-eval would stop on them)
        try:
            for label in labels:
                log(f"scoring {label} on {', '.join(cfg.tasks)} ({device}, batch size {batch_size})")
                if label == "base" and cfg.adapter:
                    with model.disable_adapter():
                        runs.append(_score(lm, tasks, manager, cfg, label, bars=not verbose))
                    continue
                if label == "adapter" and merge:
                    t0 = time.perf_counter()
                    # In place: the LoRA product is added to each wrapped layer's weight; the wrappers then call only
                    # their base layer (peft's public merge, so lm-eval keeps the model object it was given).
                    model.merge_adapter()
                    merge_seconds = round(time.perf_counter() - t0, 2)
                    log(f"adapter merged into the weights in {merge_seconds} s")
                if label == "adapter" and fold:
                    from oasst_eval.lora4bit import merged_4bit_lora

                    with merged_4bit_lora(model) as layers:
                        log(f"adapter folded into the dequantized weights of {layers} 4-bit layers at each forward")
                        runs.append(_score(lm, tasks, manager, cfg, label, bars=not verbose))
                    continue
                runs.append(_score(lm, tasks, manager, cfg, label, bars=not verbose))
        finally:
            undo()
            if "guanaco_pairs" in cfg.tasks:
                set_window(None)
    settings = cfg.as_dict() | {name: getattr(spec, name) for name in LOAD_FIELDS} | {
        "base_loaded": spec.describe(),
        "device": device,
        "batch_size_used": {run.label: run.results["config"].get("batch_sizes") or batch_size for run in runs},
        "batch_tokens": getattr(lm, "batch_tokens", None),
        "shared_context_used": getattr(lm, "shared_stats", None),
        "loglikelihood_seconds": ({k: round(v, 2) for k, v in lm.seconds.items()} if hasattr(lm, "seconds")
                                  else None),
        "adapter_merged": "folded per forward (weights stay 4-bit)" if fold else merge,
        "merge_seconds": merge_seconds,
        "data_used": {k: v for k, v in metadata.items() if k in ("data_dir", "data")},
        "format": metadata.get("format", cfg.format),
        "load_seconds": round(load_seconds, 2),
        "linear4bit_layers": linear4bit,
        "seconds": {run.label: round(run.seconds, 2) for run in runs},
        "items_scored": {run.label: run.items for run in runs},
        "adapter_trained_on": (adapter_config or {}).get("base_model_name_or_path"),
        "peak_memory_bytes": peak_memory_bytes(device),  # the name and measure train_summary.json uses
        "patches": patches.report(),
    }
    return runs, settings


def make_lm(model: Any, tokenizer: Any, batch_size: str | int, cfg: EvalConfig) -> Any:
    """lm-eval's model wrapper: `FastHFLM` when lm-eval's internals are the ones it was written for (patch
    `lm_eval_fast_loglikelihood`), else lm-eval's own `HFLM`, with one warning line."""
    from oasst_model import patches

    # max_batch_size also bounds lm-eval's own search, which loglikelihood_rolling (guanaco_test) still uses.
    common = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size,
              "max_batch_size": cfg.max_batch_size or 64}
    if patches.applies("lm_eval_fast_loglikelihood"):
        from oasst_eval.fastlm import FastHFLM

        lm = FastHFLM(**common, max_rows=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens,
                      shared_context=cfg.shared_context)
        problem = patches.check_hflm_instance(lm)  # attributes HFLM sets in __init__
        if problem is None:
            patches.activated("lm_eval_fast_loglikelihood")
            return lm
        patches.fallback("lm_eval_fast_loglikelihood", problem)
    from lm_eval.models.huggingface import HFLM

    return HFLM(**common)


def _score(lm: Any, tasks: list[Any], manager: Any, cfg: EvalConfig, label: str, *, bars: bool = True) -> ModelRun:
    """lm-eval's results for `lm` on `tasks`; `bars`: our rich bars in place of lm-eval's tqdm bars."""
    from contextlib import nullcontext

    from lm_eval import simple_evaluate

    from oasst_eval.progress import request_bars
    from oasst_model.attention import cudnn_sdpa

    t0 = time.perf_counter()
    with request_bars(lm, label) if bars else nullcontext(), cudnn_sdpa(cfg.cudnn_attention):
        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            log_samples=True,  # per-item scores: the paired standard error of the difference needs them
        )
    seconds = time.perf_counter() - t0
    samples = results.pop("samples")
    items = sum(v["effective"] for v in results.get("n-samples", {}).values())
    return ModelRun(label=label, results=results, samples=samples, seconds=seconds, items=items)
