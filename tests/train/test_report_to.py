"""`--report-to`: tensorboard event files really written under --out; a logger that is not installed is one line.

wandb is not installed in the project's venv, so its offline mode is not tested here; only its absence is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.train.conftest import GUANACO, RECIPES, error_line, read_summary


@pytest.mark.slow
def test_report_to_tensorboard_writes_the_logged_losses_as_event_files_under_out(oasst, stories: Path,
                                                                                  tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the dev extra's tensorboard reads the event files back")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--no-load-in-4bit", "--max-steps", 3, "--save-steps", 3, "--logging-steps", 1,
                   "--eval-steps", 3, "--batch-size", 2, "--eval-rows", 2, "--report-to", "tensorboard", "-q")
    assert result.exit_code == 0, result.output
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))  # tmp_path is also the working directory
    assert events and all(e.parent == out / "runs" and e.stat().st_size > 0 for e in events), events
    logged = EventAccumulator(str(out / "runs")).Reload()  # every event file of the folder, in order
    history = read_summary(out)["log_history"]
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        got = {e.step: e.value for e in logged.Scalars(tag)}
        want = {e["step"]: e[key] for e in history if key in e}
        assert sorted(got) == sorted(want), tag
        for step, loss in want.items():  # tensorboard stores float32
            assert got[step] == pytest.approx(loss, rel=1e-6), (tag, step)
    assert sorted(got) == [0, 3]  # eval: the step-0 baseline (logged before train()) and the last step


def _refused(oasst, stories: Path, out: Path, backend: str) -> str:
    """The error line of a run asking for `backend`, after checking it wrote nothing."""
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--report-to", backend, "-q")
    assert not out.exists()
    return error_line(result)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_is_one_clear_error_before_anything_is_written(oasst, stories: Path,
                                                                                    tmp_path: Path) -> None:
    assert _refused(oasst, stories, tmp_path / "wb", "wandb") == (
        "error: --report-to wandb needs the wandb package, which is not installed: pip install wandb, "
        "or pass --report-to none")


def test_report_to_tensorboard_without_any_writer_is_one_clear_error(oasst, stories: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else find_spec(name, *a))
    assert _refused(oasst, stories, tmp_path / "tb", "tensorboard") == (
        "error: --report-to tensorboard needs the tensorboard package, which is not installed: "
        "pip install tensorboard, or pass --report-to none")
