"""The trl config of a run (SFTConfig or DPOConfig): the TrainingArguments every method shares, built from its
TrainConfig, under the names the installed transformers uses.

    args = trainer_config(SFTConfig, cfg, has_eval=True, fresh=True, max_length=cfg.max_length)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError, shown
from oasst_train.async_inputs import loader_args
from oasst_train.checkpoints import CHECKPOINTS
from oasst_train.config import TrainConfig


# Where transformers lists the names it takes: (setting, module, enum). A release that moves one leaves that check
# to trainer_config's own refusal.
NAME_LISTS = (("optim", "transformers.training_args", "OptimizerNames"),
              ("lr_scheduler", "transformers.trainer_utils", "SchedulerType"))


def check_trainer_names(cfg: TrainConfig, origins: dict[str, str] | None = None) -> None:
    """An optimizer or learning-rate schedule the installed transformers does not know is one error line, before a
    model loads (and in --dry-run, which loads none)."""
    import difflib
    import importlib

    for name, module, enum in NAME_LISTS:
        try:
            known = getattr(importlib.import_module(module), enum)
            names = [str(member.value) for member in known]
        except (ImportError, AttributeError, TypeError):
            continue
        value = getattr(cfg, name)
        if names and value not in names:
            close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
            hint = f" (close: {', '.join(close)})" if close else f" ({len(names)} known: {', '.join(names[:6])}, ...)"
            where = (origins or {}).get(name)
            raise OasstError(f"{where + ': ' if where else ''}{name} {shown(value)} is not a name transformers "
                             f"knows{hint}")


def trainer_config(config_class: type, cfg: TrainConfig, *, has_eval: bool, fresh: bool, **extra: Any) -> Any:
    """trl's SFTConfig or DPOConfig with the settings every method shares, and `extra`; a name transformers refuses
    (an optimizer, a schedule) is one error line.

    A fresh run evaluates once before its first step (the baseline the final eval loss is compared with) through
    `eval_on_start`, inside train(): an evaluate() before train() marks the model as prepared for inference and
    accelerate then skips the DistributedDataParallel wrap, so every rank trained its own replica (caught by the
    replica checksums of tests/train/test_distributed.py). The entry lands in the checkpointed log history, so a
    --resume keeps it.
    """
    import torch

    eval_steps = cfg.eval_steps or None
    try:
        return config_class(
            output_dir=str(Path(cfg.out) / CHECKPOINTS),
            max_steps=cfg.max_steps,
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            optim=cfg.optim,
            bf16=cfg.precision == "bf16",
            fp16=cfg.precision == "fp16",
            pad_to_multiple_of=cfg.pad_to_multiple_of or None,
            seed=cfg.seed,
            data_seed=cfg.seed,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit or None,
            eval_strategy="steps" if has_eval and eval_steps else "no",
            eval_on_start=has_eval and fresh,
            eval_steps=eval_steps,
            logging_steps=cfg.logging_steps,
            logging_first_step=True,
            report_to=[] if cfg.report_to == "none" else [cfg.report_to],
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            activation_offloading=cfg.activation_offloading,
            **loader_args(cfg.async_inputs),
            **_sampler_args(config_class, cfg.group_by_length),
            **_checkpointing_args(config_class, cfg.gradient_checkpointing),
            **extra,
        )
    except ValueError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OasstError(f"the training settings were refused: {detail[:400]}") from None


def _sampler_args(config_class: type, group_by_length: bool) -> dict[str, Any]:
    """The length-grouped sampler under its current name (`train_sampling_strategy` replaced `group_by_length`)."""
    if not group_by_length:
        return {}
    names = {f.name for f in dataclasses.fields(config_class)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _checkpointing_args(config_class: type, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under its current name (5.24 renamed `gradient_checkpointing`, which it mirrors)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args: dict[str, Any] = {prefix: enabled}
    if enabled:
        args[f"{prefix}_kwargs"] = {"use_reentrant": False}
    return args
