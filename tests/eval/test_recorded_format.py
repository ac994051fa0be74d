"""`oasst eval --adapter A --tasks guanaco_test` scores the conversation format A was trained in (its
train_config.yaml), unless --format says otherwise; eval_summary.json says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval.conftest import GUANACO


@pytest.fixture(scope="module")
def chat_adapter(chatml_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps on stories260K with a ChatML template; no --format, so auto records chat-template."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli
    from oasst_train.cli import train

    out = tmp_path_factory.mktemp("chat-adapter") / "run"
    old = core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS
    core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = {"train": train}, False
    try:
        result = CliRunner().invoke(core_cli.cli, [
            "train", "--model", str(chatml_model), "--data", str(GUANACO), "--no-load-in-4bit", "--max-steps", "2",
            "--batch-size", "8", "--grad-accum", "1", "--max-length", "128", "--eval-steps", "100000",
            "--save-steps", "100000", "--quiet", "--out", str(out)])
    finally:
        core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = old
    assert result.exit_code == 0, result.output
    return out


def _token_loss(oasst, adapter: Path, out: Path, *flags: str) -> tuple[float, str]:
    result = oasst("eval", "--adapter", adapter, "--tasks", "guanaco_test", "--data", GUANACO, "--limit", 2,
                   "--out", out, *flags)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval_summary.json").read_text(encoding="utf-8"))
    return summary["adapter"]["guanaco_test"]["token_loss"], summary["settings"]["format"]


def test_guanaco_test_scores_the_format_the_adapter_was_trained_in(oasst, chat_adapter: Path, tmp_path: Path) -> None:
    import yaml

    assert yaml.safe_load((chat_adapter / "train_config.yaml").read_text(encoding="utf-8"))["format"] == \
        "chat-template"
    recorded = _token_loss(oasst, chat_adapter, tmp_path / "recorded")
    told = _token_loss(oasst, chat_adapter, tmp_path / "told", "--format", "chat-template")
    other = _token_loss(oasst, chat_adapter, tmp_path / "other", "--format", "guanaco")
    assert recorded == told and recorded[1] == "chat-template"
    assert other[1] == "guanaco" and other[0] != recorded[0]  # another text is scored


def test_a_bad_recorded_format_is_one_error_line_before_anything_loads(oasst, chat_adapter: Path,
                                                                      tmp_path: Path) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(chat_adapter, adapter)
    record = adapter / "train_config.yaml"
    lines = record.read_text(encoding="utf-8").splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("format:"))
    lines[line - 1] = "format: chatml"
    record.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = oasst("eval", "--adapter", adapter, "--tasks", "guanaco_test", "--data", GUANACO, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (f"error: {record}:{line}: format must be one of auto, guanaco, "
                                                      "chat-template, not 'chatml'")
