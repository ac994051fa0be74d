"""Imported by bench/train_throughput.py for a configuration with probes (OASST_PROBE, comma-separated): candidate
host-side levers tried on the GPU before any becomes a config option. Bench-only; `oasst train` never imports it.

- nosync: no host sync between a micro-batch's backward and the next forward, so the host collates and launches
  the next step while the GPU still works: transformers' NaN/inf loss filter off (`if torch.isnan(loss)` waits
  for the backward), tokens counted on the host at collate time instead of `.item()` on the GPU batch, trl's
  entropy / token-accuracy / token-count metrics kept on the GPU and read at logging time only;
- workers: two data-loader worker processes collate ahead (pinned memory), off the training loop's thread.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

PROBES = {p for p in os.environ.get("OASST_PROBE", "").split(",") if p}


def _host_token_counts(trainer: Any) -> None:
    """Count each training batch's non-padding tokens on the host when it is collated; the trainer's own count
    (a GPU sum and `.item()` per micro-batch) takes them in order."""
    collate = trainer.data_collator
    pad = trainer.processing_class.pad_token_id
    counts: deque[int] = deque()
    train_loader = trainer.get_train_dataloader

    def counting(features: Any) -> Any:
        batch = collate(features)
        counts.append(int((batch["input_ids"] != pad).sum()) if pad is not None else batch["input_ids"].numel())
        return batch

    def loader() -> Any:
        # Only the training loader counts: evaluation batches never reach the trainer's token count.
        trainer.data_collator = counting
        try:
            return train_loader()
        finally:
            trainer.data_collator = collate

    def track(inputs: Any) -> None:
        trainer.state.num_input_tokens_seen += counts.popleft()

    trainer.get_train_dataloader = loader
    trainer._track_num_input_tokens = track


def _lazy_trl_metrics(trainer: Any) -> None:
    """trl's compute_loss (nll, fused LM head, one process) with its metrics left on the GPU until logged."""
    import torch

    cls = type(trainer)

    def compute_loss(model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if trainer.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        valid = outputs.label_mask.sum().clamp(min=1)
        trainer._metrics[mode]["entropy"].append(outputs.entropy.detach().sum() / valid)
        trainer._metrics[mode]["mean_token_accuracy"].append(outputs.is_top1.sum() / valid)
        if mode == "train":
            if "attention_mask" in inputs:
                trainer._total_train_tokens += int(inputs["attention_mask"].sum())  # padded batches only
            else:
                trainer._total_train_tokens += inputs["position_ids"].size(1)
        trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def log(logs: dict[str, float], start_time: float | None = None) -> None:
        for values in trainer._metrics.values():
            for key, items in values.items():
                values[key] = [float(v) if torch.is_tensor(v) else v for v in items]
        cls.log(trainer, logs, start_time)

    trainer.compute_loss = compute_loss
    trainer.log = log


def probe(trainer: Any) -> None:
    """Apply the probes named in OASST_PROBE to a freshly built trainer."""
    if {"nosync", "workers"} <= PROBES:
        raise SystemExit("probes nosync and workers exclude each other (workers collate where nosync counts)")
    if "nosync" in PROBES:
        trainer.args.logging_nan_inf_filter = False
        _host_token_counts(trainer)
        _lazy_trl_metrics(trainer)
    if "workers" in PROBES:
        trainer.args.dataloader_num_workers = 2
        trainer.args.dataloader_pin_memory = True
        trainer.args.dataloader_persistent_workers = True


def _with_probes() -> None:
    """Hook every trainer `oasst train` builds in this process."""
    import oasst_train.trainer as trainer_module

    build = trainer_module._build_trainer

    def probed(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        probe(trainer)
        return trainer

    trainer_module._build_trainer = probed


if PROBES:
    _with_probes()
    print(f"probes: {sorted(PROBES)}", flush=True)
