"""Shared paths and helpers for the core tests: real fixtures, a CliRunner, plug-ins isolated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import oasst_tools.cli as cli_module

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
SHARED = ROOT.parent / "shared" / "data" / "oasst1"
FLAT_FULL = SHARED / "validation-en.messages.jsonl"
NESTED_FULL = SHARED / "en-100-2023-03.trees.jsonl"
FLAT = FIXTURES / "oasst1" / "validation-en-sample.messages.jsonl"
NESTED = FIXTURES / "oasst1" / "en-20.trees.jsonl.gz"
BROKEN = FIXTURES / "broken"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path, offline, with entry-point discovery off so installed plug-ins cannot interfere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(cli_module, "DISCOVER_ENTRY_POINTS", False)


@pytest.fixture
def run():
    """Invoke `oasst ARGS...` in-process; returns the click Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_module.cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def raw_records(path: Path) -> dict[str, dict]:
    """message_id -> raw JSON record of a flat file (an independent view of the input for expectations)."""
    return {r["message_id"]: r for r in read_jsonl(path)}


def assert_fast_path_agrees(raws: object, sel: object) -> None:
    """The build's raw-record fast path picks the same thread and counts the same drops as `select_threads`."""
    from collections import Counter

    from oasst_tools.errors import OasstInputError
    from oasst_tools.filters import best_raw_thread, select_threads

    fast_dropped: Counter[str] = Counter()
    slow_dropped: Counter[str] = Counter()
    for raw in raws:  # type: ignore[attr-defined]
        try:
            fast = best_raw_thread(raw, sel, fast_dropped)  # type: ignore[arg-type]
        except OasstInputError as err:  # a label value the filter cannot compare: both paths say so alike
            fast = str(err)  # type: ignore[assignment]
        try:
            slow = list(select_threads(raw.to_tree(), sel, slow_dropped))  # type: ignore[arg-type]
        except OasstInputError as err:
            slow = str(err)  # type: ignore[assignment]
        if isinstance(fast, str) or isinstance(slow, str):
            assert fast == slow
            return
        assert [r["message_id"] for r in fast or ()] == [m.message_id for t in slow for m in t]
    assert fast_dropped == slow_dropped
