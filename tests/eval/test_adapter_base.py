"""`oasst eval --adapter A` with no `--model` scores the base as it was trained (issue 12's acceptance): after a 4-bit
`oasst train`, the base loads in 4-bit with the recorded quant type and compute dtype, the numbers equal those with
every setting spelled out, and the table and eval_summary.json say where each setting came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORIES
from tests.eval.conftest import GUANACO, REPO

LIMIT = 12
STEPS = 3


def _invoke(*args: object) -> Any:
    """`oasst ARGS...` in-process with the train and eval plug-ins registered."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli
    from oasst_eval.cli import eval_command
    from oasst_train.cli import train

    old = core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS
    core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = {"train": train, "eval": eval_command}, False
    try:
        return CliRunner().invoke(core_cli.cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = old


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K trained by `oasst train` on the tiny-cpu recipe (NF4 4-bit, float32 compute) for a few steps."""
    pytest.importorskip("bitsandbytes")
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    out = tmp_path_factory.mktemp("qlora") / "run"
    result = _invoke("train", "--config", REPO / "train" / "recipes" / "tiny-cpu.yaml", "--model", STORIES,
                     "--data", GUANACO, "--out", out, "--max-steps", STEPS, "--eval-rows", 2, "--save-steps", 1000,
                     "-q")
    assert result.exit_code == 0, result.output
    return out


def _eval(out: str, *args: object) -> tuple[Any, dict[str, Any]]:
    result = _invoke("eval", *args, "--tasks", "hellaswag", "--limit", LIMIT, "--out", out)
    assert result.exit_code == 0, result.output
    return result, json.loads((Path(out) / "eval_summary.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_adapter_alone_loads_the_base_as_trained_and_scores_as_when_spelled_out(qlora_adapter: Path) -> None:
    implied_run, implied = _eval("implied", "--adapter", qlora_adapter)
    _, spelled = _eval("spelled", "--adapter", qlora_adapter, "--model", STORIES, "--load-in-4bit", "--quant-type",
                       "nf4", "--double-quant", "--compute-dtype", "float32")

    settings = implied["settings"]
    assert settings["linear4bit_layers"] == 35 > 0  # 4-bit stays 4-bit
    assert settings["base_loaded"] == {
        "model": {"value": str(STORIES), "from": "adapter record"},
        "load_in_4bit": {"value": True, "from": "adapter record"},
        "quant_type": {"value": "nf4", "from": "adapter record"},
        "double_quant": {"value": True, "from": "adapter record"},
        "compute_dtype": {"value": "float32", "from": "adapter record"},
    }
    assert (settings["model"], settings["load_in_4bit"], settings["compute_dtype"]) == (str(STORIES), True, "float32")
    assert {entry["from"] for entry in spelled["settings"]["base_loaded"].values()} == {"flag"}
    assert spelled["settings"]["linear4bit_layers"] == 35
    assert implied["adapter"]["hellaswag"] == spelled["adapter"]["hellaswag"]
    # Under the results table, how the base was loaded.
    assert (f"base loaded as: model {STORIES} (adapter record), 4-bit nf4 (adapter record), compute_dtype float32 "
            "(adapter record)") in implied_run.stdout


@pytest.mark.slow
def test_a_flag_overrides_the_record_and_says_so(qlora_adapter: Path) -> None:
    result, summary = _eval("plain", "--adapter", qlora_adapter, "--no-load-in-4bit", "--merge-adapter")
    assert summary["settings"]["linear4bit_layers"] == 0
    assert summary["settings"]["base_loaded"]["load_in_4bit"] == {"value": False, "from": "flag"}
    assert summary["settings"]["adapter_merged"] is True  # unquantized: merged into the weights in memory
    assert "not quantized (flag)" in result.stdout
    # The same setting from a --config file says so (it said "flag"); a flag on top of the file is the flag's.
    config = Path("plain") / "eval.yaml"
    config.write_text("load_in_4bit: false\nmerge_adapter: true\ncompute_dtype: float32\n")
    result, summary = _eval("config", "--adapter", qlora_adapter, "--config", config, "--compute-dtype", "float32")
    assert summary["settings"]["base_loaded"]["load_in_4bit"] == {"value": False, "from": "config"}
    assert summary["settings"]["base_loaded"]["compute_dtype"] == {"value": "float32", "from": "flag"}
    assert summary["settings"]["base_loaded"]["quant_type"]["from"] == "adapter record"
    assert "not quantized (config)" in result.stdout and "from_config" not in summary["settings"]


@pytest.fixture
def captured_eval(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The EvalConfig `oasst eval` resolved, recorded instead of scoring."""
    import oasst_eval.run as run
    from oasst_tools.errors import OasstError

    seen: list[Any] = []

    def capture(cfg: Any, **kwargs: Any) -> Any:
        seen.append(cfg)
        raise OasstError("captured")

    monkeypatch.setattr(run, "evaluate", capture)
    return seen


@pytest.mark.parametrize(("flags", "expected"), [
    (["--load-in-4bit", "--compute-dtype", "float32"], (True, "float32")),
    (["--no-load-in-4bit", "--dtype", "bfloat16"], (False, "bfloat16")),  # --dtype: the hidden former spelling
    ([], (None, None)),  # None: as the adapter was trained (or the option's default without one)
], ids=["new", "alias", "none"])
def test_eval_takes_load_in_4bit_and_compute_dtype(oasst, captured_eval: list[Any], flags: list[str],
                                                   expected: tuple[Any, ...]) -> None:
    result = oasst("eval", "--model", "m", *flags)
    assert result.stderr.strip() == "error: captured", result.output
    (cfg,) = captured_eval
    assert (cfg.load_in_4bit, cfg.compute_dtype) == expected


def test_old_dtype_key_in_a_config_file_is_read_with_a_warning(oasst, captured_eval: list[Any],
                                                               tmp_path: Path) -> None:
    (tmp_path / "eval.yaml").write_text("model: m\ndtype: float32\n")
    result = oasst("eval", "--config", "eval.yaml")
    assert result.stderr.splitlines() == [
        "warning: eval.yaml:2: `dtype` is now `compute_dtype`; rename it (the old name is read until the next "
        "release)", "error: captured"]
    assert captured_eval[0].compute_dtype == "float32"


def test_old_and_new_dtype_keys_together_are_refused(oasst, tmp_path: Path) -> None:
    (tmp_path / "eval.yaml").write_text("model: m\ndtype: float32\ncompute_dtype: bfloat16\n")
    result = oasst("eval", "--config", "eval.yaml")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: eval.yaml:2: `dtype` is the old name of `compute_dtype`, which is set "
                                     "too; keep `compute_dtype`")


def test_eval_with_an_adapter_that_names_no_base_asks_for_model(oasst, adapter_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(adapter_dir, tmp_path / "a")
    (tmp_path / "a" / "train_config.yaml").unlink(missing_ok=True)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    result = oasst("eval", "--adapter", "a")
    assert (result.exit_code, result.stderr.strip()) == (1, "error: a does not name its base model; pass --model")
