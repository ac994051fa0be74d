"""`ModelSpec`: how a base model (+ LoRA adapter) is loaded, one description shared by train, merge, generate, chat
and eval, and `load(spec)`, the one function that loads it.

    spec = ModelSpec.from_adapter("runs/tiny")             # the base as training loaded it (4-bit stays 4-bit)
    spec = ModelSpec.from_adapter("runs/tiny", compute_dtype="float32")   # a flag on top of the record
    model, tokenizer = load(spec)

Each loading option is defined once, in OPTIONS (name, default, one-line help): TrainConfig and EvalConfig take their
fields from it and every command gets a flag of the same name (oasst_model.flags). `auto` values are resolved per
device (`device_profile`, `auto_compute_dtype`). Standard library only at import: the CLIs build their flags from
this module before torch is imported.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError, shown

AUTO = "auto"
DTYPES = ("bfloat16", "float16", "float32")
# What `oasst train` writes beside the adapter: the resolved TrainConfig, which records how the base was loaded.
RECORD_NAME = "train_config.yaml"
# Where a run keeps its checkpoints (`OUT/checkpoints/checkpoint-N`), each with its own copy of RECORD_NAME.
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Option:
    """One setting's single definition: its name (field and `--flag`), default, help and allowed values."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    # Former flag spellings, still accepted but hidden from --help (one release).
    aliases: tuple[str, ...] = ()


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("model", "", "Base model: a local folder, a hub id, or a .gguf file."),
    Option("load_in_4bit", True, "Quantize the base model's linear layers to 4 bits with bitsandbytes (QLoRA).",
           aliases=("--4bit/--no-4bit",)),
    Option("quant_type", "nf4", "4-bit data type: nf4 (QLoRA) or fp4.", choices=("nf4", "fp4")),
    Option("double_quant", True, "Quantize the 4-bit quantization constants too (QLoRA's double quantization)."),
    Option("compute_dtype", AUTO, "dtype of the matmuls and unquantized layers; auto: float32 on CPU, bfloat16 on "
                                  "GPU (float16 where the GPU lacks bf16).", choices=(AUTO, *DTYPES),
           aliases=("--dtype",)),
    Option("attn_implementation", "sdpa", "Attention kernel: sdpa, eager, flash_attention_2."),
    Option("fused_attention", True, "Falcon with sdpa: run fused attention kernels (multi-query keys expanded). "
                                    "Off: transformers' own attention."),
    Option("trust_remote_code", False, "Run the model repository's own Python code (off unless you trust it)."),
)}
LOAD_FIELDS = tuple(OPTIONS)
BOOL_FIELDS = tuple(name for name, o in OPTIONS.items() if isinstance(o.default, bool))
# Where a value came from, as eval_summary.json and the results table say it.
FROM_RECORD, FROM_ADAPTER_CONFIG, FROM_FLAG, FROM_DEFAULT = "adapter record", "adapter_config.json", "flag", "default"
FROM_CONFIG = "config"  # a --config YAML file


