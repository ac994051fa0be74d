"""`TrainConfig`: every knob of a QLoRA run, resolved once from defaults, a YAML recipe and command-line flags.

    cfg = resolve_config(Path("train/recipes/tiny-cpu.yaml"), {"max_steps": 20})

Standard library and PyYAML only: the CLI builds its flags from these fields without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from oasst_model.attention import CUDNN_ATTENTION_HELP
from oasst_model.spec import (AUTO, FROM_CONFIG, FROM_FLAG, INT_LIMIT, RENAMED_KEYS, DeviceProfile, as_bool, as_path,
                               auto_compute_dtype, flag, option_field, take_renamed_keys)
from oasst_tools.conversation import ASSISTANT, HUMAN
from oasst_tools.errors import OasstError, shown


# trl 1.16's DPO losses (DPOConfig.loss_type; trl keeps no list of them, tests/train/test_dpo.py compares this one
# with its documentation). exo_pair is left out: it needs label_smoothing > 0, which no flag sets.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                  "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses.field's vocabulary
    """A dataclass field whose help text is also its command-line flag's help."""
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """One QLoRA training run. Field order is the order of `--help` and of the saved `train_config.yaml`."""

    # What goes in and out (the loading options are defined once, in oasst_model.spec.OPTIONS)
    model: str = option_field("model")
    data: str = _f("", "Dataset: an `oasst build` folder (train.jsonl, test.jsonl; built --pairs for method dpo), a "
                       "datasets folder or hub id with a `text` or `messages` column.")
    out: str = _f("", "Output folder: the adapter, tokenizer, train_summary.json, loss.png, checkpoints/.")
    trust_remote_code: bool = option_field("trust_remote_code")
    attn_implementation: str = option_field("attn_implementation")
    fused_attention: bool = option_field("fused_attention")

    # Method: supervised fine-tuning on conversations, or DPO on preference pairs (oasst_train.dpo)
    method: Literal["sft", "dpo"] = _f("sft", "sft: learn the replies of conversation rows; dpo: prefer the chosen "
                                              "reply of each preference pair (an `oasst build --pairs` folder) over "
                                              "the rejected one.")
    beta: float = _f(0.1, "DPO: how far the adapter may move from the reference model (higher: less far).")
    loss_type: Literal[DPO_LOSS_TYPES] = _f(  # type: ignore[valid-type]
        "sigmoid", "DPO loss as trl 1.16 names it (sigmoid: the DPO paper's).")
    init_adapter: str = _f("", "DPO: start from this SFT adapter folder (trained on, and a frozen copy of it is the "
                               "reference); empty: a fresh adapter, with the base model as the reference.")

    # 4-bit quantization (QLoRA)
    load_in_4bit: bool = option_field("load_in_4bit")
    quant_type: Literal["nf4", "fp4"] = option_field("quant_type")
    double_quant: bool = option_field("double_quant")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option_field("compute_dtype")

    # LoRA
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = _f((), "Layers that get LoRA (comma-separated); empty: every linear layer "
                                             "but the output head.")

    # Data
    format: Literal["auto", "guanaco", "chat-template"] = _f(  # noqa: A003 - the --format vocabulary
        "auto", f"Conversation format: guanaco (`{HUMAN}...{ASSISTANT}...`) or chat-template (the tokenizer's); "
                "auto: chat-template when the tokenizer has one.")
    max_length: int = _f(512, "Tokens per example; longer ones are cut (and then end without EOS).")
    loss_on: Literal["assistant", "all"] = _f(
        "assistant", "Loss on assistant replies only (human turns masked) or on the whole conversation.")
    packing: bool = _f(False, "Pack examples into max_length rows (position ids reset per example; needs "
                              "transformers >= 5.24 for Falcon).")
    eval_rows: int = _f(0, "Evaluate on at most this many test rows (0: all).")

    # Optimization
    batch_size: int | Literal["auto"] = _f(AUTO, "Examples per device per forward pass; auto: 4 on GPU, 16 on CPU "
                                                 "(one pass per step: no accelerator memory to save).")
    grad_accum: int | Literal["auto"] = _f(AUTO, "Forward passes per optimizer step; auto: 4 on GPU, 1 on CPU.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("constant", "Learning-rate schedule: constant, cosine, linear, constant_with_warmup.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (QLoRA used 0.3).")
    optim: str = _f("adamw_torch", "Optimizer name as transformers knows it (adamw_torch, adamw_torch_fused, "
                                   "paged_adamw_32bit, ...).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1: run `epochs` epochs.")
    epochs: float = _f(1.0, "Epochs when max_steps is -1.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        AUTO, "Mixed precision of the training step; auto: fp32 on CPU, bf16 on GPU (fp16 where the GPU lacks bf16).")
    gradient_checkpointing: bool | Literal["auto"] = _f(
        AUTO, "Recompute activations in backward: less memory, about 30% slower; auto: on for GPU, off for CPU.")
    cast_norm_outputs: bool = _f(True, "Under bf16/fp16 autocast, hand LayerNorm outputs on in that dtype once "
                                       "instead of fp32 that each next layer casts again.")
    fused_lora: bool = _f(True, "Add each LoRA update inside its matmul (one addmm) instead of peft's clone, scale "
                                "and add. Off: peft's own LoRA forward.")
    seeded_lora_dropout: bool = _f(False, "With fused_lora, LoRA dropout keeps only its input and a seed for "
                                          "backward: less memory, a little slower, other draws than peft's. Not in "
                                          "compiled layers.")
    concat_lora: bool = _f(False, "With fused_lora, 4-bit bases: base product and LoRA update as one GEMM over "
                                  "[x | lora_A(dropout(x))] and [W | s B], W kept for backward (+2 bytes/weight).")
    carved_lora_dropout: bool = _f(False, "With fused_lora and compile_layers: LoRA dropout masks from a quarter of "
                                          "the random draws (drop probability within 2^-16 of lora_dropout).")
    compile_layers: bool = _f(False, "torch.compile each decoder layer (one compilation shared by all): fuses the "
                                     "element-wise work between matmuls; the first steps compile.")
    lazy_metrics: bool = _f(False, "Keep trl's per-step metrics on the GPU until logged and count tokens at collate: "
                                   "no host wait mid-step. A NaN loss is logged, not hidden.")
    async_inputs: bool = _f(False, "Copy batches to the GPU without a host wait (pinned, non-blocking) and give "
                                   "packed rows' attention their boundaries from the host: no wait between steps.")
    # On by default here, off in eval: a training run repeats its batch shapes (pad_to_multiple_of, group_by_length),
    # so cuDNN's plan per new shape is paid a few dozen times while its kernels run every step
    # (bench/sdpa_backends.py; eval's batches seldom repeat a shape).
    cudnn_attention: bool = _f(True, CUDNN_ATTENTION_HELP)
    activation_offloading: bool = _f(False, "Keep the activations saved for backward in CPU memory (trl's "
                                            "offloading): less GPU memory, some transfer time.")
    group_by_length: bool = _f(False, "Batch examples of similar length together (less padding).")
    pad_to_multiple_of: int = _f(0, "Pad batch lengths to a multiple of this (0: off); 64 lets GPU attention "
                                    "kernels be reused across lengths.")
    seed: int = _f(42, "Seed for initialization, dropout and data order.")

    # Checkpoints and logging
    save_steps: int = _f(100, "Save a resumable checkpoint every N optimizer steps.")
    save_total_limit: int = _f(2, "Checkpoints kept (oldest deleted first); 0 keeps every one.")
    eval_steps: int = _f(0, "Evaluate every N steps (0: at the start and the end only).")
    logging_steps: int = _f(10, "Log the training loss every N steps.")
    report_to: Literal["none", "tensorboard", "wandb"] = _f("none", "Where to send metrics besides the "
                                                                    "progress bar and loss.png.")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainConfig)}
FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}
REQUIRED = ("model", "data", "out")
# Fields whose default, `auto`, is decided by the device once the run starts (resolve_auto).
AUTO_FIELDS = ("precision", "compute_dtype", "gradient_checkpointing", "batch_size", "grad_accum")
# (GPU, CPU) values of the batch shape left to the device: 16 rows per optimizer step on both. A CPU has no
# accelerator memory to save, and each extra forward pass there costs its fixed work again (measured: 5 no-recipe
# steps of stories260K 5.5 s in 4 passes of 4 rows, 4.8 s in one of 16; bench/train_device_defaults.py).
AUTO_BATCH = {"batch_size": (4, 16), "grad_accum": (4, 1)}
# Settings that name files or folders (a leading `~` is expanded).
PATH_FIELDS = ("model", "data", "out", "init_adapter")
# The largest learning_rate and weight_decay taken (see validate).
STEP_SCALE_LIMIT = 1000
PRECISION_OF = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def load_yaml(path: Path, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """The mapping in a YAML recipe, with every unknown key reported in one error; `origins` gets `PATH:LINE`
    of each key, for messages about its value."""
    from oasst_tools.files import read_yaml_mapping, unknown_keys_error

    raw, where = read_yaml_mapping(path)
    unknown = sorted(k for k in raw if k not in FIELDS and k not in RENAMED_KEYS)
    if unknown:
        raise unknown_keys_error(path, unknown, FIELDS, "train")
    take_renamed_keys(raw, where)
    if origins is not None:
        origins.update(where)
    return {k: coerce(k, v, where[k]) for k, v in raw.items()}


def flag_name(name: str) -> str:
    """The command-line flag of a field (`--learning-rate` for learning_rate), for messages about a value given
    there."""
    return flag(name)


def coerce(name: str, value: Any, origin: str) -> Any:
    """`value` converted to the type of field `name`, or a one-line error naming where it came from."""
    kind = field_type(name)
    try:
        if kind is bool:
            if name in AUTO_FIELDS and value == AUTO:
                return value
            flag = as_bool(value)
            if flag is None:
                raise ValueError
            return flag
        if kind is tuple:
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ValueError
            items = value.split(",") if isinstance(value, str) else list(value or ())
            if not all(isinstance(item, str) for item in items):
                raise ValueError
            return tuple(item.strip() for item in items if item.strip())
        if kind is int:
            if name in AUTO_FIELDS and value == AUTO:
                return value
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        choices = field_choices(name)
        if choices and value not in choices:
            raise OasstError(f"{origin}: {name} must be one of {', '.join(choices)}, not {shown(value)}")
        if isinstance(value, (list, dict, tuple, set)):
            raise ValueError  # str() would turn a YAML list into a "model name"
        if value is None:  # `init_adapter:` with nothing after it: the setting's default (required ones: missing)
            return FIELD_DEFAULTS[name]
        return as_path(str(value)) if name in PATH_FIELDS else str(value)
    except (TypeError, ValueError, OverflowError):
        # The words eval's and the load settings' messages use for the same types.
        kind_name = {tuple: "a list of names", int: "a whole number", float: "a number", str: "text",
                     bool: "true or false"}.get(kind, kind.__name__)
        raise OasstError(f"{origin}: {name} must be {kind_name}, not {shown(value)}") from None


def resolve_config(config_file: Path | None, overrides: dict[str, Any], required: tuple[str, ...] = REQUIRED,
                   notes: list[str] | None = None, origins: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the YAML recipe, then flags (only those given); checked once, then frozen. `notes` gets one
    line per flag that replaced a different value of the recipe; `origins` where each setting given was set
    (`recipe.yaml:7`, `--lr`)."""
    from oasst_tools.files import override_lines

    origins = {} if origins is None else origins
    values = load_yaml(config_file, origins) if config_file is not None else {}
    from_file, where = dict(values), dict(origins)
    flags = {}
    for name, value in overrides.items():
        if value is not None:
            origins[name] = flag_name(name)
            values[name] = flags[name] = coerce(name, value, origins[name])
    cfg = replace(TrainConfig(), **values)
    validate(cfg, origins, required)
    warn_ignored(cfg, origins)
    if notes is not None:
        notes.extend(override_lines(from_file, where, flags))
    return cfg


def warn_ignored(cfg: TrainConfig, origins: dict[str, str]) -> None:
    """One warning line per setting given (in the recipe or as a flag) that the chosen method does not use, unless
    it is given at its default (a run's own train_config.yaml records every setting, and reruns without a word)."""
    from oasst_train.report import warn

    unused = ("beta", "loss_type") if cfg.method == "sft" else ("loss_on",)
    defaults = TrainConfig()
    for name in unused:
        if name in origins and getattr(cfg, name) != getattr(defaults, name):
            why = "DPO scores the replies of each pair only" if name == "loss_on" else "it is a DPO setting"
            warn(f"{origins[name]}: {name} is ignored with method {cfg.method} ({why})")
    # Refinements of fused_lora's forward: asked for without it (or without a 4-bit base), they change nothing.
    needs = {"seeded_lora_dropout": ("fused_lora",), "concat_lora": ("fused_lora", "load_in_4bit"),
             "carved_lora_dropout": ("fused_lora", "compile_layers")}
    for name, requirements in needs.items():
        missing = [r for r in requirements if not getattr(cfg, r)]
        if name in origins and getattr(cfg, name) and missing:
            warn(f"{origins[name]}: {name} is ignored without {' and '.join(missing)}")


def validate(cfg: TrainConfig, origins: dict[str, str] | None = None, required: tuple[str, ...] = REQUIRED) -> None:
    """One clear line for the first value that cannot work, starting with where it was set (`recipe.yaml:7: `,
    `--lr: `) when `origins` knows."""
    def fail(name: str, message: str) -> OasstError:
        where = (origins or {}).get(name)
        return OasstError(f"{where}: {message}" if where else message)

    missing = [name for name in required if not getattr(cfg, name)]
    if missing:
        raise OasstError(f"missing {', '.join(missing)}: give --{' --'.join(missing)} or set them in --config")
    # NaN compares false with everything, so every range check below would let it through: finite first.
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(f.name, f"{f.name} must be a finite number, not {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT and f.name != "seed":
            raise fail(f.name, f"{f.name} must be at most {INT_LIMIT:,}, not {value}")
    if not 0 <= cfg.seed < 2**32:  # numpy's and torch's seeds: unsigned 32-bit
        raise fail("seed", f"seed must be between 0 and {2**32 - 1}, not {cfg.seed}")
    positive = ("lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum", "save_steps", "logging_steps")
    for name in positive:
        if getattr(cfg, name) != AUTO and getattr(cfg, name) < 1:
            raise fail(name, f"{name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("eval_steps", "eval_rows", "warmup_steps", "pad_to_multiple_of", "save_total_limit",
                 "weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise fail(name, f"{name} must not be negative, not {getattr(cfg, name)}")
    if cfg.pad_to_multiple_of > cfg.max_length:  # every batch would be padded past the longest row allowed
        raise fail("pad_to_multiple_of", f"pad_to_multiple_of must be at most max_length ({cfg.max_length}), not "
                                         f"{cfg.pad_to_multiple_of}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise fail("max_steps", f"max_steps must be -1 (use epochs) or at least 1, not {cfg.max_steps}")
    if cfg.max_steps == -1 and cfg.epochs <= 0:
        raise fail("epochs", f"epochs must be positive, not {cfg.epochs}")
    if cfg.epochs > INT_LIMIT:  # the steps it comes to would outrun every counter and progress bar downstream
        raise fail("epochs", f"epochs must be at most {INT_LIMIT:,}, not {cfg.epochs}")
    if not 0 <= cfg.lora_dropout < 1:
        raise fail("lora_dropout", f"lora_dropout must be in [0, 1), not {cfg.lora_dropout}")
    if cfg.learning_rate <= 0:
        raise fail("learning_rate", f"learning_rate must be positive, not {cfg.learning_rate}")
    for name in ("learning_rate", "weight_decay"):
        # The optimizers' steps are float32 scalars: from ~1e37 torch refuses them mid-run; no update means
        # anything long before that.
        if getattr(cfg, name) > STEP_SCALE_LIMIT:
            raise fail(name, f"{name} must be at most {STEP_SCALE_LIMIT:,}, not {getattr(cfg, name)}")
    if cfg.beta <= 0:
        raise fail("beta", f"beta must be positive, not {cfg.beta}")
    if cfg.method == "sft" and cfg.init_adapter:
        raise fail("init_adapter", "init_adapter is for method dpo (the SFT adapter DPO starts from); with method "
                                   "sft, leave it empty")
    if cfg.method == "dpo" and cfg.packing:
        raise fail("packing", "packing does not apply to method dpo (each pair is scored as its own two rows); "
                              "set packing false")
    if cfg.method == "dpo" and cfg.group_by_length:
        # transformers' length-grouped sampler reads an input_ids column; trl's pair rows have prompt_ids etc.
        raise fail("group_by_length", "group_by_length does not apply to method dpo (its sampler needs "
                                      "conversation rows); set group_by_length false")
    if cfg.packing and cfg.group_by_length:
        # trl's packed rows all come near max_length and its padding-free collator makes each batch one row: the
        # length-grouped sampler would only reorder the data.
        raise fail("group_by_length", "group_by_length does not apply with packing (packed rows are all near "
                                      "max_length); set group_by_length false")
    for name in PATH_FIELDS:
        if "\0" in getattr(cfg, name):
            raise fail(name, f"{name} {shown(getattr(cfg, name))} contains a NUL character")
    if cfg.precision == "fp16" and cfg.compute_dtype == "bfloat16":  # `auto` ones are checked once resolved
        raise OasstError("precision fp16 with compute_dtype bfloat16 mixes two 16-bit formats; "
                         "use precision bf16, or compute_dtype float16")


def resolve_auto(cfg: TrainConfig, profile: DeviceProfile, saved: dict[str, Any] | None = None,
                 origins: Mapping[str, str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """`cfg` with every `auto` field made concrete, and the choice as train_summary.json records it: `from` is
    `flag` or `config` for a value the user gave (`origins`, as resolve_config fills it), `set` for one a library
    caller put in `cfg`, `resumed run` or `auto (DEVICE)`.

    A resumed run keeps the values it started with (`saved`, its train_config.yaml). Otherwise precision and
    compute_dtype follow each other when one is set, and the device when neither is: fp32 on CPU (bf16 matmuls are
    emulated there and slower), bf16 on GPUs that have it, fp16 (with LoRA weights kept in fp32) on those that do
    not. Gradient checkpointing is on for GPUs (memory) and off for CPUs (nothing to save, a third more work).
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {name: given_from((origins or {}).get(name)) for name in AUTO_FIELDS
                              if getattr(cfg, name) != AUTO}
    for name in AUTO_FIELDS:
        if getattr(cfg, name) == AUTO and saved is not None and saved.get(name) not in (None, AUTO):
            values[name] = coerce(name, saved[name], f"the resumed run's {name}")
            origin[name] = "resumed run"
    precision = values.get("precision", cfg.precision)
    compute = values.get("compute_dtype", cfg.compute_dtype)
    if precision == AUTO and compute == AUTO:
        compute = auto_compute_dtype(profile)
        precision = PRECISION_OF[compute]
        origin["precision"] = origin["compute_dtype"] = f"auto ({profile.kind})"
    elif precision == AUTO:
        precision = PRECISION_OF[compute]
        origin["precision"] = "auto (follows compute_dtype)"
    elif compute == AUTO:
        compute = {v: k for k, v in PRECISION_OF.items()}[precision]
        origin["compute_dtype"] = "auto (follows precision)"
    checkpointing = values.get("gradient_checkpointing", cfg.gradient_checkpointing)
    if checkpointing == AUTO:
        checkpointing = profile.kind != "cpu"
        origin["gradient_checkpointing"] = f"auto ({profile.kind})"
    shape: dict[str, int] = {}
    for name, (gpu, cpu) in AUTO_BATCH.items():
        shape[name] = values.get(name, getattr(cfg, name))
        if shape[name] == AUTO:
            shape[name] = cpu if profile.kind == "cpu" else gpu
            origin[name] = f"auto ({profile.kind})"
    resolved = replace(cfg, precision=precision, compute_dtype=compute, gradient_checkpointing=checkpointing,
                       **shape)
    choice: dict[str, Any] = {"device": profile.words(), "bf16_supported": profile.bf16}
    for name in AUTO_FIELDS:
        choice[name] = {"value": getattr(resolved, name), "from": origin[name]}
    # fp16's loss scaling needs fp32 master weights: the trainer keeps the trainable LoRA weights in fp32.
    choice["lora_weights_fp32"] = precision != "bf16"
    return resolved, choice


def given_from(where: str | None) -> str:
    """eval_summary's words for where a given value came from: a flag (`--batch-size`), the recipe (`r.yaml:7`)."""
    if where is None:
        return "set"
    return FROM_FLAG if where.startswith("--") else FROM_CONFIG


def device_line(choice: dict[str, Any]) -> str | None:
    """`device: cpu -> precision fp32, compute_dtype float32, gradient_checkpointing off` for the values the device
    decided (None when the recipe and flags set them all)."""
    decided = [name for name in AUTO_FIELDS if choice[name]["from"].startswith("auto")]
    if not decided:
        return None

    def value(name: str) -> str:
        v = choice[name]["value"]
        return ("on" if v else "off") if isinstance(v, bool) else str(v)

    line = f"device: {choice['device']} -> " + ", ".join(f"{name} {value(name)}" for name in decided)
    if choice["precision"]["value"] == "fp16":
        line += " (LoRA weights kept in fp32 for fp16's loss scaling)"
    return line


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML-able values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def field_type(name: str) -> type:
    """The runtime type of a field: bool, int, float, tuple or str (Literals count as str)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    if origin in (tuple, typing.Tuple):  # noqa: UP006 - get_origin returns either spelling
        return tuple
    if origin in (typing.Union, types.UnionType) and bool in typing.get_args(hint):
        return bool  # `bool | Literal["auto"]`: a switch that may be left to the device
    if origin in (typing.Union, types.UnionType) and int in typing.get_args(hint):
        return int  # `int | Literal["auto"]`: a number that may be left to the device
    if origin is Literal or origin in (typing.Union, types.UnionType):
        return str
    return hint


def field_choices(name: str) -> tuple[str, ...]:
    """The allowed values of a Literal field (empty for free-form fields)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
