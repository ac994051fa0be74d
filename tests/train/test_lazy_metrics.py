"""lazy_metrics: trl's metrics read when logged, tokens counted at collate, no NaN filter. Every logged value is
the one trl's and the Trainer's own path logs, packed (padding-free) and padded. On stories260K: the metrics do not
depend on the architecture, and its 512-token vocabulary keeps these seven runs short (Falcon's 65,024 made them 80 s)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.train.conftest import GUANACO, read_summary

LOGGED = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "num_input_tokens_seen",
          "eval_loss", "eval_entropy", "eval_mean_token_accuracy")


def _run(oasst: Any, model: Path, out: Path, *extra: object) -> dict[str, Any]:
    result = oasst("train", "--model", model, "--data", GUANACO, "--no-load-in-4bit", "--max-steps", 3,
                   "--batch-size", 2, "--grad-accum", 2, "--max-length", 256, "--eval-rows", 4, "--eval-steps", 2,
                   "--save-steps", 3, "--logging-steps", 1, "--out", out, "-q", *extra)
    assert result.exit_code == 0, result.output
    return read_summary(out) | {"stderr": result.stderr}


@pytest.fixture(scope="module")
def own_packed(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """trl's own path on packed rows (shared by the tests that compare with it)."""
    from tests.train.conftest import invoke

    return _run(invoke, stories, tmp_path_factory.mktemp("own-packed") / "run", "--packing")


def _logged(summary: dict[str, Any]) -> list[dict[str, float]]:
    return [{k: e[k] for k in LOGGED if k in e} for e in summary["log_history"] if set(LOGGED) & set(e)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_every_logged_value_equals_trls_own_path(oasst: Any, stories: Path, tmp_path: Path, layout: str,
                                                 own_packed: dict[str, Any]) -> None:
    extra = ("--packing",) if layout == "packed" else ("--pad-to-multiple-of", 64)
    own = own_packed if layout == "packed" else _run(oasst, stories, tmp_path / "own", *extra)
    lazy = _run(oasst, stories, tmp_path / "lazy", "--lazy-metrics", *extra)
    assert lazy["patches"]["lazy_metrics"]["state"] == "active"
    assert "lazy_metrics" not in own["patches"]
    own_logs, lazy_logs = _logged(own), _logged(lazy)
    assert len(lazy_logs) == len(own_logs) >= 5  # 3 training steps, evaluation at the start, at 2 and at the end
    for mine, theirs in zip(lazy_logs, own_logs):
        assert mine.keys() == theirs.keys()
        assert mine == pytest.approx(theirs, rel=1e-6), (mine, theirs)
    assert any("entropy" in e and "num_tokens" in e for e in lazy_logs)
    assert lazy["step_tokens"] == own["step_tokens"] and sum(lazy["step_tokens"]) == lazy["tokens_seen"]


@pytest.mark.slow
def test_a_changed_trl_compute_loss_keeps_trls_own_path(oasst: Any, stories: Path, tmp_path: Path,
                                                        own_packed: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_model import targets

    monkeypatch.setattr(targets, "TRL_COMPUTE_LOSS_NAMES", (*targets.TRL_COMPUTE_LOSS_NAMES, "renamed_metric"))
    lazy = _run(oasst, stories, tmp_path / "lazy", "--packing", "--lazy-metrics")
    assert lazy["patches"]["lazy_metrics"]["state"] == "fallback"
    warnings = [line for line in lazy["stderr"].splitlines() if line.startswith("warning: patch lazy_metrics is off")]
    assert len(warnings) == 1 and "renamed_metric" in warnings[0]
    assert _logged(lazy) == _logged(own_packed)


@pytest.mark.slow
def test_a_nan_loss_is_logged_for_its_interval_not_hidden(oasst: Any, stories: Path, tmp_path: Path,
                                                          own_packed: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer's NaN/inf filter (a host wait per micro-batch) replaces a non-finite loss by the mean of earlier
    ones; with lazy_metrics the log shows it for its own logging interval, and the next intervals log their losses
    again. One micro-batch's loss value is made NaN with finite gradients, so training itself goes on unharmed: the
    other intervals log what the run without a NaN logs."""
    import torch

    import oasst_train.trainer as trainer_module

    build = trainer_module.with_fast_paths

    def with_one_nan(cfg: Any, trainer: Any, targets: list[str]) -> Any:
        built = build(cfg, trainer, targets)
        inner, calls = trainer.compute_loss, [0]

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = inner(*args, **kwargs)
            if not trainer.model.training:
                return loss
            calls[0] += 1
            if calls[0] == 3:  # step 2's first micro-batch
                return torch.full_like(loss.detach(), float("nan")) + (loss - loss.detach())
            return loss

        trainer.compute_loss = compute_loss
        return built

    monkeypatch.setattr(trainer_module, "with_fast_paths", with_one_nan)
    lazy = _run(oasst, stories, tmp_path / "lazy", "--packing", "--lazy-metrics")
    own_losses = [e["loss"] for e in own_packed["log_history"] if "loss" in e]
    lazy_losses = [e["loss"] for e in lazy["log_history"] if "loss" in e]
    assert len(lazy_losses) == len(own_losses) == 3
    assert math.isnan(lazy_losses[1])
    assert lazy_losses[0] == pytest.approx(own_losses[0], rel=1e-6)
    assert lazy_losses[2] == pytest.approx(own_losses[2], rel=1e-6)  # the next interval starts clean
    assert all(math.isfinite(e["eval_loss"]) for e in lazy["log_history"] if "eval_loss" in e)