def option_field(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field for loading option `name`: its default (unless a command overrides it) and its help."""
    option = OPTIONS[name]
    return field(default=option.default if default is dataclasses.MISSING else default,
                 metadata={"help": option.help})


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides how a base model (+ adapter) is loaded."""

    model: str = OPTIONS["model"].default
    load_in_4bit: bool = OPTIONS["load_in_4bit"].default
    quant_type: str = OPTIONS["quant_type"].default
    double_quant: bool = OPTIONS["double_quant"].default
    compute_dtype: str = OPTIONS["compute_dtype"].default
    attn_implementation: str = OPTIONS["attn_implementation"].default
    fused_attention: bool = OPTIONS["fused_attention"].default
    trust_remote_code: bool = OPTIONS["trust_remote_code"].default
    adapter: str | None = None
    # A folder whose tokenizer replaces the base model's: the adapter's, with the pad token training chose.
    tokenizer: str | None = None
    # Field name -> where its value came from (FROM_*); not part of the spec's identity.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_adapter(cls, adapter: str | Path, *, origins: Mapping[str, str] | None = None,
                     **overrides: Any) -> ModelSpec:
        """The spec training recorded in `adapter` (train_config.yaml; else adapter_config.json's base model, not
        quantized), with `overrides` (loading options; None = not given) on top; `origins` says where an override
        came from when not from a flag (FROM_CONFIG).

        The adapter is checked (config and weights) before anything else; a damaged record is one error line
        naming the file and line.
        """
        from oasst_model.load import read_adapter_config
        from oasst_tools.files import read_json_object, read_yaml_mapping

        unknown = sorted(set(overrides) - set(LOAD_FIELDS))
        if unknown:
            raise TypeError(f"not loading options: {', '.join(unknown)}")
        folder = Path(adapter)
        adapter_config = read_adapter_config(folder)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        record = folder / RECORD_NAME
        run_record = folder.parent.parent / RECORD_NAME
        if not record.exists() and folder.parent.name == CHECKPOINTS and run_record.is_file():
            # A checkpoint whose run was killed after transformers saved it and before its copy of the record was
            # written: the run's own record says the same.
            record = run_record
        if record.exists():
            saved, where = read_yaml_mapping(record, "training config", hint=" (it records how the base model was "
                                             "loaded; restore it, or delete it and pass --model)")
            for name in LOAD_FIELDS:
                if name in saved:
                    values[name] = check_value(name, saved[name], where[name])
                    sources[name] = FROM_RECORD
        if not values.get("model"):
            base = adapter_config.get("base_model_name_or_path")
            if isinstance(base, str) and base:
                values["model"], sources["model"] = base, FROM_ADAPTER_CONFIG
        if "load_in_4bit" not in values:
            # Nothing says the base was quantized: load it as published.
            values["load_in_4bit"], sources["load_in_4bit"] = False, FROM_DEFAULT
        for name, value in overrides.items():
            if value is not None:
                values[name] = check_value(name, value, flag(name))
                sources[name] = (origins or {}).get(name, FROM_FLAG)
        if not values.get("model"):
            raise OasstError(f"{folder} does not name its base model; pass --model")
        tokenizer = None
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = str(folder)
            for name in ("tokenizer_config.json", "tokenizer.json"):  # damaged: named now, not after the model loads
                if (folder / name).is_file():
                    read_json_object(folder / name, "tokenizer file")
        for name in LOAD_FIELDS:
            sources.setdefault(name, FROM_DEFAULT)
        return cls(**values, adapter=str(folder), tokenizer=tokenizer, sources=sources)

    @classmethod
    def from_options(cls, values: Mapping[str, Any], *, adapter: str | None = None,
                     origins: Mapping[str, str] | None = None, **defaults: Any) -> ModelSpec:
        """A spec from loading options given as flags (None = not given; `origins` names another source, e.g.
        FROM_CONFIG); `defaults` replace OPTIONS' defaults."""
        chosen: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in LOAD_FIELDS:
            if values.get(name) is not None:
                chosen[name] = check_value(name, values[name], flag(name))
                sources[name] = (origins or {}).get(name, FROM_FLAG)
            else:
                chosen[name] = defaults.get(name, OPTIONS[name].default)
                sources[name] = FROM_DEFAULT
        return cls(**chosen, adapter=adapter, sources=sources)

    def resolved(self, profile: DeviceProfile) -> ModelSpec:
        """This spec with `compute_dtype: auto` made concrete for `profile`'s device."""
        if self.compute_dtype != AUTO:
            return self
        sources = dict(self.sources)
        sources["compute_dtype"] = f"auto ({profile.kind})"
        return dataclasses.replace(self, compute_dtype=auto_compute_dtype(profile), sources=sources)

    def check_model(self) -> None:
        """`locate.check_source(self.model)`; when an adapter's record or adapter_config.json named the model, the
        error line names that file too (the user typed no model: a moved base is found there)."""
        from oasst_model.locate import check_source

        try:
            check_source(self.model)
        except OasstError as exc:
            source = self.sources.get("model")
            if self.adapter is None or source not in (FROM_RECORD, FROM_ADAPTER_CONFIG):
                raise
            record = Path(self.adapter) / (RECORD_NAME if source == FROM_RECORD else "adapter_config.json")
            raise OasstError(f"{record}: {exc}; pass --model to load another base") from None

    def describe(self) -> dict[str, dict[str, Any]]:
        """How the base is loaded, each value with where it came from (eval_summary.json's `base_loaded`)."""
        return {name: {"value": getattr(self, name), "from": self.sources.get(name, FROM_DEFAULT)}
                for name in ("model", "load_in_4bit", "quant_type", "double_quant", "compute_dtype")}


