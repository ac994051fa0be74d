"""Imported by bench/train_throughput.py --profile: a torch.profiler over three steady steps of `oasst train`.

Besides the top kernels it says where the GPU waits: every idle stretch between kernels is charged to the host
work running meanwhile. The trainer's phases (collate, training step, loss, backward, token count, clipping,
callbacks, our attention planner) are wrapped in record_function labels `oasst::...` in this process only, so the
profile names them; torch labels the data loader and the optimizer step itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from _common import add_trainer_callback  # bench/ is on sys.path (the launcher puts it there)
from _gaps import _label_range, idle_gaps, label_calls

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


def label_phases() -> None:
    """Name the trainer's host phases in the profile (this process only; a missing target is skipped)."""
    import accelerate
    import trl
    from transformers.trainer_callback import CallbackHandler

    import oasst_model.attention as attention

    label_calls(trl.SFTTrainer, "training_step", "training_step")
    label_calls(trl.SFTTrainer, "_track_num_input_tokens", "track_input_tokens")
    label_calls(trl.SFTTrainer, "_clip_grad_norm", "clip_grad_norm")
    label_calls(trl.SFTTrainer, "_maybe_log_save_evaluate", "log_save_evaluate")
    label_calls(trl.SFTTrainer, "floating_point_ops", "floating_point_ops")
    label_calls(trl.SFTTrainer, "compute_loss", "compute_loss")
    label_calls(accelerate.Accelerator, "backward", "backward")
    for event in ("on_step_begin", "on_step_end", "on_log", "on_substep_end", "on_pre_optimizer_step",
                  "on_optimizer_step"):
        label_calls(CallbackHandler, event, "callbacks." + event)
    label_calls(attention, "_decide", "attention_plan")
    collators = getattr(trl.trainer.sft_trainer, "DataCollatorForLanguageModeling", None)
    if collators is not None:
        label_calls(collators, "__call__", "collate")


label_phases()
add_trainer_callback(ProfileSteps)
