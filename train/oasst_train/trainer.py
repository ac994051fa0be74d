"""`oasst train`: checks -> build_data (tokenizer only) -> prepare_model -> build_trainer -> train -> summarize ->
save (trl SFT, or DPO on preference pairs: oasst_train.dpo; what is written, and where: oasst_train.outputs).

    summary = run_training(resolve_config(Path("train/recipes/tiny-cpu.yaml"), {}), resume=False)

Multi-GPU and multi-node through accelerate, nothing home-made:

    accelerate launch --config_file train/recipes/accelerate-2gpu.yaml -m oasst_tools train --config ...
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oasst_tools.errors import OasstError
from oasst_train.checkpoints import CHECKPOINTS, finished_at
from oasst_train.config import TrainConfig, device_line
from oasst_train.report import warn
from oasst_train.outputs import (CONFIG_NAME, SUMMARY_NAME, check_out, check_same_data, checkpoint_writer,
                                 data_fingerprint, out_lock, remove_unstarted, save_outputs, saved_config, write_config,
                                 write_data_fingerprint)

if TYPE_CHECKING:
    from oasst_model.spec import ModelSpec

# transformers 5.17 lets packed Falcon sequences attend to each other (0.31 max logit difference); 5.24 does not.
PACKING_MIN_TRANSFORMERS = "5.24.0"


def check_targets(model: Any, targets: list[str], where: str | None = None) -> None:
    """Refuse target_modules names that match no layer of `model` (peft would fail deep inside the trainer);
    `where` is the config file line they came from (else the flag is named)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    unknown = [t for t in targets if t not in names]
    if unknown:
        from oasst_model.load import lora_target_modules, model_name

        said = f"{where}: target_modules" if where and not where.startswith("--") else "--target-modules"
        raise OasstError(f"{said} {','.join(unknown)}: {model_name(model)} has no layer of that name "
                         f"(its linear layers: {', '.join(lora_target_modules(model))})")


def check_packing(model: Any) -> None:
    """Refuse packing where it is known to leak attention across packed examples."""
    import transformers
    from packaging.version import Version

    from oasst_model.attention import fused_attention_layers

    if fused_attention_layers(model):
        return  # the fused path builds its own block mask from the position ids (tests/train/test_attention.py)
    if model.config.model_type == "falcon" and Version(transformers.__version__) < Version(PACKING_MIN_TRANSFORMERS):
        raise OasstError(f"packing Falcon on transformers {transformers.__version__} lets packed examples attend to "
                         f"each other; upgrade to transformers>={PACKING_MIN_TRANSFORMERS} or drop --packing")


def disable_kv_cache(model: Any) -> None:
    """Train without a KV cache: with one, transformers (5.24 included) ignores the packed-sequence position ids
    and lets packed examples attend to each other (checked by the packing leak test)."""
    model.config.use_cache = False


@dataclass
class Prepared:
    """The base model as training uses it (before LoRA), its tokenizer, and what was done to it."""

    model: Any
    tokenizer: Any
    load_seconds: float
    linear4bit: int
    fused_attention_layers: int


@dataclass
class Data:
    """The tokenized splits a run trains and evaluates on."""

    train: Any
    eval: Any | None
    format: str  # the conversation format the rows were encoded in
    # Per split: rows, rows cut by max_length, loss tokens trained and lost, rows dropped (data.DataReport.to_dict).
    report: dict[str, Any] | None = None


@dataclass
class Built:
    """The trainer, with the LoRA adapter on `targets`, the LoRA modules switched to the fused forward, and the
    decoder layers compiled (compile_layers)."""

    trainer: Any
    targets: list[str]
    fused_lora: int
    compiled_layers: int = 0


def run_training(cfg: TrainConfig, *, resume: bool = False, console: Any = None, progress: bool = True,
                 announce: Callable[[TrainConfig, list[str]], None] | None = None,
                 origins: Mapping[str, str] | None = None) -> dict:
    """Train a LoRA adapter as `cfg` says; returns the summary also written to `out/train_summary.json`.

    The stages: cheap checks, the `auto` settings and the format resolved, `build_data` (tokenizer only),
    `prepare_model`, `build_trainer`, `train`, `summarize`, then the outputs. `announce(resolved_cfg, lines)` runs
    once the cheap checks passed, with the lines that say what the device and the tokenizer decided (the CLI prints
    the resolved config then, so that a bad input is the only line of output); the data report goes to `console`."""
    from oasst_train import dpo

    # Cheap checks first: a typo should not cost the ten seconds of importing torch and transformers.
    cfg, reference_line = dpo.adopt_init_adapter(cfg)  # before check_out: a --resume compares the adopted values
    check_out(cfg, resume, quiet=True)
    with out_lock(cfg) as made_out:
        try:
            # Checked again under the lock: a run into the same --out may have ended (or saved) since the first check.
            return _run_locked(cfg, check_out(cfg, resume), reference_line, console=console, progress=progress,
                               announce=announce, origins=origins)
        except BaseException:
            if made_out:  # under the lock: never a folder another run is writing
                remove_unstarted(Path(cfg.out))
            raise


