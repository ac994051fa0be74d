"""Imported by bench/train_throughput.py --profile: a torch.profiler over three steady steps of `oasst train`."""

from __future__ import annotations

import json
import os
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
            # Kernels only: the launching CPU ops report the same device time again as their own.
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
            total_cuda = sum(e.self_device_time_total for e in kernels) / 1e3 / STEPS
            counts = sum(e.count for e in kernels) // STEPS
            header = f"profile of steps {START_STEP}-{START_STEP + STEPS - 1}: {total_cuda:.0f} ms GPU time per step\n"
            path = os.environ["OASST_PROFILE_OUT"]
            with open(path, "w") as fh:
                fh.write(header + f"{counts} kernels per step\n" + text)
            with open(path + ".json", "w") as fh:
                json.dump({"gpu_ms_per_step": round(total_cuda, 1), "kernels_per_step": counts,
                           "top": text.splitlines()}, fh)
            self.prof = None


add_trainer_callback(ProfileSteps)
