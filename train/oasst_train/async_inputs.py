"""async_inputs: a training batch reaches the GPU without the host waiting for the GPU, so the host collates and
launches step n + 1 while the GPU still runs step n.

    from oasst_train.async_inputs import async_inputs, loader_args
    args = SFTConfig(..., **loader_args(cfg.async_inputs))   # pinned batches, non-blocking copies (accelerate)
    async_inputs(sft_trainer)                                # after the trainer is built; True when applied

Why: two host waits began every step of a packed run. accelerate's data loader copies each batch to the GPU with a
blocking copy, which waits until the GPU has finished everything queued before it (the whole previous step); the
host then collates the next batch and launches the first kernels while the GPU sits idle. And the fused attention's
planner read the packed rows' example starts back from the GPU (one more wait) to hand flash's varlen kernel its
boundaries. On an H100 the fast Falcon recipe's profile charged ~15 ms of every ~655 ms step to this
(bench/_profile_hook.py: collate 5.8 ms, training_step 8.1 ms, attention_plan 0.7 ms of GPU idle).

What changes, and what does not:
- batches are pinned and copied with `non_blocking=True` (accelerate's own `non_blocking` setting, transformers'
  `accelerator_config`); on a machine without CUDA nothing changes;
- packed batches from trl's padding-free collator carry their example boundaries (`cu_seq_lens_q`, `max_length_q`):
  they are recomputed on the host from the position ids by the planner's own rule (`packed_boundaries`) and the
  planner takes them instead of reading the GPU (`use_collated_boundaries`). The kernel gets the same boundaries
  (tests compare plans and logits). Guarded by the patch registry (`collated_boundaries`): where trl's collator no
  longer makes those keys, the planner reads the boundaries back as before, with one warning line.
- a logging step still waits (the Trainer reads the loss): the recipes log every 5th or 10th step;
- a resumed run's first epoch: accelerate's `skip_first_batches` builds the loader that skips the batches already
  seen without `non_blocking`; `resumed_copies_non_blocking` gives it back (patch `resume_non_blocking`; where
  transformers or accelerate changed, that epoch copies with a wait, as before, with one warning line).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PATCH = "collated_boundaries"
RESUME_PATCH = "resume_non_blocking"


def loader_args(enabled: bool) -> dict[str, Any]:
    """The TrainingArguments that pin batches and copy them to the GPU without a host wait (empty: off or no CUDA)."""
    import torch

    if not enabled or not torch.cuda.is_available():
        return {}
    return {"dataloader_pin_memory": True, "accelerator_config": {"non_blocking": True}}


def async_inputs(trainer: Any) -> bool:
    """Make `trainer`'s packed batches carry host-computed example boundaries its fused attention takes (see the
    module docstring); True when the planner takes them."""
    from oasst_model import patches
    from oasst_model.attention import COLLATED_KEYS, use_collated_boundaries, varlen_device
    from oasst_model.packing import packed_boundaries

    if not any(getattr(m, "_oasst_plan", None) is not None for m in trainer.model.modules()):
        patches.not_applicable(PATCH, "no fused attention in the model: no plan to make")
        return False
    if not getattr(trainer, "padding_free", False):  # trl's SFTTrainer: packing (bfd) or padding_free
        patches.not_applicable(PATCH, "batches are not packed into padding-free rows")
        return False
    device = next(trainer.model.parameters()).device
    if not varlen_device(device):
        patches.not_applicable(PATCH, f"packed rows on {device.type}: the block mask, built from the position ids")
        return False
    if not patches.applies(PATCH):
        return False
    collate = trainer.data_collator
    boundaries_key, longest_key = COLLATED_KEYS

    def collating(features: Any) -> Any:
        batch = collate(features)
        if boundaries_key in batch and longest_key in batch and "position_ids" in batch \
                and "attention_mask" not in batch:
            boundaries, longest = packed_boundaries(batch["position_ids"])
            for key in (boundaries_key, boundaries_key.replace("_q", "_k")):
                if key in batch:
                    batch[key] = boundaries
            for key in (longest_key, longest_key.replace("_q", "_k")):
                if key in batch:
                    batch[key] = longest
        return batch

    trainer.data_collator = collating
    use_collated_boundaries(trainer.model)
    patches.activated(PATCH)
    return True


@contextmanager
def resumed_copies_non_blocking(trainer: Any) -> Iterator[None]:
    """While `trainer` resumes: the loader transformers rebuilds to skip the seen batches of the first epoch copies
    them as the original loader does (non-blocking where loader_args asked for it)."""
    from oasst_model import patches

    if not getattr(getattr(trainer.args, "accelerator_config", None), "non_blocking", False):
        yield  # loader_args set nothing (off, or no CUDA): the rebuilt loader copies as the original does
        return
    if not patches.applies(RESUME_PATCH):
        yield
        return
    import transformers.trainer as hf_trainer

    own = hf_trainer.skip_first_batches

    def skipping(dataloader: Any, num_batches: int = 0) -> Any:
        skipped = own(dataloader, num_batches)
        if getattr(dataloader, "_non_blocking", False) and hasattr(skipped, "_non_blocking"):
            skipped._non_blocking = True
            patches.activated(RESUME_PATCH, once=True)
        return skipped

    hf_trainer.skip_first_batches = skipping
    try:
        yield
    finally:
        hf_trainer.skip_first_batches = own
