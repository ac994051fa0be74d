"""Shared fixtures for the `oasst train` tests: offline, one CPU thread, tiny real and scaled-down models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORIES  # noqa: F401 - re-exported for test modules

# One thread: on a shared 2-core machine, two OpenMP threads wait on each other and every op costs ~10 ms.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"})

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "models"
FALCON_TOKENIZER = SHARED / "falcon-7b-tokenizer"
GUANACO = REPO / "fixtures" / "guanaco-en"
RECIPES = REPO / "train" / "recipes"
# The stories260K run most tests share: tiny-cpu recipe (4-bit), fewer steps.
STORIES_STEPS = 60


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path with one torch thread and only this project's plug-ins registered."""
    import torch

    import oasst_tools.cli as core_cli

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core_cli, "DISCOVER_ENTRY_POINTS", False)
    monkeypatch.setattr(core_cli, "EXTRA_COMMANDS", {
        name: f"oasst_train.cli:{name}" for name in ("train", "merge", "generate", "chat")})


@pytest.fixture
def oasst() -> Callable[..., Any]:
    """Run `oasst ARGS...` in-process through the real CLI group; returns click's Result."""
    return invoke


def invoke(*args: object, input: str | None = None) -> Any:  # noqa: A002 - CliRunner's name
    """`oasst ARGS...` in-process (usable from session fixtures, which cannot take `oasst`)."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli

    old = core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS
    core_cli.EXTRA_COMMANDS = {name: f"oasst_train.cli:{name}" for name in ("train", "merge", "generate", "chat")}
    core_cli.DISCOVER_ENTRY_POINTS = False
    try:
        return CliRunner().invoke(core_cli.cli, [str(a) for a in args], input=input, catch_exceptions=False)
    finally:
        core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = old


def error_line(result: Any) -> str:
    """The single `error: ...` line a failed command printed (and check it printed nothing else to stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert lines and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[-1]


def read_summary(out: Path) -> dict[str, Any]:
    """train_summary.json of a finished run."""
    return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Falcon-7B's architecture and real tokenizer, scaled down to 2 layers of width 64, random weights."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    if not FALCON_TOKENIZER.is_dir():
        pytest.skip(f"{FALCON_TOKENIZER} not present")
    out = tmp_path_factory.mktemp("falcon-tiny")
    config = json.loads((FALCON_TOKENIZER / "config.json").read_text(encoding="utf-8"))
    config.pop("auto_map")  # names remote code; the native FalconForCausalLM is what we test
    config.update(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    FalconForCausalLM(FalconConfig(**config)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(FALCON_TOKENIZER / name, out / name)
    return out


@pytest.fixture(scope="session")
def stories_run(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-bit LoRA run of the tiny-cpu recipe on the Guanaco fixture (shared: it takes ~30 s)."""
    out = tmp_path_factory.mktemp("stories-run") / "run"
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                    "--out", out, "--max-steps", STORIES_STEPS, "--save-steps", 30, "-q")
    assert result.exit_code == 0, result.output
    return out
