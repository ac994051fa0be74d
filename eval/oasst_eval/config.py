"""`EvalConfig`: every setting of `oasst eval`, resolved once (defaults, then a YAML file, then flags).

Standard library only: the CLI builds its options from these fields before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oasst_model.attention import CUDNN_ATTENTION_HELP
from oasst_model.spec import (INT_LIMIT, LOAD_FIELDS, RENAMED_KEYS, as_bool, as_path, check_value, option_field,
                               take_renamed_keys)
from oasst_tools.conversation import FORMATS
from oasst_tools.errors import OasstError, shown, whole_number

def _f(default: Any, help: str, shown: str | None = None) -> Any:  # noqa: A002 - mirrors dataclasses.field
    """A dataclass field whose help text (and `shown`, the default as `--help` writes it) its option reuses."""
    return field(default=default, metadata={"help": help, "shown": shown})


def _load(name: str) -> Any:
    """A loading option of oasst_model.spec, defined there once; None here means "as the adapter was trained"
    (its train_config.yaml), else the option's own default."""
    return option_field(name, None)


@dataclass(frozen=True)
class EvalConfig:
    """What `oasst eval` scores, on which data, and how."""

    # What to score
    model: str = option_field("model")
    adapter: str | None = _f(None, "LoRA adapter folder written by `oasst train`; its base model loads as it was "
                                   "trained unless loading flags say otherwise.")
    compare_base: bool = _f(False, "Also score the base model without the adapter, on the same items, and show "
                                   "the difference.", "off")
    tasks: tuple[str, ...] = _f(("hellaswag",), "Comma-separated lm-eval task names; hellaswag, guanaco_test and "
                                                "guanaco_pairs run offline.", "hellaswag")

    # Data
    data_dir: str | None = _f(None, "Folder with one sub-folder of split files per task, e.g. "
                                    "DIR/hellaswag/validation.jsonl[.gz].", "$OASST_EVAL_DATA, else the fixture subset")
    data: str | None = _f(None, "Output folder of `oasst build` (its test.jsonl) for the guanaco_test task, or of "
                                "`oasst build --pairs` for guanaco_pairs.", "$OASST_EVAL_GUANACO")
    format: str | None = _f(None, "Conversation format guanaco_test and guanaco_pairs score: guanaco or chat-template "
                                  "(the tokenizer's); auto: chat-template when the tokenizer has one.",
                            "as the adapter was trained, else guanaco")

    # Scoring
    num_fewshot: int | None = _f(None, "Few-shot examples per item.", "the task's own (0 for hellaswag)")
    limit: int | None = _f(None, "Score only the first N items of each task (for quick checks).", "all items")
    batch_size: str = _f("default", "Rows per batch: a number, or auto (a token budget per batch measured from free "
                                    "GPU memory).", "auto on GPU, 8 on CPU")
    max_batch_size: int | None = _f(None, "Upper bound on rows per batch with auto.", "none: the token budget decides")
    max_batch_tokens: int = _f(16384, "Upper bound of the auto token budget (rows x padded length per batch).",
                               "16384")
    shared_context: bool = _f(True, "Score the choices of one context (a multiple-choice item) from one packed row "
                                    "that runs the context once; same log-likelihoods, fewer tokens.", "on")
    # Off by default: cuDNN builds a plan per new batch shape (30-150 ms on an H100), and eval batches seldom repeat
    # one (bench/sdpa_backends.py).
    cudnn_attention: bool = _f(False, CUDNN_ATTENTION_HELP, "off")
    merge_adapter: bool = _f(True, "Merge a 16/32-bit adapter into the weights before scoring (no cost per token); "
                                   "fold it in per forward on 4-bit. Off: peft's forward.", "on")

    # Model loading (defined once in oasst_model.spec.OPTIONS, shared with train, merge, generate and chat)
    load_in_4bit: bool | None = _load("load_in_4bit")
    quant_type: str | None = _load("quant_type")
    double_quant: bool | None = _load("double_quant")
    compute_dtype: str | None = _load("compute_dtype")
    attn_implementation: str | None = _load("attn_implementation")
    fused_attention: bool | None = _load("fused_attention")
    trust_remote_code: bool | None = _load("trust_remote_code")
    device: str | None = _f(None, "cuda, cuda:N or cpu.", "cuda when available, else cpu")

    # Output
    out: str = _f("out/eval", "Folder for results_<label>.json, eval_summary.json and eval.png.", "out/eval")
    overwrite: bool = _f(False, "Replace the results of an earlier eval in --out (without it, such an --out is "
                                "refused before scoring).", "off")

    # Not a setting: the keys whose value came from the --config file (no flag replaced it), for provenance.
    from_config: tuple[str, ...] = field(default=(), metadata={"help": "", "shown": None, "internal": True})

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (written to eval_summary.json)."""
        values = {name: getattr(self, name) for name in SETTINGS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def load_options(self) -> dict[str, Any]:
        """The loading options as given (None: not given)."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}


# The settings (flags, YAML keys, eval_summary.json fields): every field but the internal ones.
SETTINGS = tuple(f.name for f in dataclasses.fields(EvalConfig) if not f.metadata.get("internal"))


def help_for(name: str) -> str:
    """The `help` text of one field, reused by the Click option of the same name."""
    return next(f.metadata["help"] for f in dataclasses.fields(EvalConfig) if f.name == name)


