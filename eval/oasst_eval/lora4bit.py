"""Score LoRA over a 4-bit base as one matrix product per layer: the adapter folded into the dequantized weight.

    from oasst_eval.lora4bit import merged_4bit_lora
    with merged_4bit_lora(model) as layers:     # layers: how many LoRA Linear4bit layers now fold
        lm_eval.simple_evaluate(model=lm, ...)

Why: for a batch of many tokens, bitsandbytes (0.50) scores a `Linear4bit` by dequantizing its NF4 weight to
the compute dtype and running one dense product (its own 4-bit kernel only wins below a few hundred rows on
Hopper). peft then runs the adapter beside it: the input cast to the adapter's fp32, lora_A, lora_B, a scale,
a cast back and an add over the whole [tokens, out_features] output, in every layer. On an H200 (Falcon-7B, r 64
on the four linears, 2,000 HellaSwag items) that unmerged adapter cost about 20% of the scoring time. Merging it
for good would re-quantize the weights (another model); instead each forward here computes
W' = dequant(W) + scaling * B @ A in the compute dtype (one rank-r product over the weight: for a 16k-token
batch about 0.5% of the layer's FLOPs) and then x @ W'^T. The weights stay NF4 in memory (W' lives only during
the layer's forward, like bitsandbytes' own dequantized copy), and the output is the adapter's within the
rounding of W' to the compute dtype, what a 16-bit merged model has.

Only inference (no autograd) with one plain LoRA adapter active folds (the test `oasst train`'s fused LoRA
uses); anything else (DoRA, a LoRA bias, hooks on lora_B, several or mixed adapters, a disabled or merged
adapter, gradients, bitsandbytes' CPU-packed weights) runs peft's own forward, decided per call.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from oasst_model.lora_fused import single_plain_adapter  # standard library only at import


@contextlib.contextmanager
def merged_4bit_lora(model: Any) -> Iterator[int]:
    """Inside: every peft LoRA `Linear4bit` of `model` scores with its adapter folded into W; yields their count.

    Registered as the `eval_folded_4bit_lora` patch: when peft or bitsandbytes changed what is read here, nothing is
    folded (peft's own forward, one warning line) and the count is 0.
    """
    from oasst_model import patches

    layers = _lora_4bit_layers(model)
    if layers and not patches.applies("eval_folded_4bit_lora", problem=patches.check_lora_module(layers[0])):
        layers = []
    patches.activated("eval_folded_4bit_lora", len(layers))
    for layer in layers:
        layer.forward = types.MethodType(_folded_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute goes; the class's (peft's) forward is back


def _lora_4bit_layers(model: Any) -> list[Any]:
    """peft's LoRA wrappers around bitsandbytes `Linear4bit` layers, in module order."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support: nothing is 4-bit LoRA
        return []
    return [m for m in model.modules() if isinstance(m, LoraLinear4bit)]


def _foldable(layer: Any, kwargs: dict[str, Any]) -> str | None:
    """The one active plain-LoRA adapter name when this call can fold it, else None."""
    import torch

    if torch.is_grad_enabled() or kwargs:
        return None
    name = single_plain_adapter(layer)  # the training path's test: one plain adapter, nothing extra on lora_B
    if name is None:
        return None
    quant_state = getattr(layer.get_base_layer().weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
        return None
    return name


def _folded_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """x @ (dequant(W) + scaling * B @ A)^T + bias, in the base layer's compute dtype."""
    name = _foldable(self, kwargs) if not args else None
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    import bitsandbytes.functional as bnb_functional
    import torch.nn.functional as F

    base = self.get_base_layer()
    dtype = base.compute_dtype or x.dtype
    weight = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    # One GEMM with beta=1: the sum is rounded to `dtype` once, as a 16-bit merge rounds it.
    weight.addmm_(self.lora_B[name].weight.to(dtype), self.lora_A[name].weight.to(dtype), alpha=self.scaling[name])
    bias = base.bias.to(dtype) if base.bias is not None else None
    return F.linear(x.to(dtype), weight, bias).to(x.dtype)