def _run_locked(cfg: TrainConfig, checkpoint: Path | None, reference_line: str | None, *, console: Any,
                progress: bool, announce: Callable[[TrainConfig, list[str]], None] | None,
                origins: Mapping[str, str] | None) -> dict:
    """run_training once no other run writes into --out: from the data and the model to the saved outputs."""
    from oasst_model.load import check_source
    from oasst_train import dpo
    from oasst_train.arguments import check_trainer_names
    from oasst_train.data import read_rows

    is_dpo = cfg.method == "dpo"
    finished = finished_at(checkpoint, cfg.max_steps, cfg.epochs) if checkpoint is not None else None
    if finished is not None and (Path(cfg.out) / SUMMARY_NAME).is_file():
        import click

        from oasst_tools.files import optional_json

        click.echo(f"--resume: {cfg.out} is finished (step {finished} of {finished}); nothing to train (raise "
                   "--max-steps or --epochs to train on)", err=True)
        summary = optional_json(Path(cfg.out) / SUMMARY_NAME)
        return summary if isinstance(summary, dict) else {}
    check_source(cfg.model)
    rows = dpo.read_pairs(cfg.data, cfg.eval_rows) if is_dpo else read_rows(cfg.data, cfg.eval_rows)
    out = Path(cfg.out)
    fingerprint = data_fingerprint(rows["train"])
    if not rows.get("test"):
        # Said, not silent: a test split that is there but empty, or evaluation asked for without one.
        why = "its test split has no rows" if "test" in rows else "it has no test split"
        if "test" in rows or cfg.eval_steps:
            warn(f"--data {cfg.data}: {why}, so nothing is evaluated"
                 + (f" (eval_steps {cfg.eval_steps} is ignored)" if cfg.eval_steps else ""))
    if checkpoint is not None:
        check_same_data(out, fingerprint)
    cfg, device_choice = resolve_device_defaults(cfg, resuming=checkpoint is not None, origins=origins)
    check_trainer_names(cfg, origins)  # imports transformers (and torch): after the checks that need neither

    from oasst_model import patches
    from oasst_model.attention import cudnn_sdpa
    from oasst_model.load import load_tokenizer
    from oasst_train.callbacks import ProgressCallback, WriteOnSave
    from oasst_train.preview import report_lines, run_format

    patches.begin_run()
    # The tokenizer alone decides the format and encodes the rows: a template that fails, or data with nothing to
    # learn, is one line before the weights load.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    cfg, format_line = run_format(cfg, tokenizer, saved_config(out) if checkpoint is not None else None, origins)
    if announce is not None:
        announce(cfg, [line for line in (device_line(device_choice), format_line, reference_line) if line])
    data = dpo.build_pairs(cfg, tokenizer, rows) if is_dpo else build_data(cfg, tokenizer, rows)
    if console is not None:
        for line in dpo.report_lines(data.report) if is_dpo else report_lines(data.report):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    prepared = prepare_model(cfg)
    # Given target modules, SFT and DPO alike (DPO from an --init-adapter takes the adapter's): checked here, once,
    # where the config line that names them is known.
    if cfg.target_modules and not cfg.init_adapter:
        check_targets(prepared.model, list(cfg.target_modules), (origins or {}).get("target_modules"))
    if "paged" in cfg.optim and not _on_cuda(prepared.model):
        warn(f"optim {cfg.optim}: paged optimizers need a CUDA GPU; bitsandbytes runs it unpaged here (the same "
             "updates)")
    if cfg.activation_offloading and all(p.device.type == "cpu" for p in prepared.model.parameters()):
        # trl's offloading moves activations from an accelerator to the host; on a CPU it fails at the first step.
        warn("activation_offloading: the model is on the CPU, where activations already are; training without it")
        cfg = dataclasses.replace(cfg, activation_offloading=False)
    positions = getattr(getattr(prepared.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_length > positions:
        warn(f"max_length {cfg.max_length} is beyond the {positions} positions {cfg.model} was trained with; rows "
             f"longer than {positions} tokens go past them")
    out.mkdir(parents=True, exist_ok=True)
    built = (dpo.build_trainer if is_dpo else build_trainer)(cfg, prepared, data, fresh=checkpoint is None)
    if built.trainer.is_world_process_zero():  # every rank writing one temp file raced (seen on 2 CPU ranks)
        write_config(cfg, out / CONFIG_NAME, built.targets)
        write_data_fingerprint(out, fingerprint)
    built.trainer.add_callback(WriteOnSave(checkpoint_writer(cfg, built.targets, data.report)))
    bar = ProgressCallback(console=console, enabled=progress)
    # Around every step and evaluation, set before the first: compiled layers pick their attention kernel as they trace.
    with cudnn_sdpa(cfg.cudnn_attention):
        train(cfg, built, bar, checkpoint, has_eval=data.eval is not None, finished=finished is not None)
    summary = summarize(cfg, prepared, built, bar, checkpoint)
    summary.update(device_defaults=device_choice, format=cfg.format, data=data.report, method=cfg.method)
    if is_dpo:
        summary.update(dpo.figures(built.trainer.state.log_history))
    if built.trainer.is_world_process_zero():
        save_outputs(built.trainer, prepared.tokenizer, cfg, built.targets, summary, out)
    return summary


def _on_cuda(model: Any) -> bool:
    """Whether `model`'s weights are on a CUDA device."""
    return any(p.is_cuda for p in model.parameters())


def resolve_device_defaults(cfg: TrainConfig, *, resuming: bool = False, origins: Mapping[str, str] | None = None
                            ) -> tuple[TrainConfig, dict[str, Any]]:
    """`cfg` with its `auto` settings decided, once, for this process's device (a resumed run keeps the values in
    its train_config.yaml), checked again, and the choice as train_summary.json records it (`origins`: where each
    given setting was set, as resolve_config fills it)."""
    from oasst_model.spec import device_profile
    from oasst_train.config import resolve_auto, validate

    saved = saved_config(Path(cfg.out)) if resuming else None
    resolved, choice = resolve_auto(cfg, device_profile(), saved, origins)
    validate(resolved)
    return resolved, choice


def prepare_model(cfg: TrainConfig) -> Prepared:
    """Every change to the base model before LoRA, in one place: load it as `model_spec(cfg)` says (4-bit with
    Falcon's fix, fused attention), turn its KV cache off, refuse leaking packing, hand LayerNorm outputs on in the
    autocast dtype."""
    from oasst_model.attention import fused_attention_layers
    from oasst_model.casts import cast_norm_outputs
    from oasst_model.load import count_linear4bit
    from oasst_model.spec import load

    started = time.perf_counter()
    model, tokenizer = load(model_spec(cfg))
    load_seconds = time.perf_counter() - started
    disable_kv_cache(model)
    if cfg.packing:
        check_packing(model)
    if cfg.cast_norm_outputs and cfg.precision in ("bf16", "fp16"):
        cast_norm_outputs(model)
    return Prepared(model, tokenizer, load_seconds, count_linear4bit(model), fused_attention_layers(model))


def model_spec(cfg: TrainConfig) -> ModelSpec:
    """How a run loads its base model: the loading options of `cfg` (resolved: no `auto` left)."""
    from oasst_model.spec import LOAD_FIELDS, ModelSpec

    return ModelSpec(**{name: getattr(cfg, name) for name in LOAD_FIELDS})


def build_data(cfg: TrainConfig, tokenizer: Any, rows: dict[str, list[Any]]) -> Data:
    """The train (and test) rows encoded in `cfg.format` (auto: the tokenizer's chat template when it has one, else
    guanaco), with the loss mask `loss_on` asks for, cut to max_length; rows left with nothing to learn are dropped
    and counted in `report`."""
    from oasst_tools.conversation import resolve_format
    from oasst_train.data import build_dataset, require_trainable

    fmt = resolve_format(cfg.format, tokenizer)
    assistant_only = cfg.loss_on == "assistant"
    train_set, train_report = build_dataset(tokenizer, rows["train"], assistant_only, format=fmt,
                                            max_length=cfg.max_length)
    require_trainable(train_report)
    report = {"train": train_report.to_dict()}
    eval_set = None
    if rows.get("test"):
        # A test split left with nothing to score is None (no eval loss), and its report says why.
        eval_set, test_report = build_dataset(tokenizer, rows["test"], assistant_only, format=fmt,
                                              max_length=cfg.max_length)
        report["test"] = test_report.to_dict()
    return Data(train_set, eval_set, fmt, report)


def build_trainer(cfg: TrainConfig, prepared: Prepared, data: Data, *, fresh: bool) -> Built:
    """The SFTTrainer with LoRA on the configured (or every linear) layer, and the LoRA modules' fused forward."""
    from oasst_model.load import lora_target_modules

    targets = list(cfg.target_modules) or lora_target_modules(prepared.model)  # given ones: checked by run_training
    trainer = _build_trainer(cfg, prepared.model, prepared.tokenizer, data.train, data.eval, targets, fresh=fresh)
    # SFTTrainer wraps the model in LoRA (get_peft_model from peft_config): the LoRA modules exist only from here on.
    return with_fast_paths(cfg, trainer, targets)


def with_fast_paths(cfg: TrainConfig, trainer: Any, targets: list[str]) -> Built:
    """`trainer` once its model has the LoRA modules: their fused forward (fused_lora), then the decoder layers
    compiled (compile_layers, last: the compiled graph contains the fused forwards); packed batches' boundaries
    from the host (async_inputs); metrics read when logged (lazy_metrics)."""
    from oasst_model.lora_fused import fuse_lora_forward

    fused = (fuse_lora_forward(trainer.model, seeded_dropout=cfg.seeded_lora_dropout, concat=cfg.concat_lora,
                               carved_dropout=cfg.carved_lora_dropout and cfg.compile_layers)
             if cfg.fused_lora else 0)
    compiled = 0
    if cfg.compile_layers:
        from oasst_model.compiled import compile_layers

        compiled = compile_layers(trainer.model)
    from oasst_model.attention import use_collated_boundaries

    use_collated_boundaries(trainer.model, False)  # a model another trainer switched: off unless asked again
    if cfg.async_inputs:  # before lazy_metrics, which counts tokens around the collator as it finds it
        from oasst_train.async_inputs import async_inputs

        async_inputs(trainer)
    if cfg.lazy_metrics:
        from oasst_train.lazy_metrics import lazy_metrics

        lazy_metrics(trainer)
    return Built(trainer, targets, fused, compiled)


def train(cfg: TrainConfig, built: Built, bar: Any, checkpoint: Path | None, *, has_eval: bool,
          finished: bool = False) -> None:
    """Run the optimizer steps (from `checkpoint` when resuming; `finished`: it is the run's last step, loaded with
    no step taken); SIGTERM/SIGINT save a checkpoint and stop with one error line; the last step is evaluated when
    the schedule did not."""
    import torch

    from oasst_train.callbacks import SaveOnSignal

    trainer = built.trainer
    stopper = SaveOnSignal()
    trainer.add_callback(bar)
    trainer.add_callback(stopper)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stopper.install()
    try:
        if checkpoint is not None and finished:
            # Stopped while saving its outputs after the last step: the last checkpoint is the result. Loaded as it
            # is (peft's load_adapter, the state it logged): transformers' train() would take one step more.
            from transformers import TrainerState

            trainer.model.load_adapter(str(checkpoint), adapter_name="default", is_trainable=True)
            trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        else:
            from oasst_train.async_inputs import resumed_copies_non_blocking

            with resumed_copies_non_blocking(trainer) if checkpoint else nullcontext():
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stopper.uninstall()
    state = trainer.state
    if stopper.received is not None:
        name = signal.Signals(stopper.received).name
        raise OasstError(f"stopped by {name} at step {state.global_step}; checkpoint saved in "
                         f"{Path(cfg.out) / CHECKPOINTS}; continue with the same command and --resume")
    evaluated_last = any("eval_loss" in e and e.get("step") == state.global_step for e in state.log_history)
    if has_eval and not evaluated_last:
        trainer.evaluate()


def summarize(cfg: TrainConfig, prepared: Prepared, built: Built, bar: Any, checkpoint: Path | None) -> dict:
    """What `train_summary.json` records: steps, losses, tokens/s, memory, 4-bit layers, the patches that ran."""
    from oasst_model import patches
    from oasst_model.lora_fused import carved_lora_modules, concat_lora_modules
    from oasst_model.spec import peak_memory_bytes
    from oasst_train.report import device_name, replica_checksums, versions

    trainer = built.trainer
    summary = _summary(cfg, trainer, bar, prepared.linear4bit, prepared.load_seconds, checkpoint)
    summary.update(steady_tokens_per_second=bar.steady_tokens_per_second,
                   # not `warmup_steps`: that is the learning-rate warm-up setting, recorded in train_config.yaml
                   steady_skipped_steps=bar.warmup_steps(),
                   step_seconds=[round(s, 4) for s in bar.step_seconds], step_tokens=list(bar.step_tokens),
                   steady_window=bar.steady_window(),
                   fused_attention_layers=prepared.fused_attention_layers, fused_lora_modules=built.fused_lora,
                   # True only where it replaced a dropout: fused modules and a dropout to replace (p 0 is Identity).
                   seeded_lora_dropout=bool(built.fused_lora and cfg.seeded_lora_dropout and cfg.lora_dropout > 0),
                   concat_lora_modules=concat_lora_modules(trainer.model),
                   carved_lora_modules=carved_lora_modules(trainer.model),
                   compiled_layers=built.compiled_layers, **_compile_stats(built))
    summary.update(peak_memory_bytes=peak_memory_bytes(), versions=versions(), device=device_name(),
                   replica_checksums=replica_checksums(trainer.model), patches=patches.report())
    return summary


def _compile_stats(built: Built) -> dict[str, int | None]:
    """compiled_graphs and compiled_graph_breaks of the compiled layers (None each: compile_layers was off)."""
    if not built.compiled_layers:
        return {"compiled_graphs": None, "compiled_graph_breaks": None}
    from oasst_model.compiled import compile_stats

    return compile_stats()


def _build_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, train_set: Any, eval_set: Any,
                   targets: list[str], fresh: bool = True) -> Any:
    """An SFTTrainer over pre-tokenized rows with a LoRA adapter on `targets`."""
    from trl import SFTConfig, SFTTrainer

    from oasst_train.arguments import trainer_config

    args = trainer_config(SFTConfig, cfg, has_eval=eval_set is not None, fresh=fresh, max_length=cfg.max_length,
                          packing=cfg.packing, packing_strategy="bfd")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer, peft_config=lora_config(cfg, targets))
    finish_trainer(trainer, cfg)
    return trainer