def shown_for(name: str) -> str | None:
    """The default of one field as `--help` shows it (None: it has none)."""
    return next(f.metadata.get("shown") for f in dataclasses.fields(EvalConfig) if f.name == name)


def parse_tasks(value: str | list[str] | tuple[str, ...], where: str = "--tasks") -> tuple[str, ...]:
    """`hellaswag,arc_easy` (or a YAML list) -> ("hellaswag", "arc_easy"), in order, without repeats."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(t, str) for t in value):
        raise OasstError(f"{where}: tasks must be task names (text or a list of text), not {shown(value)}")
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not names:
        empty = f"{where} is empty" if where.startswith("--") else f"{where}: tasks is empty"
        raise OasstError(f"{empty}: name at least one task, e.g. --tasks hellaswag")
    return names


def load_config_file(path: Path, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Keys of a YAML config file, each checked against its setting's type; all unknown keys are reported in one
    error, and a bad value names the file and line; `origins` gets `PATH:LINE` of each key."""
    from oasst_tools.files import read_yaml_mapping, unknown_keys_error

    raw, where = read_yaml_mapping(path)
    known = set(SETTINGS)
    unknown = sorted(set(raw) - known - set(RENAMED_KEYS))
    if unknown:
        raise unknown_keys_error(path, unknown, known, "eval")
    take_renamed_keys(raw, where)
    if origins is not None:
        origins.update(where)
    return {key: parse_tasks(value, where[key]) if key == "tasks" else coerce(key, value, where[key])
            for key, value in raw.items()}


# Settings that are whole numbers, and their smallest allowed value; None is allowed where the default is None.
INTEGERS = {"num_fewshot": 0, "limit": 1, "max_batch_size": 1, "max_batch_tokens": 1}
BOOLEANS = ("compare_base", "merge_adapter", "shared_context", "cudnn_attention", "overwrite")
TEXTS = ("adapter", "data_dir", "data", "device", "out", "batch_size", "format")
# Settings that name files or folders (a leading `~` is expanded); `model` is a load setting, checked with train's.
PATH_FIELDS = ("adapter", "data_dir", "data", "out")


def coerce(name: str, value: Any, where: str) -> Any:
    """A config file value as its setting's type, or one error line naming where it was set."""
    default = next(f.default for f in dataclasses.fields(EvalConfig) if f.name == name)
    if value is None and default is None:
        return None
    if name in LOAD_FIELDS:
        return check_value(name, value, where)
    if name in INTEGERS:
        # bool is an int to Python; NaN and inf are floats no whole number equals.
        if isinstance(value, bool) or not isinstance(value, int):
            raise OasstError(f"{where}: {name} must be a whole number, not {shown(value)}")
        if value < INTEGERS[name]:
            raise OasstError(f"{where}: {name} must be at least {INTEGERS[name]}, not {value}")
        if value > INT_LIMIT:
            raise OasstError(f"{where}: {name} must be at most {INT_LIMIT:,}, not {value}")
        return value
    if name in BOOLEANS:
        flag = as_bool(value)
        if flag is None:
            raise OasstError(f"{where}: {name} must be true or false, not {shown(value)}")
        return flag
    if name == "batch_size" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `batch_size: 8` in YAML is a number
    if not isinstance(value, str):
        raise OasstError(f"{where}: {name} must be text, not {shown(value)}")
    if "\0" in value:
        raise OasstError(f"{where}: {name} contains a NUL character")
    if name == "format" and value not in FORMATS:
        raise OasstError(f"{where}: format must be one of {', '.join(FORMATS)}, not {shown(value)}")
    return as_path(value) if name in PATH_FIELDS else value


def resolve_config(file: Path | None, flags: dict[str, Any], notes: list[str] | None = None) -> EvalConfig:
    """Defaults, then the config file, then the flags that were given (None = not given). `notes` gets one line per
    flag that replaced a different value of the config file."""
    from oasst_tools.files import override_lines

    cfg = EvalConfig()
    where: dict[str, str] = {}
    from_file = load_config_file(file, where) if file is not None else {}
    cfg = dataclasses.replace(cfg, **from_file)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None},
                              from_config=tuple(k for k in from_file if flags.get(k) is None))
    if notes is not None:
        notes.extend(override_lines(from_file, where, flags))
    if not cfg.model and not cfg.adapter:
        raise OasstError("--model is required (a model folder, a Hub name or a .gguf file), or --adapter DIR of an "
                         "`oasst train` run, whose base it names")
    for name in ("model", *PATH_FIELDS):
        if "\0" in (getattr(cfg, name) or ""):
            raise OasstError(f"--{name.replace('_', '-')} contains a NUL character")
    if not cfg.out.strip():  # Path("") is the current folder: the results would land among the user's files
        origin = "--out" if flags.get("out") is not None else where.get("out", "--out")
        raise OasstError(f"{origin}: out is empty: give a folder")
    if cfg.compare_base and not cfg.adapter:
        raise OasstError("--compare-base needs --adapter: it compares the base model with base + adapter")
    if cfg.batch_size not in ("default", "auto") and not 0 < (whole_number(cfg.batch_size) or 0) <= INT_LIMIT:
        origin = "--batch-size" if flags.get("batch_size") is not None else where.get("batch_size", "--batch-size")
        origin = origin if origin.startswith("--") else f"{origin}: batch_size"
        raise OasstError(f"{origin} must be auto or a whole number from 1 to {INT_LIMIT:,}, not "
                         f"{shown(cfg.batch_size)}")
    return cfg
