"""Trainer callbacks: a rich progress bar with loss and real tokens/s, a checkpoint on SIGTERM/SIGINT, and the
run's own files written into every checkpoint."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """A rich progress bar (main process only) and the time and real tokens of every training step.

    A step's time runs from the previous step's end to its own end, measured where the work runs: on a GPU by CUDA
    events on the device's timeline (the host may be a step ahead of the GPU when nothing makes it wait, and reading
    a host clock at step boundaries would then miss the GPU's work), on a CPU by the host clock. So the data loading
    and logging between steps count; evaluation and checkpoint saving do not (a step after either runs from its own
    begin). The first steps of a GPU run pay for kernel autotuning, attention plan building and allocator growth;
    `steady_tokens_per_second` leaves them out so short benchmark runs measure what a long run would see.
    """

    def __init__(self, console: Any = None, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None
        self.step_tokens: list[int] = []  # real tokens of every process
        self.step_began: list[float] = []  # epoch seconds, to line steps up with outside samplers (nvidia-smi)
        self.loss: float | None = None
        self._clock = StepClock()
        self._tokens_before = 0

    @property
    def step_seconds(self) -> list[float]:
        """Seconds of every step of this session (waits for the device to finish the steps it still runs)."""
        return self._clock.seconds()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the bar at the step the run starts (or resumes) from."""
        self._clock.interrupted()  # a new train() call: its first step runs from its own begin
        if not (self.enabled and state.is_world_process_zero):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", tps="-")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Mark where this optimizer step begins and remember the token count before it."""
        self._clock.begin()
        del self.step_began[len(self.step_tokens):]  # a step that began and never ended
        self.step_began.append(time.time())
        self._tokens_before = int(state.num_input_tokens_seen)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Mark the step's end and record its tokens; advance the bar (with the steps the device has finished)."""
        self._clock.end()
        self.step_tokens.append(int(state.num_input_tokens_seen) - self._tokens_before)
        if self.progress is not None:
            rate = self._rate(self._clock.seconds(wait=False))
            self.progress.update(self.task, completed=state.global_step, tps="-" if rate is None else f"{rate:,.0f}",
                                 loss=f"{self.loss:.4f}" if self.loss is not None else "-")

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Evaluation ran since the last step: the next step's time starts at its own begin."""
        self._clock.interrupted()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A checkpoint was saved since the last step: the next step's time starts at its own begin."""
        self._clock.interrupted()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Show the latest training loss."""
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Leave the finished bar on screen."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    @property
    def train_seconds(self) -> float:
        """Seconds spent in this session's training steps."""
        return sum(self.step_seconds)

    @property
    def tokens_per_second(self) -> float:
        """Real (non-padding) tokens per second of training step time in this session, all processes."""
        return self._rate(self.step_seconds) or 0.0

    def _rate(self, seconds: list[float], skip: int = 0) -> float | None:
        """Real tokens per second over the steps `seconds` times (the first ones), from step `skip` on; None when
        they took no time."""
        total = sum(seconds[skip:])
        return sum(self.step_tokens[skip:len(seconds)]) / total if total else None

    def warmup_steps(self) -> int:
        """Steps left out of the steady figure: a fifth of the run, at least 2, never all of it."""
        n = len(self.step_seconds)
        return min(max(2, n // 5), max(n - 1, 0))

    @property
    def steady_tokens_per_second(self) -> float:
        """Real tokens per second over the steps after warm-up (0.0 when nothing ran)."""
        return self._rate(self.step_seconds, self.warmup_steps()) or 0.0

    def steady_window(self) -> tuple[float, float] | None:
        """(start, end) epoch seconds of the steps after warm-up, or None when nothing ran."""
        skip = self.warmup_steps()
        if len(self.step_began) <= skip:
            return None
        return self.step_began[skip], self.step_began[-1] + self.step_seconds[-1]


class StepClock:
    """Step boundaries on the timeline where the steps run: CUDA events on a GPU (recorded without waiting for the
    device), the host clock elsewhere. A step runs from the previous step's end unless something outside training
    (evaluation, saving) ran between them, or it is the first of the session: then from its own begin."""

    def __init__(self) -> None:
        self._cuda: bool | None = None  # decided at the first step: by then a GPU run has its model on the device
        self._starts: list[Any] = []  # per step: the mark its time runs from
        self._ends: list[Any] = []
        self._resolved: list[float] = []
        self._chain = False  # whether the next step's time runs from the previous end

    def _mark(self) -> Any:
        """A point on the timeline: a recorded CUDA event, or the host clock."""
        if not self._cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        """A step begins (after its first batch was fetched)."""
        if self._cuda is None:
            import torch

            self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        del self._starts[len(self._ends):]  # a step that began and never ended (a loop left mid-window)
        begin = self._mark()
        self._starts.append(self._ends[-1] if self._chain and self._ends else begin)
        self._chain = True

    def end(self) -> None:
        """The step that began last ends."""
        self._ends.append(self._mark())

    def interrupted(self) -> None:
        """Work that is not training ran after the last step's end."""
        self._chain = False

    def seconds(self, wait: bool = True) -> list[float]:
        """Seconds of every finished step; without `wait`, only those the device has finished (no host sync)."""
        while len(self._resolved) < len(self._ends):
            i = len(self._resolved)
            start, end = self._starts[i], self._ends[i]
            if not self._cuda:
                self._resolved.append(end - start)
                continue
            if not wait and not end.query():
                break
            end.synchronize()
            self._resolved.append(start.elapsed_time(end) / 1000)
        return list(self._resolved)


class SaveOnSignal(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint and stop; a second signal kills at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only, as Python requires)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to whoever had them."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        # Restore the old handlers so that a second Ctrl-C does not wait for the step to finish.
        self.uninstall()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Turn a received signal into save-and-stop at this step boundary."""
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


class WriteOnSave(TrainerCallback):
    """After each checkpoint the Trainer saves, `write(folder, state)` on the main process (the card, the config)."""

    def __init__(self, write: Callable[[Path, Any], None]) -> None:
        self.write = write

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Add the run's files to the checkpoint just written (`checkpoint-<global_step>`, Trainer's naming)."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.write(folder, state)
