"""What `oasst train` writes: the adapter folder (adapter, tokenizer, model card, config, loss.png, summary, renamed
into --out at the end), the run's config and card in every checkpoint, and the checks that keep a new run from
overwriting an old one and a --resume from changing what it continues.

    checkpoint = check_out(cfg, resume=False)          # None: a fresh run
    save_outputs(trainer, tokenizer, cfg, targets, summary, Path(cfg.out))
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError
from oasst_tools.files import optional_json
from oasst_tools.output import LOCK, run_lock
from oasst_train.card import RERUN
from oasst_train.checkpoints import CHECKPOINTS, require_checkpoint
from oasst_train.config import AUTO, TrainConfig, to_dict

CONFIG_NAME = "train_config.yaml"
SUMMARY_NAME = "train_summary.json"
# Knobs that may change between a run and its --resume without breaking the data order or the optimizer state.
# async_inputs: when, not what, is computed; activation_offloading: where activations wait, not their values.
RESUMABLE_CHANGES = {"max_steps", "epochs", "save_steps", "save_total_limit", "eval_steps", "logging_steps",
                     "report_to", "eval_rows", "async_inputs", "activation_offloading"}


def check_out(cfg: TrainConfig, resume: bool, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite an earlier run. When --out fails
    the checks while another run holds its lock, the error names that run (what it wrote so far failed them).
    `quiet`: no warning about skipped checkpoints (a first check, made again under the lock)."""
    try:
        return _check_out(cfg, resume, quiet)
    except OasstError:
        from oasst_tools.output import lock_holder

        running = lock_holder(Path(cfg.out), "oasst train")
        if running is not None:
            raise running from None
        raise


def _check_out(cfg: TrainConfig, resume: bool, quiet: bool) -> Path | None:
    from oasst_tools.output import check_apart
    from oasst_tools.files import check_out_folder

    out = Path(cfg.out)
    check_apart(out, [("--data", cfg.data), ("--model", cfg.model), ("--init-adapter", cfg.init_adapter)])
    if resume:
        if out.exists() and not out.is_dir():
            raise OasstError(f"--out {out} is a file, not a folder")
        checkpoint = require_checkpoint(out, (lambda line: None) if quiet else None)
        _check_same_run(cfg, out)
        check_out_folder(out, "--out")  # the run writes new checkpoints and the adapter there
        return checkpoint
    check_out_folder(out, "--out")
    if not out.is_dir():
        return None
    checkpoints = out / CHECKPOINTS
    # A run killed before its first checkpoint leaves an empty checkpoints folder: nothing to resume, reused.
    started = checkpoints.is_dir() and any(checkpoints.iterdir())
    if started or any((out / name).exists() for name in (SUMMARY_NAME, "adapter_config.json")):
        raise OasstError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    # What a run killed before its first checkpoint leaves (a --config inside --out is refused by the command).
    leftovers = (CHECKPOINTS, ".final.tmp", CONFIG_NAME, DATA_NAME, LOCK)
    others = sorted(p.name for p in out.iterdir() if p.name not in leftovers)
    if others:
        # The run writes README.md, train_config.yaml, tokenizer files, ... there: a user's files would be replaced.
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OasstError(f"--out {out} is not empty (it holds {shown}); a run writes its adapter, config and card "
                         "there: choose a new or empty folder")
    return None


# Where a launcher puts this process's rank: torchrun and accelerate launch, then the MPI launchers accelerate reads.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def out_lock(cfg: TrainConfig) -> AbstractContextManager[bool]:
    """--out's lock for the run (oasst_tools.output.run_lock: gives whether it made --out), taken by rank 0 alone:
    the ranks of one distributed run share --out (a second run's rank 0 fails, and its launcher stops the rest)."""
    rank = next((os.environ[name].strip() for name in RANK_VARIABLES if os.environ.get(name, "").strip()), "0")
    if rank != "0":
        return nullcontext(False)
    from oasst_train.report import warn

    return run_lock(Path(cfg.out), "oasst train", warn=warn)


def remove_unstarted(out: Path) -> None:
    """Remove `out`, made by a run that failed, unless it holds a complete checkpoint (kept for --resume)."""
    from oasst_train.checkpoints import last_complete_checkpoint

    if out.is_dir() and not out.is_symlink() and last_complete_checkpoint(out) is None:
        for path in out.iterdir():
            if path.name == LOCK:
                continue  # removed as the lock is let go, with `out` itself
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def save_outputs(trainer: Any, tokenizer: Any, cfg: TrainConfig, targets: list[str], summary: dict[str, Any],
                 out: Path) -> None:
    """Adapter, tokenizer, model card, config, loss.png (and dpo.png) and summary, written to a temp folder and
    renamed into `out`."""
    from oasst_train.report import plot_losses

    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for config in getattr(trainer.model, "peft_config", {}).values():  # adapter_config.json's base, as recorded
            config.base_model_name_or_path = absolute(config.base_model_name_or_path)
        # Only the trained adapter: DPO from an --init-adapter also holds trl's frozen reference copy, `ref`.
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        tokenizer.save_pretrained(tmp)
        write_config(cfg, tmp / CONFIG_NAME, targets)
        _write_card(tmp, summary, cfg, targets, cfg.out)  # in place of peft's empty template
        plot_losses(trainer.state.log_history, tmp / "loss.png")
        if cfg.method == "dpo":
            from oasst_train.dpo import plot

            plot(trainer.state.log_history, tmp / "dpo.png")
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        # The summary goes last: its presence says every other file of the run is in place.
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == SUMMARY_NAME)
        for name in names:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    except BaseException:
        # A full disk or a size limit mid-save: no half-written adapter folder is left behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_writer(cfg: TrainConfig, targets: list[str],
                      data_report: dict[str, Any]) -> Callable[[Path, Any], None]:
    """What each checkpoint gets beside the Trainer's files: train_config.yaml, so that generate, chat, merge and
    eval load it as the run does, and the model card so far."""
    from oasst_train.card import progress_summary

    def write(folder: Path, state: Any) -> None:
        write_config(cfg, folder / CONFIG_NAME, targets)
        summary = progress_summary(state.log_history, state.global_step, state.num_input_tokens_seen)
        summary.update(format=cfg.format, data=data_report, method=cfg.method)
        if cfg.method == "dpo":
            from oasst_train.dpo import figures

            summary.update(figures(state.log_history))
        _write_card(folder, summary, cfg, targets, str(Path(cfg.out) / CHECKPOINTS / folder.name))

    return write


