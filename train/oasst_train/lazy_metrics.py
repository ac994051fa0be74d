"""lazy_metrics: the training metrics stay on the GPU until they are logged, so the host never waits for the GPU in
the middle of a step and prepares the next one (batch, launches) while the GPU still runs the last.

    from oasst_train.lazy_metrics import lazy_metrics
    lazy_metrics(sft_trainer)          # after the trainer is built, before train(); True when applied

Why: per micro-batch, trl 1.16's SFTTrainer.compute_loss reads entropy, token accuracy and the token count with
`.item()` (the host waits for the forward), transformers' Trainer checks the loss for NaN/inf (`if
torch.isnan(loss)`: waits for the backward) and counts input tokens with another `.item()`. Each wait leaves the
GPU idle while the host then collates the next batch and launches its first kernels; on an H100 the fast Falcon
recipe's profile put ~45 ms of every ~680 ms step there (bench/_profile_hook.py).

What changes, and what does not:
- trl's metrics (entropy, mean_token_accuracy, num_tokens) are the same numbers, appended as GPU tensors and read
  when the trainer logs (one wait per log instead of several per micro-batch). The loss is trl's nll loss over
  its fused LM head, computed as trl computes it (tests compare every logged value with trl's own path);
- input tokens are counted on the host when each training batch is collated, by the rule the Trainer applies to
  the GPU batch (attention mask sum, else tokens other than pad);
- transformers' NaN/inf filter is off in training: a non-finite loss is logged as such for the logging interval
  it falls in instead of being replaced by the mean of earlier ones (it never stopped training; it only hid the
  loss); later intervals log their own losses again. Evaluation keeps the filter (it waits for nothing there).
  Where the Trainer keeps its running loss as a local (no `self._tr_loss`; 5.17-5.25 have it) the filter stays on.

Applies to trl's SFTTrainer on one process with its plain nll loss, collating in the main process (where the
host count runs); anything else (DPO, other loss types, a loss function or label smoothing, MoE aux loss, several
processes, data-loader workers) keeps trl's and the Trainer's own path, recorded as not needed. Guarded by the patch
registry (`lazy_metrics`): when trl's compute_loss or the Trainer's token count changed, their own code runs,
with one warning line.
"""

from __future__ import annotations

from collections import deque
from typing import Any

PATCH = "lazy_metrics"


def lazy_metrics(trainer: Any) -> bool:
    """Keep `trainer`'s per-step metrics on the device until logged (see the module docstring); True if applied."""
    from oasst_model import patches

    reason = _not_applicable(trainer)
    if reason:
        patches.not_applicable(PATCH, reason)
        return False
    missing = [name for name in ("_metrics", "_total_train_tokens") if not hasattr(trainer, name)]
    if not patches.applies(PATCH, problem=f"SFTTrainer instance lacks {', '.join(missing)}" if missing else None):
        return False
    counts = _count_on_host(trainer)
    _metrics_on_device(trainer, counts)
    if patches.trainer_keeps_running_loss():  # else the NaN filter stays on, with its wait
        _nan_filter_off(trainer)
    patches.activated(PATCH)
    return True


def _nan_filter_off(trainer: Any) -> None:
    """The Trainer's NaN/inf loss filter off in training (its `if torch.isnan(loss)` waits for every backward),
    on in evaluation (there it reads host numbers: no wait to save)."""
    own_evaluation_loop = trainer.evaluation_loop

    def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
        trainer.args.logging_nan_inf_filter = True
        try:
            return own_evaluation_loop(*args, **kwargs)
        finally:
            trainer.args.logging_nan_inf_filter = False

    trainer.args.logging_nan_inf_filter = False
    trainer.evaluation_loop = evaluation_loop


