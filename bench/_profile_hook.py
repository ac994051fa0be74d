"""Imported by bench/train_throughput.py --profile: a torch.profiler over three steady steps of `oasst train`.

Besides the top kernels it says where the GPU waits: every idle stretch between kernels is charged to the host
work running meanwhile. The trainer's phases (collate, training step, loss, backward, token count, clipping,
callbacks, our attention planner) are wrapped in record_function labels `oasst::...` in this process only, so the
profile names them; torch labels the data loader and the optimizer step itself.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from transformers import TrainerCallback

from _common import add_trainer_callback  # bench/ is on sys.path (the launcher puts it there)

# Which steps: OASST_PROFILE_START and OASST_PROFILE_STEPS (train_throughput.py puts them last, outside its steady
# figure).
START_STEP = int(os.environ.get("OASST_PROFILE_START", "6"))
STEPS = int(os.environ.get("OASST_PROFILE_STEPS", "3"))


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps START_STEP .. START_STEP + STEPS - 1; write the top kernels to OASST_PROFILE_OUT
    (text) and the per-step figures to OASST_PROFILE_OUT.json."""

    def __init__(self) -> None:
        self.prof: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start profiling at the first profiled step."""
        if state.global_step == START_STEP and self.prof is None:
            import torch

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stop after the last profiled step and write the tables."""
        if self.prof is not None and state.global_step == START_STEP + STEPS:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            text = averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
            # Kernels only: the launching CPU ops report the same device time again as their own, and the GPU-side
            # ranges of record_function labels (ours, the optimizer's) span kernels and idle time alike.
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and not _label_range(e)]
            total_cuda = sum(e.self_device_time_total for e in kernels) / 1e3 / STEPS
            counts = sum(e.count for e in kernels) // STEPS
            header = f"profile of steps {START_STEP}-{START_STEP + STEPS - 1}: {total_cuda:.0f} ms GPU time per step\n"
            path = os.environ["OASST_PROFILE_OUT"]
            with open(path, "w") as fh:
                fh.write(header + f"{counts} kernels per step\n" + text)
            gaps = idle_gaps(self.prof.events(), STEPS)
            with open(path, "a") as fh:
                fh.write(f"\nGPU idle {gaps['idle_ms_per_step']} ms of {gaps['span_ms_per_step']} ms per step; "
                         "host work during the idle stretches (ms per step):\n")
                for label, ms in gaps["idle_by_phase"].items():
                    fh.write(f"  {ms:8.2f}  {label}\n")
                fh.write("largest stretches (ms, phase, innermost host op):\n")
                for ms, label, op in gaps["largest"]:
                    fh.write(f"  {ms:8.2f}  {label}  {op}\n")
            with open(path + ".json", "w") as fh:
                json.dump({"gpu_ms_per_step": round(total_cuda, 1), "kernels_per_step": counts,
                           "gaps": gaps, "top": text.splitlines()}, fh)
            self.prof = None


PHASE = "oasst::"
# Host-side labels a GPU wait is charged to: ours and torch's own (the data loader's next batch, the optimizer step).
LABELS = (PHASE, "enumerate(DataLoader)", "Optimizer.")
MIN_GAP_US = 20.0  # shorter stretches are launch latency between back-to-back kernels


def idle_gaps(events: Any, steps: int) -> dict[str, Any]:
    """GPU idle time per step over the profiled span, charged to the innermost `oasst::` phase (or torch's own
    DataLoader / Optimizer label) running on the host meanwhile, with the largest single stretches."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    busy = sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == cuda and not _label_range(e))
    host = [e for e in events if e.device_type != cuda]
    if not busy or not host:
        return {"idle_ms_per_step": None, "span_ms_per_step": None, "idle_by_phase": {}, "largest": []}
    merged: list[list[float]] = []
    for start, end in busy:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    span = (min(e.time_range.start for e in host), max(merged[-1][1], max(e.time_range.end for e in host)))
    edges = [span[0]] + [x for pair in merged for x in pair] + [span[1]]
    stretches = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= MIN_GAP_US]
    labelled = [e for e in host if e.name.startswith(LABELS)]
    leaves = [e for e in host if e.name.startswith(("aten::", "cuda", "Torch-Compiled", "autograd::"))]
    by_phase: dict[str, float] = defaultdict(float)
    largest = []
    for a, b in stretches:
        mid = (a + b) / 2
        label = _innermost(labelled, mid) or "(no labelled phase)"
        op = _innermost(leaves, mid) or "-"
        by_phase[label] += b - a
        largest.append((round((b - a) / 1e3, 2), label, op))
    largest.sort(reverse=True)
    idle = sum(b - a for a, b in stretches)
    return {"idle_ms_per_step": round(idle / 1e3 / steps, 2),
            "span_ms_per_step": round((span[1] - span[0]) / 1e3 / steps, 2),
            "idle_by_phase": {k: round(v / 1e3 / steps, 2) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "largest": largest[:25]}


def _label_range(event: Any) -> bool:
    """Whether a device-side event is the GPU range of a record_function label rather than a kernel or copy."""
    name = getattr(event, "name", None) or getattr(event, "key", "")  # FunctionEvent / FunctionEventAvg
    return bool(getattr(event, "is_user_annotation", False)) or name.startswith((*LABELS, "ProfilerStep"))


def _innermost(events: list[Any], moment: float) -> str | None:
    """Name of the shortest event of `events` running at `moment` (the most specific label)."""
    running = [e for e in events if e.time_range.start <= moment <= e.time_range.end]
    if not running:
        return None
    return min(running, key=lambda e: e.time_range.end - e.time_range.start).name


def _label(owner: Any, name: str, label: str) -> None:
    """Wrap `owner.name` (a function attribute) in record_function(PHASE + label); absent targets are skipped."""
    import functools

    import torch

    original = getattr(owner, name, None)
    if original is None or getattr(original, "_oasst_labelled", False):
        return

    @functools.wraps(original)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(PHASE + label):
            return original(*args, **kwargs)

    labelled._oasst_labelled = True  # type: ignore[attr-defined]
    setattr(owner, name, labelled)


def label_phases() -> None:
    """Name the trainer's host phases in the profile (this process only; a missing target is skipped)."""
    import accelerate
    import trl
    from transformers.trainer_callback import CallbackHandler

    import oasst_model.attention as attention

    _label(trl.SFTTrainer, "training_step", "training_step")
    _label(trl.SFTTrainer, "_track_num_input_tokens", "track_input_tokens")
    _label(trl.SFTTrainer, "_clip_grad_norm", "clip_grad_norm")
    _label(trl.SFTTrainer, "_maybe_log_save_evaluate", "log_save_evaluate")
    _label(trl.SFTTrainer, "floating_point_ops", "floating_point_ops")
    _label(trl.SFTTrainer, "compute_loss", "compute_loss")
    _label(accelerate.Accelerator, "backward", "backward")
    for event in ("on_step_begin", "on_step_end", "on_log", "on_substep_end", "on_pre_optimizer_step",
                  "on_optimizer_step"):
        _label(CallbackHandler, event, "callbacks." + event)
    _label(attention, "_decide", "attention_plan")
    collators = getattr(trl.trainer.sft_trainer, "DataCollatorForLanguageModeling", None)
    if collators is not None:
        _label(collators, "__call__", "collate")


label_phases()
add_trainer_callback(ProfileSteps)
