"""Step times of `oasst train` (train_summary.json's step_seconds, real tokens/s): the host work between steps
(data loading, logging) counts, evaluation and checkpoint saving do not."""

from __future__ import annotations

import time
from types import SimpleNamespace

from oasst_train.callbacks import ProgressCallback


def _step(bar: ProgressCallback, state: SimpleNamespace, work: float, after: float) -> None:
    bar.on_step_begin(None, state, None)
    time.sleep(work)
    state.num_input_tokens_seen += 1000
    state.global_step += 1
    bar.on_step_end(None, state, None)
    time.sleep(after)  # what the trainer does before the next step's begin: logging, the next batch


def test_step_time_runs_from_the_previous_end_except_after_evaluation_or_saving() -> None:
    bar = ProgressCallback(enabled=False)
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, is_world_process_zero=True)
    _step(bar, state, 0.05, 0.10)
    _step(bar, state, 0.05, 0.0)
    bar.on_evaluate(None, state, None)
    time.sleep(0.4)  # evaluation: not training time
    _step(bar, state, 0.05, 0.10)
    bar.on_save(None, state, None)
    time.sleep(0.4)
    _step(bar, state, 0.05, 0.0)
    first, second, after_eval, after_save = bar.step_seconds
    assert 0.05 <= first < 0.14  # the first step of a session: from its own begin
    assert second >= 0.15  # the 0.10 s between the steps belongs to the second
    assert 0.05 <= after_eval < 0.40 and 0.05 <= after_save < 0.40
    assert bar.step_tokens == [1000] * 4
    assert bar.train_seconds == sum(bar.step_seconds)
    assert abs(bar.tokens_per_second - 4000 / sum(bar.step_seconds)) < 1e-6


def test_a_step_that_never_ended_does_not_shift_the_next() -> None:
    bar = ProgressCallback(enabled=False)
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, is_world_process_zero=True)
    _step(bar, state, 0.05, 0.0)
    bar.on_step_begin(None, state, None)  # the loop left before this step's end
    time.sleep(0.3)
    bar.on_train_begin(None, state, None)  # a new train(): its first step runs from its own begin
    _step(bar, state, 0.05, 0.0)
    assert len(bar.step_seconds) == len(bar.step_began) == len(bar.step_tokens) == 2
    assert 0.05 <= bar.step_seconds[1] < 0.3


def test_steady_tokens_per_second_leaves_the_warm_up_steps_out() -> None:
    """A slow first step (compilation, autotuning) is in tokens_per_second, not in the steady figure."""
    bar = ProgressCallback(enabled=False)
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, is_world_process_zero=True)
    _step(bar, state, 0.3, 0.0)
    for _ in range(4):
        _step(bar, state, 0.02, 0.0)
    seconds = bar.step_seconds
    assert bar.warmup_steps() == 2
    assert abs(bar.steady_tokens_per_second - 3000 / sum(seconds[2:])) < 1e-6
    assert abs(bar.tokens_per_second - 5000 / sum(seconds)) < 1e-6
    assert bar.steady_tokens_per_second > 2 * bar.tokens_per_second