def _not_applicable(trainer: Any) -> str | None:
    """Why `trainer` keeps its own metrics path (None: lazy metrics apply)."""
    from trl import SFTTrainer

    args = trainer.args
    if not isinstance(trainer, SFTTrainer):
        return f"{type(trainer).__name__} is not trl's SFTTrainer"
    if getattr(args, "loss_type", "nll") != "nll":
        return f"loss_type {args.loss_type}"
    if getattr(trainer, "compute_loss_func", None) is not None or getattr(trainer, "label_smoother", None) is not None:
        return "a custom loss function or label smoothing"
    if getattr(trainer, "aux_loss_enabled", False):
        return "a router aux loss"
    if trainer.accelerator.num_processes != 1 or getattr(trainer, "_tp_size", 1) != 1:
        return "several processes (trl gathers its metrics across them)"
    if args.dataloader_num_workers:
        return "data-loader workers collate outside this process"
    if args.include_num_input_tokens_seen != "non_padding":
        return f"include_num_input_tokens_seen {args.include_num_input_tokens_seen!r}"
    return None


def _count_on_host(trainer: Any) -> deque[tuple[int, int] | None]:
    """Count every training batch's tokens when it is collated; the Trainer's count takes them in order.

    Per batch: (the Trainer's non-padding count, trl's num_tokens count)."""
    collate = trainer.data_collator
    pad = getattr(trainer.processing_class, "pad_token_id", None)
    main = getattr(trainer.model, "main_input_name", "input_ids")
    counts: deque[tuple[int, int] | None] = deque()
    build_loader = trainer.get_train_dataloader
    own_track = trainer._track_num_input_tokens

    def counting(features: Any) -> Any:
        batch = collate(features)
        if main not in batch:  # the Trainer's own count then warns as it does
            counts.append(None)
        elif "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
            counts.append((real, real))
        else:
            ids = batch[main]
            real = int((ids != pad).sum()) if pad is not None else ids.numel()
            counts.append((real, batch["position_ids"].size(1) if "position_ids" in batch else real))
        return batch

    def train_loader() -> Any:
        # Only training batches are counted (evaluation never reaches the token count); a new loader (another
        # train(), a batch-size retry) starts a new count.
        counts.clear()
        trainer.data_collator = counting
        try:
            return build_loader()
        finally:
            trainer.data_collator = collate

    def track(inputs: Any) -> None:
        if trainer._oasst_batch_tokens is None:  # a batch this module did not see: the Trainer's own count
            own_track(inputs)
            return
        trainer.state.num_input_tokens_seen += trainer._oasst_batch_tokens[0]
        trainer._oasst_batch_tokens = None

    trainer._oasst_batch_tokens = None
    trainer.get_train_dataloader = train_loader
    trainer._track_num_input_tokens = track
    return counts


def _metrics_on_device(trainer: Any, counts: deque[tuple[int, int] | None]) -> None:
    """trl's compute_loss for the plain nll loss, its metrics appended as device tensors; its log() reads them."""
    import torch

    own_loss, own_log = trainer.compute_loss, trainer.log

    def compute_loss(model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if return_outputs:  # prediction with outputs: trl's own path (it recomputes the logits)
            return own_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        training = trainer.model.training
        if training:
            trainer._oasst_batch_tokens = counts.popleft() if counts else None
            if trainer._oasst_batch_tokens is None:
                return own_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * trainer.accelerator.num_processes
        valid = outputs.label_mask.sum()
        some = valid > 0
        for key, total in (("entropy", outputs.entropy.detach().sum()), ("mean_token_accuracy", outputs.is_top1.sum())):
            trainer._metrics[mode][key].append(torch.where(some, total / valid.clamp(min=1), 0.0))
        if training:
            trainer._total_train_tokens += trainer._oasst_batch_tokens[1]
        trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
        return loss

    def log(logs: dict[str, float], start_time: float | None = None) -> None:
        for metrics in trainer._metrics.values():
            for key, values in metrics.items():
                metrics[key] = [v.item() if torch.is_tensor(v) else v for v in values]
        running = getattr(trainer, "_tr_loss", None)
        if "loss" in logs and torch.is_tensor(running):
            # The Trainer has read the running loss and reset it by subtracting it from itself, which leaves a
            # NaN there for good once the NaN filter is off: start the next interval from zero.
            running.zero_()
        own_log(logs, start_time)

    trainer.compute_loss = compute_loss
    trainer.log = log
