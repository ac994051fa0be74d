"""GPU idle stretches of a finished torch.profiler, charged to the host work running meanwhile (bench only).

Shared by bench/_profile_hook.py (training steps) and bench/eval_falcon_speed.py --profile kernels (scoring): host
phases are wrapped in record_function labels `oasst::...` in the profiled process only (`label`), and every idle
stretch between kernels is charged to the innermost label and host op running at its middle.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

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


def label_calls(owner: Any, name: str, label: str) -> None:
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