# Config keys renamed in a release: the old key is read, with a warning, until the next one (`dtype` was eval's
# name for what every command calls compute_dtype; the hidden --dtype flag is its flag).
RENAMED_KEYS = {"dtype": "compute_dtype"}


def take_renamed_keys(raw: dict[str, Any], where: dict[str, str]) -> None:
    """Rename old config keys in `raw` (and their `PATH:LINE` in `where`) to their new names, one warning each;
    one error line when the new name is set too."""
    import sys

    for old, new in RENAMED_KEYS.items():
        if old in raw:
            if new in raw:
                raise OasstError(f"{where[old]}: `{old}` is the old name of `{new}`, which is set too; keep `{new}`")
            sys.stderr.write(f"warning: {where[old]}: `{old}` is now `{new}`; rename it (the old name is read "
                             "until the next release)\n")
            raw[new] = raw.pop(old)
            where[new] = where[old]


def flag(name: str) -> str:
    """The command-line flag of a setting: `--load-in-4bit` for load_in_4bit."""
    return f"--{name.replace('_', '-')}"


BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def as_bool(value: Any) -> bool | None:
    """A config value as a boolean: YAML's true/false, or the words true/yes/1, false/no/0 as text (a quoted
    "yes"); None for anything else. One rule for every command's config file."""
    if isinstance(value, bool):
        return value
    return BOOL_WORDS.get(value.lower()) if isinstance(value, str) else None


# The largest whole number a setting takes: sizes, steps and counts beyond it overflow the libraries' 32-bit fields
# (or Python's own sys.maxsize bounds), with a traceback.
INT_LIMIT = 2**31 - 1


def as_path(value: str) -> str:
    """A path setting as the user meant it: `~` and `~user` at its start expanded, as a shell would have done for
    a flag (a config file's value reaches us unexpanded, and some libraries expand it themselves: two folders)."""
    return os.path.expanduser(value) if value.startswith("~") else value


def check_value(name: str, value: Any, where: str) -> Any:
    """`value` if it suits loading option `name`, else one error line starting with `where` (PATH:LINE or a flag)."""
    option = OPTIONS[name]
    if isinstance(option.default, bool):
        flag = as_bool(value)
        if flag is None:
            raise OasstError(f"{where}: {name} must be true or false, not {shown(value)}")
        return flag
    if not isinstance(value, str):
        raise OasstError(f"{where}: {name} must be text, not {shown(value)}")
    if "\0" in value:
        raise OasstError(f"{where}: {name} contains a NUL character")
    if option.choices and value not in option.choices:
        raise OasstError(f"{where}: {name} must be one of {', '.join(option.choices)}, not {shown(value)}")
    return as_path(value) if name == "model" else value