def lora_config(cfg: TrainConfig, targets: list[str]) -> Any:
    """The peft LoraConfig of a fresh adapter on `targets`."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def finish_trainer(trainer: Any, cfg: TrainConfig) -> None:
    """What every trl trainer of a run needs once built: no log printer, no trl card, LoRA weights in fp32 unless
    the run is bf16."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress bar shows the loss
    # trl 1.16 writes a card saying "fine-tuned version of [None]" into checkpoints/ at every save; each checkpoint
    # gets the run's own card instead (WriteOnSave).
    trainer.create_model_card = lambda *args, **kwargs: None
    if cfg.precision != "bf16":
        # trl 1.16 casts a quantized model's LoRA weights to bf16; fp16's gradient scaler then fails at the first
        # optimizer step ("_amp_foreach_non_finite_check_and_unscale_cuda not implemented for 'BFloat16'") and
        # fp32 training would silently run in bf16. Keep trainable weights in fp32 (what peft does unquantized).
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def _summary(cfg: TrainConfig, trainer: Any, bar: Any, linear4bit: int, load_seconds: float,
             checkpoint: Path | None) -> dict[str, Any]:
    """The figures `train_summary.json` records: a checkpoint card's (`card.progress_summary`: steps, tokens, first
    and last losses), and the run's own."""
    from oasst_train.card import progress_summary

    history = trainer.state.log_history
    world = trainer.args.world_size
    return {
        # num_input_tokens_seen is already summed over processes by transformers: no factor of world size.
        **progress_summary(history, trainer.state.global_step, trainer.state.num_input_tokens_seen),
        "real_tokens_per_second": bar.tokens_per_second,
        "train_seconds": bar.train_seconds,
        "load_seconds": load_seconds,
        "linear4bit_layers": linear4bit,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "target_modules": sorted(trainer.model.peft_config["default"].target_modules),
        "resumed_from": checkpoint.name if checkpoint else None,
        "world_size": world,
        "log_history": history,
    }
