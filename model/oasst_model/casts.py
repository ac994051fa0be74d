"""LayerNorm outputs handed on in the autocast dtype once, instead of fp32 that every consumer casts again.

    from oasst_model.casts import cast_norm_outputs
    cast_norm_outputs(model)        # number of LayerNorm modules hooked

Why: autocast runs `layer_norm` in fp32 and returns fp32. In Falcon one norm output feeds the fused QKV layer,
the MLP's first layer and their LoRA branches (dropout, then lora_A): each casts the same fp32 tensor to bf16
on its own, the LoRA dropouts run in fp32, and in backward every bf16 gradient is cast back to fp32 and summed
in fp32. A profile of the fast recipe on an H200 had 21% of GPU time in copies (bench/train_throughput.py
--profile). Every consumer casts to bf16 before computing anyway, so one cast at the norm computes the same
values, up to the rounding of the dropout scale and of the gradient sum (checked on a tiny Falcon in
tests/train/test_casts.py).
"""

from __future__ import annotations

from typing import Any


def cast_norm_outputs(model: Any) -> int:
    """Hook every `nn.LayerNorm` of `model` to return the autocast dtype under autocast; returns the count."""
    import torch

    from oasst_model import patches

    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.LayerNorm) and not getattr(m, "_oasst_cast_hook", False)]
    if not norms or not patches.applies("cast_norm_outputs"):
        return 0
    for module in norms:
        module.register_forward_hook(_to_autocast_dtype)
        module._oasst_cast_hook = True
    patches.activated("cast_norm_outputs", len(norms))
    return len(norms)


def _to_autocast_dtype(module: Any, inputs: Any, output: Any) -> Any:
    """The norm's output in the autocast dtype when autocast is on and upcast it; else unchanged."""
    import torch

    device = output.device.type
    if output.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return output