def _write_card(folder: Path, summary: dict[str, Any], cfg: TrainConfig, targets: list[str], name: str) -> None:
    """The model card (card.model_card) as `folder`/README.md (a checkpoint's, rewritten at every save: a kill
    mid-write must not leave half a card)."""
    from oasst_train.card import model_card

    config = to_dict(dataclasses.replace(cfg, target_modules=tuple(targets)))
    _write_text(folder / "README.md", model_card(summary, config, out_name=name), "the model card")


def saved_config(out: Path) -> dict[str, Any]:
    """The train_config.yaml of the run in `out` (a --resume continues it)."""
    from oasst_tools.files import read_yaml_mapping

    saved, _ = read_yaml_mapping(out / CONFIG_NAME, "saved config")
    return saved


def write_config(cfg: TrainConfig, path: Path, targets: list[str]) -> None:
    """The resolved config as YAML, with the LoRA targets actually used."""
    import yaml

    values = to_dict(dataclasses.replace(cfg, target_modules=tuple(targets)))
    for key in LOCAL_PATHS:
        values[key] = absolute(values[key])
    _write_text(path, f"# resolved by oasst train; rerun with: {RERUN}\n"
                + yaml.safe_dump(values, sort_keys=False), "the run's config")


def _write_text(path: Path, text: str, what: str) -> None:
    """`text` into `path` through a temporary file beside it (a reader never sees half of it); a failed write is one
    error line naming `what`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        from oasst_tools.files import write_error

        raise write_error(exc, path, what) from None


# Settings that may name local files or folders: recorded absolute, so that eval, generate, merge and a --resume
# started from another folder find them (a relative `models/x` read elsewhere is missing, or a hub id of that name).
LOCAL_PATHS = ("model", "data", "init_adapter")


def absolute(value: Any) -> Any:
    """`value` as an absolute path when it names a local folder or .gguf file (what the loaders take as local);
    hub ids, "" and anything else as they are (a file `./gpt2` does not make the hub id `gpt2` a path)."""
    if not (isinstance(value, str) and value):
        return value
    local = os.path.isdir(value) or (value.endswith(".gguf") and os.path.isfile(value))
    return os.path.abspath(value) if local else value


DATA_NAME = "data_fingerprint.json"


def data_fingerprint(train_rows: list[Any]) -> dict[str, Any]:
    """The train split's rows (count and a sha256 of their contents in order, not of where they were read): a
    --resume on other rows would continue a data order that no longer exists."""
    import hashlib

    digest = hashlib.sha256()
    for row in train_rows:
        fields = {k: v for k, v in dataclasses.asdict(row).items() if k != "where"}
        digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return {"train_rows": len(train_rows), "sha256": digest.hexdigest()}


def check_same_data(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a --resume whose train split differs from the run's (runs from before the record: not checked)."""
    path = out / DATA_NAME
    if not path.is_file():
        return
    saved = optional_json(path)
    if not isinstance(saved, dict):
        return  # unreadable: the run's config check still holds; nothing better to compare against
    if saved != fingerprint:
        what = (f"{saved.get('train_rows')} -> {fingerprint['train_rows']} train rows"
                if saved.get("train_rows") != fingerprint["train_rows"] else "the same number of rows, other contents")
        raise OasstError(f"--resume: the data differs from the run in {out} ({what}); resume with the data it "
                         "started with, or start a new run in another --out")


def write_data_fingerprint(out: Path, fingerprint: dict[str, Any]) -> None:
    """`out`/data_fingerprint.json, written once at the run's start (atomically)."""
    _write_text(out / DATA_NAME, json.dumps(fingerprint, indent=2) + "\n", "the run's data fingerprint")


def _check_same_run(cfg: TrainConfig, out: Path) -> None:
    """Refuse a --resume whose config would change the data order or the optimizer's meaning."""
    from oasst_tools.files import read_yaml_mapping, same_path

    saved_file = out / CONFIG_NAME
    if not saved_file.is_file():
        return
    saved, _ = read_yaml_mapping(saved_file, "saved config", hint="; it is the config this run was started with: "
                                 "restore it, or start a new run in another --out")
    now = to_dict(cfg)
    # `out` itself may differ: a run folder that was moved or copied resumes as well. A setting left `auto` takes
    # the run's own value (resolve_device_defaults), so it changes nothing.
    # The data may move too once the run recorded its rows (check_same_data compares what is read, not where).
    moved = ("target_modules", "out") + (("data",) if (out / DATA_NAME).is_file() else ())
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k in saved and k not in RESUMABLE_CHANGES and k not in moved
               and now[k] != AUTO and saved[k] != now[k] and not (k in LOCAL_PATHS and same_path(saved[k], now[k]))]
    if cfg.target_modules and sorted(saved.get("target_modules", [])) != sorted(cfg.target_modules):
        changed.append(f"target_modules {saved.get('target_modules')!r} -> {list(cfg.target_modules)!r}")
    if changed:
        raise OasstError(f"--resume: the config differs from the run in {out}: {'; '.join(changed)}")
