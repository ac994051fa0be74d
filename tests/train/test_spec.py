"""The model layer's ModelSpec (what an adapter records about its base) and the device-aware `auto` settings of
`oasst train`: resolved once, per device, printed, recorded, kept on --resume. No model loads here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oasst_model.spec import DeviceProfile, ModelSpec, auto_compute_dtype
from oasst_train.config import TrainConfig, device_line, resolve_auto
from tests.train.conftest import STORIES

CPU = DeviceProfile("cpu", "x86_64", False)
H100 = DeviceProfile("cuda", "NVIDIA H100", True)
T4 = DeviceProfile("cuda", "Tesla T4", False)


def _adapter(folder: Path, record: str | None = None, base: str = str(STORIES)) -> Path:
    """An adapter folder as `oasst train` writes one (config, weights header, optional train_config.yaml)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": base}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    if record is not None:
        (folder / "train_config.yaml").write_text(record, encoding="utf-8")
    return folder


# --- ModelSpec.from_adapter ----------------------------------------------------------------------------------------

def test_from_adapter_reads_how_training_loaded_the_base(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a", "model: base-dir\nload_in_4bit: true\nquant_type: fp4\ndouble_quant: false\n"
                                       "compute_dtype: bfloat16\nlora_r: 2\n")
    spec = ModelSpec.from_adapter(adapter)
    assert (spec.model, spec.load_in_4bit, spec.quant_type, spec.double_quant, spec.compute_dtype) == (
        "base-dir", True, "fp4", False, "bfloat16")
    assert spec.adapter == str(adapter) and spec.tokenizer is None  # no tokenizer files saved beside it
    assert spec.describe()["load_in_4bit"] == {"value": True, "from": "adapter record"}
    assert spec.sources["attn_implementation"] == "default"  # not in this record


