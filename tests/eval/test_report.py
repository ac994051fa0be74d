"""eval_summary.json shape, the paired standard error of a difference, the table and the chart."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from oasst_eval import report


def _run(label: str, acc: list[float], lls: list[tuple[float, int]]) -> SimpleNamespace:
    n = len(acc)
    results = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": sum(acc) / n, "acc_stderr,none": 0.1},
            "guanaco_test": {"alias": "guanaco_test", "token_loss_stderr,none": "N/A",
                             "token_loss,none": -sum(x for x, _ in lls) / sum(t for _, t in lls)},
        },
        "n-samples": {"hellaswag": {"original": 100, "effective": n},
                      "guanaco_test": {"original": 17, "effective": len(lls)}},
    }
    samples = {
        "hellaswag": [{"doc_id": i, "acc": a} for i, a in reversed(list(enumerate(acc)))],  # order must not matter
        "guanaco_test": [{"doc_id": i, "token_loss": p} for i, p in enumerate(lls)],
    }
    return SimpleNamespace(label=label, results=results, samples=samples, seconds=1.0, items=n)


def test_paired_stderr_of_accuracy_difference() -> None:
    diff, se = report.paired_difference([1, 0, 0, 1], [1, 1, 0, 1])
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(0.5 / math.sqrt(4))  # sd of (0, 1, 0, 0) is 0.5


def test_difference_of_pooled_token_loss_is_negative_when_the_adapter_is_better() -> None:
    base, adapter = [(-40.0, 10), (-60.0, 20)], [(-30.0, 10), (-45.0, 20)]
    diff, se = report.paired_difference(base, adapter)
    assert diff == pytest.approx((75.0 - 100.0) / 30)
    assert se == pytest.approx(math.sqrt(((-10 + 12.5) ** 2 + (-15 + 12.5) ** 2) / 1) / (math.sqrt(2) * 15))


def test_summary_maps_label_to_task_to_metrics() -> None:
    runs = [_run("base", [1, 0, 0, 1], [(-40.0, 10), (-60.0, 20)]),
            _run("adapter", [1, 1, 0, 1], [(-30.0, 10), (-45.0, 20)])]
    doc = report.summary(runs, {"limit": 4})
    assert doc["base"]["hellaswag"] == {"acc": 0.5, "acc_stderr": 0.1, "n": 4}
    assert doc["adapter"]["guanaco_test"]["token_loss"] == pytest.approx(2.5)
    assert doc["adapter"]["guanaco_test"]["token_loss_stderr"] is None
    assert doc["difference"]["hellaswag"]["acc"]["diff"] == pytest.approx(0.25)
    assert doc["settings"] == {"limit": 4}
    assert {"python", "lm_eval", "torch", "transformers"} <= set(doc["versions"])


def test_outputs_are_complete_files(tmp_path: Path) -> None:
    runs = [_run("base", [1, 0, 0, 1], [(-40.0, 10)]), _run("adapter", [1, 1, 0, 1], [(-30.0, 10)])]
    doc = report.summary(runs, {"seconds": {"base": 1.0, "adapter": 1.0}})
    written = report.write_outputs(tmp_path / "out", runs, doc)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval.png", "eval_summary.json", "results_adapter.json", "results_base.json"]
    assert written["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(width=120, record=True)
    report.show(doc, written, console)
    text = console.export_text()
    assert "+0.2500 ± 0.2500" in text and "adapter - base" in text


def test_a_second_run_into_the_same_folder_leaves_none_of_the_first_runs_files(tmp_path: Path) -> None:
    both = [_run("base", [1, 0, 0, 1], [(-40.0, 10)]), _run("adapter", [1, 1, 0, 1], [(-30.0, 10)])]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results_mine.json").write_text("{}")  # a shared folder: not an eval's, kept
    report.write_outputs(tmp_path / "out", both, report.summary(both, {"seconds": {"base": 1.0, "adapter": 1.0}}))
    base_only = both[:1]
    umask = os.umask(0o022)
    try:
        report.write_outputs(tmp_path / "out", base_only, report.summary(base_only, {"seconds": {"base": 1.0}}))
    finally:
        os.umask(umask)
    # The first run's adapter results would read as this run's: gone; the files are as readable as the folder's.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.png", "eval_summary.json",
                                                                   "results_base.json", "results_mine.json"]
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "out").glob("*.json") if p.name != "results_mine.json")


@pytest.mark.parametrize("earlier", [b'{"base": ' * 100_000 + b"{}" + b"}" * 100_000, b"{not json", b"[1]",
                                     b"\xff\xfe{"], ids=["nested-past-the-parser", "not-json", "not-an-object", "not-utf8"])
def test_an_unreadable_earlier_summary_in_the_folder_is_replaced_not_an_error(tmp_path: Path,
                                                                               earlier: bytes) -> None:
    """The earlier eval_summary.json is only read to clear that run's files: one nested past json's recursion
    limit (a RecursionError, once a 'bug' line after scoring) or damaged otherwise is replaced by this run's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_summary.json").write_bytes(earlier)
    runs = [_run("base", [1, 0, 0, 1], [(-40.0, 10)])]
    written = report.write_outputs(out, runs, report.summary(runs, {"seconds": {"base": 1.0}}))
    assert sorted(p.name for p in out.iterdir()) == ["eval.png", "eval_summary.json", "results_base.json"]
    assert '"base"' in written["summary"].read_text()
