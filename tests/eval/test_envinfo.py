"""lm-eval's environment report is gathered once per `oasst eval`, while the model loads, with the same content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ARGS = ("--tasks", "hellaswag", "--limit", 8)
ENV_KEYS = ("git_hash", "pretty_env_info", "transformers_version", "lm_eval_version", "upper_git_hash")


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count torch's collect_env runs (lm-eval's add_env_info imports it at each call)."""
    from torch.utils import collect_env

    calls: list[int] = []
    original = collect_env.get_pretty_env_info

    def counted() -> str:
        calls.append(1)
        return original()

    monkeypatch.setattr(collect_env, "get_pretty_env_info", counted)
    return calls


def test_env_report_gathered_once_with_the_same_keys(oasst, stories: Path, adapter_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    out = tmp_path / "out"
    result = oasst("eval", "--model", stories, "--adapter", adapter_dir, "--compare-base", *ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # two simple_evaluate runs (base, adapter), one report
    for label in ("base", "adapter"):
        report = json.loads((out / f"results_{label}.json").read_text())
        assert all(key in report for key in ENV_KEYS)
        assert report["pretty_env_info"].startswith("PyTorch version:")
    # tmp_path is no git repository: lm-eval's own `git describe` prints git's "fatal: ..." to our stderr.
    assert "fatal:" not in result.stderr
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["settings"]["patches"]["lm_eval_env_info_prefetch"]["state"] == "active"

    import lm_eval.evaluator

    from oasst_eval import envinfo

    # Undone after the command: lm-eval's own functions are back.
    assert lm_eval.evaluator.add_env_info.__module__ == "lm_eval.loggers.utils"
    assert envinfo.PATCH in summary["settings"]["patches"]


def test_changed_target_runs_lm_evals_own_report(oasst, stories: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.evaluator

    calls = _counting(monkeypatch)
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: "abc1234")
    original = lm_eval.evaluator.add_env_info
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: original(results))  # no `storage`
    out = tmp_path / "out"
    result = oasst("eval", "--model", stories, *ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: patch")]
    assert len(warned) == 1 and "lm_eval_env_info_prefetch is off" in warned[0] and "storage" in warned[0]
    report = json.loads((out / "results_base.json").read_text())
    assert report["git_hash"] == "abc1234" and report["pretty_env_info"].startswith("PyTorch version:")
    assert len(calls) == 1
