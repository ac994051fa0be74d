"""LoRA's update added inside the matmul that computes it, not by a clone, a scale and an add over the layer output.

    from oasst_train.lora_fused import fuse_lora_forward, unfuse_lora_forward
    fuse_lora_forward(peft_model)      # LoRA linears switched: 128 for Falcon-7B's four targets
    unfuse_lora_forward(peft_model)    # peft's own forward again

Why: peft 0.21's LoRA forward (`lora.bnb.Linear4bit`, `lora.Linear`) computes `result = base(x)`, a defensive
`result.clone()` (4-bit only), `lora_B(lora_A(dropout(x))) * scaling` and `result + that`: beside the two thin
matmuls, a copy, a scale and an add over the full [tokens, out_features] output (out_features 18,176 for Falcon-7B's
dense_h_to_4h), and in backward a scale of that whole gradient. On an H200 those element-wise kernels took a large
share of the fast recipe's GPU time after the matmuls. Here the update is one
`addmm(result, lora_A(dropout(x)), lora_B.weight.t(), alpha=scaling)`: the GEMM scales and accumulates into the base
output (addmm's own copy of `result` replaces peft's clone), and addmm's backward scales only the rank-r tensors.
peft's dropout module still runs, so the RNG stream and the masks are the ones peft draws.

Same values as peft up to rounding (scale and add happen in the GEMM's fp32 accumulator rather than after rounding
to bf16), same output dtype; checked on a tiny Falcon, 4-bit and plain, fp32 and bf16 autocast, in
tests/train/test_lora_fused.py. Every call that is not plain single-adapter LoRA (adapters disabled or merged,
several active adapters, `adapter_names` or any other argument, DoRA and other variants, `lora_bias`, hooks on
lora_B) runs peft's original forward, which stays reachable as `module._oasst_lora_original`. Where the base output's
dtype is not the dtype addmm would compute in (e.g. fp32 LayerNorm outputs reaching a 4-bit layer under autocast),
the LoRA update is added as peft adds it, without the clone.
"""

from __future__ import annotations

import types
from typing import Any


def fuse_lora_forward(model: Any) -> int:
    """Switch every peft LoRA linear (4-bit or plain base) of `model` to the fused forward; returns the count."""
    kinds = _lora_kinds()
    switched = 0
    for module in model.modules():
        kind = kinds.get(type(module))  # exact types: a subclass may have a forward of its own
        if kind is None or getattr(module, "_oasst_lora_original", None) is not None:
            continue
        module._oasst_lora_original = module.forward
        module._oasst_lora_kind = kind
        module.forward = types.MethodType(_fused_forward, module)
        switched += 1
    return switched


def unfuse_lora_forward(model: Any) -> int:
    """Give every module `fuse_lora_forward` switched its original forward back; returns the count."""
    restored = 0
    for module in model.modules():
        original = module.__dict__.pop("_oasst_lora_original", None)
        if original is None:
            continue
        del module._oasst_lora_kind
        if getattr(original, "__func__", None) is type(module).forward:
            del module.forward  # the class's forward again, not a bound copy that pins the module
        else:
            module.forward = original
        restored += 1
    return restored


def fused_lora_modules(model: Any) -> int:
    """Number of LoRA modules of `model` that `fuse_lora_forward` switched."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_lora_original", None) is not None)


def _lora_kinds() -> dict[type, str]:
    """peft's LoRA linear classes this module knows the forward of: "4bit" (bitsandbytes base) and "plain"."""
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora import layer as lora_layer

    kinds: dict[type, str] = {lora_layer.Linear: "plain"}
    linear4bit = getattr(lora_bnb, "Linear4bit", None)  # defined only when bitsandbytes has 4-bit support
    if linear4bit is not None:
        kinds[linear4bit] = "4bit"
    return kinds


def _single_plain_adapter(module: Any) -> str | None:
    """The one active adapter when this call is plain LoRA the fused path computes; None sends it to peft."""
    if module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in module.lora_variant or module.use_dora.get(name, False):
        return None
    lora_b = module.lora_B[name]
    # The fused path reads lora_B.weight directly, so anything lora_B's own call would add must be absent.
    if lora_b.bias is not None or lora_b._forward_hooks or lora_b._forward_pre_hooks:
        return None
    if not isinstance(module.scaling[name], (int, float)):
        return None
    return name


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's LoRA forward for one plain adapter with the update added by addmm (see the module doc)."""
    import torch

    name = None if args or kwargs else _single_plain_adapter(self)
    if name is None:
        return self._oasst_lora_original(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    scaling = self.scaling[name]
    result = self.base_layer(x)
    # The input casts are peft's, per class, so dropout and lora_A see the dtypes they see under peft. The 4-bit class
    # asks torch.is_autocast_enabled() without a device, which is CUDA's state only (peft 0.21): kept as is.
    convert = self._oasst_lora_kind == "plain" or not torch.is_autocast_enabled()
    if convert:
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
    h = lora_a(self.lora_dropout[name](x))

    device = result.device.type
    autocast = torch.is_autocast_enabled(device)
    # addmm under autocast computes in the autocast dtype; without, all three operands must share one dtype. Either
    # way the output dtype must be the base output's, which is what peft returns whenever h has that dtype too.
    compute = torch.get_autocast_dtype(device) if autocast else lora_b.weight.dtype
    if result.dtype == h.dtype == compute:
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(),
                          alpha=scaling)
        return out.view(result.shape)

    # Mixed dtypes: peft's arithmetic, minus the clone (nothing here writes into `result` in place).
    update = lora_b(h) * scaling
    if self._oasst_lora_kind == "plain":
        return (result + update).to(result.dtype)
    if convert:
        update = update.to(result.dtype)
    return result + update
