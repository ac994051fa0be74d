"""Per-step wall time and tokens, for a steady-state throughput that leaves out warm-up steps."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time and real-token count of every optimizer step of this session.

    The first steps of a GPU run pay for kernel autotuning, attention plan building and allocator growth;
    `steady_tokens_per_second` skips them so short benchmark runs measure what a long run would see.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.began: list[float] = []  # epoch seconds, to line steps up with outside samplers (nvidia-smi)
        self._started = 0.0
        self._tokens_before = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remember when this optimizer step began and the token count before it."""
        self._started = time.perf_counter()
        self.began.append(time.time())
        self._tokens_before = int(state.num_input_tokens_seen)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step's wall time and the real tokens it consumed (all processes)."""
        self.seconds.append(time.perf_counter() - self._started)
        self.tokens.append(int(state.num_input_tokens_seen) - self._tokens_before)

    def warmup_steps(self) -> int:
        """Steps left out of the steady figure: a fifth of the run, at least 2, never all of it."""
        n = len(self.seconds)
        return min(max(2, n // 5), max(n - 1, 0))

    @property
    def steady_tokens_per_second(self) -> float:
        """Real tokens per second over the steps after warm-up (0.0 when nothing ran)."""
        skip = self.warmup_steps()
        seconds = sum(self.seconds[skip:])
        return sum(self.tokens[skip:]) / seconds if seconds else 0.0

    def steady_window(self) -> tuple[float, float] | None:
        """(start, end) epoch seconds of the steps after warm-up, or None when nothing ran."""
        skip = self.warmup_steps()
        if len(self.began) <= skip:
            return None
        return self.began[skip], self.began[-1] + self.seconds[-1]