def test_flags_win_over_the_record_and_say_so(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a", "model: base-dir\nload_in_4bit: true\ncompute_dtype: bfloat16\n")
    (adapter / "tokenizer_config.json").write_text("{}")
    spec = ModelSpec.from_adapter(adapter, compute_dtype="float32", load_in_4bit=None, model=None)
    assert (spec.compute_dtype, spec.load_in_4bit, spec.model) == ("float32", True, "base-dir")
    assert spec.sources["compute_dtype"] == "flag" and spec.sources["load_in_4bit"] == "adapter record"
    assert spec.tokenizer == str(adapter)  # the pad token training chose


def test_a_checkpoint_killed_before_its_record_was_copied_loads_as_its_run_did(tmp_path: Path) -> None:
    """transformers saves the checkpoint, then oasst train copies the record into it: killed in between, eval and
    merge of `checkpoints/checkpoint-N` loaded the base unquantized (adapter_config.json's base, defaults)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.yaml").write_text("model: base-dir\nload_in_4bit: true\ncompute_dtype: float32\n")
    checkpoint = _adapter(tmp_path / "run" / "checkpoints" / "checkpoint-20", base="owner/base")
    spec = ModelSpec.from_adapter(checkpoint)
    assert (spec.model, spec.load_in_4bit, spec.compute_dtype) == ("base-dir", True, "float32")
    assert spec.describe()["load_in_4bit"] == {"value": True, "from": "adapter record"}
    # Its own copy, when there, is the one read; a folder that is no checkpoint does not look two levels up.
    (checkpoint / "train_config.yaml").write_text("model: base-dir\nload_in_4bit: false\n")
    assert ModelSpec.from_adapter(checkpoint).load_in_4bit is False
    other = _adapter(tmp_path / "run" / "elsewhere" / "adapter", base="owner/base")
    assert ModelSpec.from_adapter(other).load_in_4bit is False


def test_without_a_record_the_base_is_named_by_adapter_config_and_not_quantized(tmp_path: Path) -> None:
    spec = ModelSpec.from_adapter(_adapter(tmp_path / "a", base="owner/base"))
    assert (spec.model, spec.load_in_4bit, spec.compute_dtype) == ("owner/base", False, "auto")
    assert spec.describe()["model"] == {"value": "owner/base", "from": "adapter_config.json"}
    assert spec.describe()["load_in_4bit"]["from"] == "default"


@pytest.mark.parametrize(("record", "expected"), [
    ("model: m\nload_in_4bit: maybe\n", "a/train_config.yaml:2: load_in_4bit must be true or false, not 'maybe'"),
    ("model: m\nquant_type: nf8\n", "a/train_config.yaml:2: quant_type must be one of nf4, fp4, not 'nf8'"),
    ("compute_dtype: fp16\nmodel: m\n", "a/train_config.yaml:1: compute_dtype must be one of auto, bfloat16, "
                                        "float16, float32, not 'fp16'"),
    ("model: [a, b]\n", "a/train_config.yaml:1: model must be text, not ['a', 'b']"),
], ids=["bool", "quant-type", "dtype", "model"])
def test_a_damaged_record_is_one_line_naming_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           record: str, expected: str) -> None:
    from oasst_tools.errors import OasstError

    monkeypatch.chdir(tmp_path)
    _adapter(tmp_path / "a", record)
    with pytest.raises(OasstError) as caught:
        ModelSpec.from_adapter("a")
    assert str(caught.value) == expected


def test_an_adapter_that_names_no_base_needs_model(tmp_path: Path) -> None:
    from oasst_tools.errors import OasstError

    adapter = _adapter(tmp_path / "a", base="")
    with pytest.raises(OasstError, match=r"does not name its base model; pass --model$"):
        ModelSpec.from_adapter(adapter)
    assert ModelSpec.from_adapter(adapter, model="given").sources["model"] == "flag"


def test_auto_compute_dtype_follows_the_device() -> None:
    assert [auto_compute_dtype(p) for p in (CPU, H100, T4)] == ["float32", "bfloat16", "float16"]
    spec = ModelSpec(model="m").resolved(T4)
    assert (spec.compute_dtype, spec.sources["compute_dtype"]) == ("float16", "auto (cuda)")
    assert ModelSpec(model="m", compute_dtype="float32").resolved(T4).compute_dtype == "float32"


# --- device-aware defaults of `oasst train` --------------------------------------------------------------------------

def _cfg(**values: Any) -> TrainConfig:
    return TrainConfig(model="m", data="d", out="o", **values)


def test_defaults_are_auto_until_the_run_starts() -> None:
    cfg = TrainConfig()
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("auto", "auto", "auto")
    assert (cfg.batch_size, cfg.grad_accum) == ("auto", "auto")


def test_a_cpu_run_picks_fp32_and_no_checkpointing() -> None:
    cfg, choice = resolve_auto(_cfg(), CPU)
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("fp32", "float32", False)
    assert choice["precision"] == {"value": "fp32", "from": "auto (cpu)"}
    assert (cfg.batch_size, cfg.grad_accum) == (16, 1)  # 16 rows per step, in one pass
    assert device_line(choice) == ("device: cpu -> precision fp32, compute_dtype float32, gradient_checkpointing off, "
                                   "batch_size 16, grad_accum 1")


def test_a_batch_shape_given_by_half_keeps_that_half() -> None:
    cfg, choice = resolve_auto(_cfg(batch_size=2), CPU)
    assert (cfg.batch_size, cfg.grad_accum) == (2, 1) and choice["batch_size"]["from"] == "set"
    cfg, _ = resolve_auto(_cfg(grad_accum=8), H100)
    assert (cfg.batch_size, cfg.grad_accum) == (4, 8)


def test_a_gpu_run_picks_bf16_and_checkpointing() -> None:
    cfg, choice = resolve_auto(_cfg(), H100)
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("bf16", "bfloat16", True)
    assert choice["lora_weights_fp32"] is False
    assert (cfg.batch_size, cfg.grad_accum) == (4, 4)
    assert device_line(choice) == ("device: cuda (NVIDIA H100) -> precision bf16, compute_dtype bfloat16, "
                                   "gradient_checkpointing on, batch_size 4, grad_accum 4")


def test_a_gpu_without_bf16_falls_back_to_fp16_with_fp32_lora_weights() -> None:
    cfg, choice = resolve_auto(_cfg(), T4)
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("fp16", "float16", True)
    assert choice["lora_weights_fp32"] is True and choice["bf16_supported"] is False
    assert device_line(choice) == ("device: cuda (Tesla T4, no bf16) -> precision fp16, compute_dtype float16, "
                                   "gradient_checkpointing on, batch_size 4, grad_accum 4 (LoRA weights kept in fp32 "
                                   "for fp16's loss scaling)")


def test_one_of_precision_and_compute_dtype_set_decides_the_other() -> None:
    cfg, choice = resolve_auto(_cfg(precision="fp16"), H100)
    assert (cfg.compute_dtype, choice["compute_dtype"]["from"]) == ("float16", "auto (follows precision)")
    cfg, choice = resolve_auto(_cfg(compute_dtype="float32"), H100)
    assert (cfg.precision, choice["precision"]["from"]) == ("fp32", "auto (follows compute_dtype)")


def test_a_recipe_keeps_its_values_and_prints_no_device_line() -> None:
    from oasst_train.config import resolve_config
    from tests.train.conftest import RECIPES

    origins: dict[str, str] = {}
    recipe = resolve_config(RECIPES / "tiny-cpu.yaml", {"data": "d", "out": "o", "batch_size": 3}, origins=origins)
    cfg, choice = resolve_auto(recipe, H100, origins=origins)
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("fp32", "float32", False)
    # eval_summary's words for where a value came from: the recipe is `config`, a flag `flag`.
    assert device_line(choice) is None and choice["precision"]["from"] == "config"
    assert choice["batch_size"] == {"value": 3, "from": "flag"}
    assert resolve_auto(recipe, H100)[1]["precision"]["from"] == "set"  # a library caller's TrainConfig


def test_a_resumed_run_keeps_the_values_it_started_with() -> None:
    saved = {"precision": "fp32", "compute_dtype": "float32", "gradient_checkpointing": False, "batch_size": 16,
             "grad_accum": 1}
    cfg, choice = resolve_auto(_cfg(), H100, saved)  # started on a CPU, resumed on a GPU
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("fp32", "float32", False)
    assert (cfg.batch_size, cfg.grad_accum) == (16, 1)  # the same data order and steps as it started with
    assert {choice[k]["from"] for k in saved} == {"resumed run"} and device_line(choice) is None


def test_auto_in_a_recipe_and_on_the_command_line(tmp_path: Path) -> None:
    from oasst_train.config import resolve_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\nout: o\ngradient_checkpointing: auto\nprecision: auto\n")
    assert resolve_config(recipe, {}).gradient_checkpointing == "auto"
    assert resolve_config(recipe, {"gradient_checkpointing": True}).gradient_checkpointing is True


def test_device_profile_reads_native_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from oasst_model.spec import device_profile

    asked: list[object] = []

    def no_native_bf16(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # a pre-Ampere GPU emulates bf16 but has none of its own

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_native_bf16)
    assert device_profile() == T4 and asked == [False]
    assert device_profile("cpu").kind == "cpu"


def test_run_training_resolves_once_for_a_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import oasst_model.spec as spec_module
    from oasst_train.trainer import model_spec, resolve_device_defaults

    monkeypatch.setattr(spec_module, "device_profile", lambda device=None: T4)
    cfg, choice = resolve_device_defaults(_cfg())
    assert (cfg.precision, cfg.compute_dtype, cfg.gradient_checkpointing) == ("fp16", "float16", True)
    assert model_spec(cfg).compute_dtype == "float16"  # the base loads in the dtype the step computes in
    assert choice["device"] == "cuda (Tesla T4, no bf16)"


def test_cpu_run_prints_the_choice_once_and_records_it(oasst, stories: Path, tmp_path: Path) -> None:
    """The first line after the config, and train_summary.json / train_config.yaml: a real 2-step CPU run."""
    import yaml

    from tests.train.conftest import GUANACO, read_summary

    (tmp_path / "data").mkdir()
    rows = (GUANACO / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = oasst("train", "--model", stories, "--data", "data", "--out", "out", "--max-steps", 2,
                   "--batch-size", 2, "--grad-accum", 1, "--max-length", 64, "--save-steps", 100)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("device: ")]
    assert lines == ["device: cpu -> precision fp32, compute_dtype float32, gradient_checkpointing off"]
    recorded = read_summary(tmp_path / "out")["device_defaults"]
    assert recorded["precision"] == {"value": "fp32", "from": "auto (cpu)"}
    assert recorded["batch_size"] == {"value": 2, "from": "flag"}
    saved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text(encoding="utf-8"))
    assert (saved["precision"], saved["compute_dtype"], saved["gradient_checkpointing"]) == ("fp32", "float32", False)