def recorded_format(adapter: str | Path) -> str:
    """The conversation format `oasst train` recorded in the adapter's train_config.yaml; guanaco for adapters
    trained before it was recorded (Guanaco was the only format then) or without a record."""
    from oasst_tools.conversation import FORMATS
    from oasst_tools.files import read_yaml_mapping

    record = Path(adapter) / RECORD_NAME
    if not record.is_file():
        return "guanaco"
    saved, where = read_yaml_mapping(record, "training config")
    value = saved.get("format", "guanaco")
    if value not in FORMATS:
        raise OasstError(f"{where['format']}: format must be one of {', '.join(FORMATS)}, not {shown(value)}")
    return value


@dataclass(frozen=True)
class DeviceProfile:
    """What `auto` settings depend on: CPU or CUDA, the device's name, native bf16 support."""

    kind: str  # "cpu" or "cuda"
    name: str
    bf16: bool

    def words(self) -> str:
        """`cpu`, `cuda (NVIDIA H100)` or `cuda (Tesla T4, no bf16)`, for the line that reports the choice."""
        if self.kind == "cpu":
            return "cpu"
        return f"cuda ({self.name}{'' if self.bf16 else ', no bf16'})"


def device_profile(device: str | None = None) -> DeviceProfile:
    """The device a run uses (`device`, else this process's GPU when there is one, else the CPU)."""
    import torch

    if device is None:
        device = default_device()
    if not device.startswith("cuda"):
        return DeviceProfile("cpu", platform.machine() or "cpu", False)
    index = torch.device(device).index or 0
    try:
        # Emulated bf16 (pre-Ampere GPUs) counts as none: it runs, but far slower than fp16.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and answered for native support only
        native = torch.cuda.is_bf16_supported()
    return DeviceProfile("cuda", torch.cuda.get_device_name(index), bool(native))


def peak_memory_bytes(device: str | None = None) -> int:
    """Peak memory torch allocated on the CUDA `device` (default: the current one), or this process's peak resident
    memory where the work ran on the CPU: the `peak_memory_bytes` that train and eval summaries record."""
    import torch

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        return int(torch.cuda.max_memory_allocated(torch.device(device) if device else None))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def default_device() -> str:
    """`cuda:LOCAL_RANK` when torch sees a GPU (one per process under accelerate/torchrun), else `cpu`."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def auto_compute_dtype(profile: DeviceProfile) -> str:
    """float32 on CPU (bf16 matmuls are slower there), bfloat16 on GPUs that have it, else float16."""
    if profile.kind == "cpu":
        return "float32"
    return "bfloat16" if profile.bf16 else "float16"


def load(spec: ModelSpec, *, device: str | None = None) -> tuple[Any, Any]:
    """The model (base + adapter when `spec` names one) and tokenizer `spec` describes, on `device` (default: this
    process's GPU, else the CPU). Train, merge, generate, chat and eval all load through here."""
    import torch

    from oasst_model.load import load_model

    device = device or default_device()
    spec = spec.resolved(device_profile(device))
    on_gpu = device.startswith("cuda")
    model, tokenizer = load_model(
        spec.model, load_in_4bit=spec.load_in_4bit, compute_dtype=spec.compute_dtype, quant_type=spec.quant_type,
        double_quant=spec.double_quant, device_map={"": device} if on_gpu else None,
        attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code,
        fused_attention=spec.fused_attention,
    )
    if not spec.load_in_4bit and next(model.parameters()).device.type != torch.device(device).type:
        model = model.to(device)
    if spec.tokenizer:
        tokenizer = _saved_tokenizer(Path(spec.tokenizer))
    if spec.adapter:
        model = _attach(model, spec)
    return model, tokenizer


def _saved_tokenizer(folder: Path) -> Any:
    """The tokenizer saved beside an adapter (it carries the pad token training chose)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OasstError(f"cannot load the tokenizer saved in {folder}: {detail}") from None


def _attach(model: Any, spec: ModelSpec) -> Any:
    """`model` with the adapter of `spec` (a peft load error names the base as the spec does)."""
    from oasst_model.load import load_adapter

    return load_adapter(model, str(spec.adapter), base=spec.model)
