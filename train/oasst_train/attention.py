"""Fused attention for Falcon's multi-query layers, and packed rows that cannot leak.

    from oasst_train.attention import use_fused_attention
    layers = use_fused_attention(model)      # 32 for Falcon-7B, 0 for models it does not apply to

Why: Falcon-7B hands `scaled_dot_product_attention` keys and values with 1 head against 71 query heads plus a
materialised mask. Every fused kernel (flash, memory-efficient, cuDNN) refuses that, so PyTorch falls back to
the math path: fp32 S x S scores per head (one layer at 16 x 512: 12.8 ms and 4.9 GiB for forward + backward on
an H200, against 2.35 ms and 0.84 GiB fused; ../shared/docs/gpu.md).

What the fused path does, per forward of the whole model (decided once, not per layer):
- rows padded on the right only (training batches, lm-eval's batches) or not padded: keys/values expanded to
  every query head (a view) and `is_causal=True` without a mask. Exact for every real token: with right
  padding a real token never sees a pad token under a causal mask. Pad positions get other (finite) values
  than before; nothing reads them (their labels are -100).
- packed rows (position ids restart inside a row, as trl's padding-free collator makes them): a block-diagonal
  causal mask built here from the position ids, so packed examples never see each other whatever the
  installed transformers does with position ids (5.17 lets them leak; ../shared/docs/gpu.md).
- anything else (left padding, a 4-D mask from the caller): the mask transformers built, with expanded keys.
- decoding with a filled KV cache, ALiBi models, `output_attentions`: transformers' own forward, unchanged.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

# How keys/values reach the kernel: "expand" (a stride-0 view over heads) or "gqa" (sdpa's enable_gqa).
# The GPU benchmark times both; expand is the one measured to reach cuDNN attention on the H200.
KV_MODE = "expand"


class _Plan:
    """What the current forward pass's attention layers do; set by a pre-hook on the Falcon body."""

    __slots__ = ("mode", "mask")

    def __init__(self) -> None:
        self.mode: str | None = None  # None: transformers' forward; "causal", "block", "given"
        self.mask: Any = None


def use_fused_attention(model: Any) -> int:
    """Route Falcon attention through sdpa's fused kernels (see the module doc); returns the layers switched."""
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconModel

    bodies = [m for m in model.modules() if isinstance(m, FalconModel)]
    if not bodies:
        return 0
    switched = 0
    for body in bodies:
        if getattr(body, "_oasst_plan", None) is not None:
            continue
        if getattr(body.config, "alibi", False):
            continue  # ALiBi adds a per-head bias to the mask: nothing fused to gain, transformers' path stays
        plan = _Plan()
        body._oasst_plan = plan
        body.register_forward_pre_hook(_planner(body, plan), with_kwargs=True)
        for module in body.modules():
            # Exactly FalconAttention: FalconFlashAttention2 has its own kernel already.
            if type(module) is FalconAttention:
                module._oasst_plan = plan
                module._oasst_original = module.forward
                module.forward = types.MethodType(_fused_forward, module)
                switched += 1
    return switched


def fused_attention_layers(model: Any) -> int:
    """Number of attention layers that `use_fused_attention` switched in `model`."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_original", None) is not None)


def block_causal_mask(position_ids: Any, attention_mask: Any = None) -> Any:
    """[B, 1, L, L] bool: token i sees token j iff j <= i and both lie in the same packed example.

    An example starts wherever the position id is 0. Keys that `attention_mask` marks as padding are hidden too,
    except from themselves, so no row is empty (an empty row makes sdpa return NaN).
    """
    import torch

    example = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    mask = (example[:, :, None] == example[:, None, :]) & causal
    if attention_mask is not None:
        mask &= attention_mask.bool()[:, None, :]
        mask |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return mask[:, None]


_BODY_PARAMS: dict[type, list[str]] = {}


def _planner(body: Any, plan: _Plan) -> Any:
    """The forward pre-hook that decides, once per forward, how every attention layer runs."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        names = _BODY_PARAMS.setdefault(type(module), list(inspect.signature(module.forward).parameters))
        given = dict(zip(names, args, strict=False))
        given.update(kwargs)
        plan.mode, plan.mask = _decide(given)

    return hook


def _decide(given: dict[str, Any]) -> tuple[str | None, Any]:
    """(mode, mask) for one forward from the body's arguments."""
    import torch

    cache = given.get("cache", given.get("past_key_values"))
    if given.get("output_attentions") or (cache is not None and cache.get_seq_length() > 0):
        return None, None
    attention_mask = given.get("attention_mask")
    position_ids = given.get("position_ids")
    if attention_mask is not None and attention_mask.dim() != 2:
        return "given", None
    checks = []
    if position_ids is not None:
        checks.append((position_ids[..., 1:] != position_ids[..., :-1] + 1).any())
    if attention_mask is not None:
        checks.append((attention_mask[:, 1:] > attention_mask[:, :-1]).any())
    # One host sync for both questions.
    flags = torch.stack(checks).tolist() if checks else []
    packed = bool(flags[0]) if position_ids is not None else False
    unsorted_padding = bool(flags[-1]) if attention_mask is not None else False
    if packed:
        return "block", block_causal_mask(position_ids, attention_mask)
    if unsorted_padding:
        return "given", None  # left padding: the mask transformers built is right, only keys get expanded
    return "causal", None


def _fused_forward(self: Any, hidden_states: Any, alibi: Any, attention_mask: Any, position_ids: Any = None,
                   layer_past: Any = None, use_cache: bool = False, output_attentions: bool = False,
                   position_embeddings: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """FalconAttention.forward (rotary, no ALiBi) with fused sdpa kernels; falls back to the original otherwise."""
    import torch
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    plan = self._oasst_plan
    if plan.mode is None or alibi is not None or output_attentions or position_embeddings is None:
        return self._oasst_original(hidden_states, alibi, attention_mask, position_ids=position_ids,
                                    layer_past=layer_past, use_cache=use_cache,
                                    output_attentions=output_attentions,
                                    position_embeddings=position_embeddings, **kwargs)
    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch, length, heads, head_dim = query.shape
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        # Only reached on a prefill (the planner hands a filled cache to the original forward).
        key, value = layer_past.update(key, value, self.layer_idx)
    extra: dict[str, Any] = {}
    if key.shape[1] != heads:
        if KV_MODE == "gqa":
            extra["enable_gqa"] = True
        else:
            key = key.expand(batch, heads, key.shape[2], head_dim)
            value = value.expand(batch, heads, value.shape[2], head_dim)
    if plan.mode == "causal":
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=length > 1, **extra)
    else:
        mask = plan.mask if plan.mode == "block" else attention_mask
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, **extra)
    out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return self.dense(out), None
