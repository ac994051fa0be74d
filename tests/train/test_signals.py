"""SIGTERM / Ctrl-C during `oasst train`: a complete checkpoint, exit 1 with one line, and `--resume` finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oasst_train.checkpoints import last_complete_checkpoint
from tests.train.conftest import GUANACO, RECIPES, REPO, read_summary

STEPS = 20


def _train_args(out: Path, stories: Path) -> list[str]:
    return ["train", "--config", str(RECIPES / "tiny-cpu.yaml"), "--model", str(stories), "--data", str(GUANACO),
            "--out", str(out), "--no-load-in-4bit", "--max-steps", str(STEPS), "--save-steps", "5", "--logging-steps", "1",
            "--batch-size", "2", "--max-length", "128", "--eval-rows", "2", "-q"]


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_exits_1_with_one_line_and_resume_finishes(oasst, stories: Path,
                                                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "oasst_tools", *_train_args(out, stories)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while last_complete_checkpoint(out) is None:  # checkpoint-5: training is under way, 15 steps to go
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()

    checkpoint = last_complete_checkpoint(out)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 5 < step < 10, step  # between two --save-steps checkpoints: this one is the signal's
    assert proc.returncode == 1
    assert stderr.splitlines() == [f"error: stopped by SIGTERM at step {step}; checkpoint "
                                   f"saved in {out / 'checkpoints'}; continue with the same command and --resume"]
    assert not (out / "train_summary.json").exists() and not (out / "adapter_config.json").exists()
    before = [e for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in e]

    result = oasst(*_train_args(out, stories), "--resume")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["global_step"] == STEPS and summary["resumed_from"] == checkpoint.name
    logged = [e for e in summary["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == list(range(1, STEPS + 1))  # no gap, no repeated step
    assert logged[:step] == before  # the curve up to the signal is the interrupted run's own


def test_first_sigint_asks_for_checkpoint_and_stop_and_a_second_one_interrupts_at_once() -> None:
    from transformers import TrainerControl

    from oasst_train.callbacks import SaveOnSignal

    sigterm_handler = signal.getsignal(signal.SIGTERM)
    sigint_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain `python` process
    stopper = SaveOnSignal()
    try:
        stopper.install()
        control = TrainerControl()
        stopper.on_step_end(None, None, control)
        assert not control.should_save and not control.should_training_stop
        signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step: nothing is interrupted
        assert stopper.received == signal.SIGINT
        stopper.on_step_end(None, None, control)  # the step ends: save, then stop
        assert control.should_save and control.should_training_stop
        assert signal.getsignal(signal.SIGTERM) is sigterm_handler
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step to finish
            signal.raise_signal(signal.SIGINT)
    finally:
        stopper.uninstall()
        signal.signal(signal.SIGINT, sigint_handler)
