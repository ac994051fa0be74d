"""Fused attention for Falcon's multi-query layers, and packed rows that cannot leak.

    from oasst_model.attention import use_fused_attention
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
- packed rows (position ids restart inside a row, as trl's padding-free collator makes them; an example starts at
  every position id that does not continue the one before): each example attends to itself only, whatever the
  installed transformers does with position ids (5.17 lets them leak; ../shared/docs/gpu.md). On an Ampere or newer
  GPU in half precision, flash attention's variable-length kernel (`torch.nn.attention.varlen`, patch
  `varlen_attention`) with the example boundaries read from the position ids (or brought by the batch, computed
  on the host by the same rule: train option async_inputs): the work of each example alone.
  Elsewhere, or where torch lacks that kernel: a block-diagonal causal mask through sdpa, which computes (and
  masks) every pair of tokens in the row: quadratic in the row, 10,240 tokens for a padding-free batch of 20 x 512.
- anything else (left padding, a 4-D mask from the caller): the mask transformers built, with expanded keys.
- decoding with a filled KV cache, ALiBi models, `output_attentions`, attention dropout in training: transformers'
  own forward, unchanged.

Written for transformers 5.17 and 5.24 (`forward(hidden_states, alibi, attention_mask, ...)`, `_split_heads`) and
5.25 (`forward(hidden_states, attention_mask, ...)`, heads split inline): arguments are read by name from the
installed signature; heads are split here, by views, in the layouts of all three (transformers' list index syncs
the host with the GPU at every layer). The patch registry (oasst_model.patches, `falcon_fused_attention`) checks
the target before switching anything and leaves transformers' own attention in place, with a warning, when it
changed.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The packed-row rule is defined once, in oasst_model.packing (tests patch these names here).
from oasst_model.packing import block_causal_mask, boundaries_from_starts, example_starts

# The `cudnn_attention` setting's help, one text for train, eval, generate and chat (their defaults differ: see
# `cudnn_sdpa`).
CUDNN_ATTENTION_HELP = ("Let sdpa use cuDNN attention; off: flash or memory-efficient kernels, which need no plan per "
                        "new batch shape.")

# How keys/values reach the kernel: "expand" (a stride-0 view over heads) or "gqa" (sdpa's enable_gqa).
# The GPU benchmark times both; expand is the one measured to reach cuDNN attention on the H200.
KV_MODE = "expand"
# Where torch's variable-length attention runs (flash attention: CUDA, compute capability 8.0 or newer, half
# precision, head dims up to 256 in multiples of 8); tests add "cpu" and float32 with a reference kernel.
VARLEN_DEVICES = ("cuda",)
VARLEN_DTYPES = ("float16", "bfloat16")
# The smallest bound handed to the kernel as the longest example: one compiled graph for every batch whose examples
# are at most 512 tokens (Guanaco's max_length), instead of one per power of two met.
VARLEN_MIN_BOUND = 512
# The batch keys a packed batch's example boundaries and longest example come in (trl's padding-free collator's and
# transformers' flash-attention names): [N + 1] int32 on the batch's device, and a host int.
COLLATED_KEYS = ("cu_seq_lens_q", "max_length_q")


class _Plan:
    """What the current forward pass's attention layers do; set by a pre-hook on the Falcon body."""

    __slots__ = ("mode", "mask", "varlen", "collated")

    def __init__(self) -> None:
        self.mode: str | None = None  # None: transformers' forward; "causal", "block", "given", "varlen"
        self.mask: Any = None
        # "varlen": (example boundaries [N + 1] int32, longest example bound, kernel kwargs, position ids)
        self.varlen: Any = None
        # Whether a batch's collated boundaries (COLLATED_KEYS, made on the host by `packed_boundaries`) stand in
        # for reading the example starts back from the GPU (`use_collated_boundaries`).
        self.collated = False


def use_fused_attention(model: Any) -> int:
    """Route Falcon attention through sdpa's fused kernels (see the module doc); returns the layers switched.

    Guarded by the patch registry (oasst_model.patches, `falcon_fused_attention`): when transformers changed
    FalconAttention (its forward's parameters, the attributes read here), nothing is switched and transformers' own
    attention runs, with one warning line.
    """
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconModel

    from oasst_model import patches

    bodies = [m for m in model.modules() if isinstance(m, FalconModel)
              and getattr(m.config, "_attn_implementation", "sdpa") == "sdpa" and not getattr(m.config, "alibi", False)]
    if not bodies:
        return 0  # not Falcon, another kernel asked for, or ALiBi (a per-head bias in the mask: nothing to fuse)
    layers = [module for body in bodies for module in body.modules()
              # Exactly FalconAttention: a subclass (FalconFlashAttention2 before 5.25) has a kernel of its own.
              if type(module) is FalconAttention and getattr(module, "_oasst_original", None) is None]
    if not layers:
        return 0  # switched already
    # Attributes set in __init__ can only be checked on an instance.
    problem = patches.describe_missing(
        ("FalconAttention instance", patches.missing_attrs(layers[0], patches.FALCON_ATTENTION_ATTRS)),
        ("FalconConfig", patches.missing_attrs(bodies[0].config, patches.FALCON_CONFIG_ATTRS)))
    if not patches.applies("falcon_fused_attention", problem=problem):
        return 0
    params = _forward_params(FalconAttention)
    for body in bodies:
        if getattr(body, "_oasst_plan", None) is None:
            plan = _Plan()
            body._oasst_plan = plan
            body.register_forward_pre_hook(_planner(body, plan), with_kwargs=True)
    switched = 0
    todo = {id(module) for module in layers}
    for body in bodies:
        for module in body.modules():
            if id(module) in todo:
                module._oasst_plan = body._oasst_plan
                module._oasst_params = params
                module._oasst_original = module.forward
                module.forward = types.MethodType(_fused_forward, module)
                switched += 1
    patches.activated("falcon_fused_attention", switched)
    return switched


@contextmanager
def cudnn_sdpa(enabled: bool) -> Iterator[None]:
    """Inside the block sdpa may pick cuDNN's attention kernels only when `enabled`; torch's switch is restored.

    Why eval, generate and chat turn it off: cuDNN builds an execution plan the first time a process meets a
    (rows, heads, queries, keys) shape, 30-150 ms each on an H100 (bench/sdpa_backends.py: 0.6 s for 13
    shared-context shapes, 1.2 s for 20 unshared ones, forward only). Eval's token-budget batches seldom repeat a
    shape, and decoding meets a new key length at every token (torch's cuDNN check accepts one query: 63-67 ms a
    token on an H100, 0.06-0.08 ms on flash). Flash and memory-efficient kernels start at once; warm they are
    slower (memory-efficient: 1.2x causal, 1.7-2x under the shared-context block mask), which costs eval ~0.2 s
    where the plans cost 0.6-4 s (H100, 2,000 HellaSwag items, fresh machine: 190 -> 299 items/s). Training
    repeats its shapes and keeps torch's choice by default. `enabled` leaves torch's own choice alone. A torch
    without the switch (no cuDNN attention) changes nothing.
    """
    import torch

    switch = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)
    state = getattr(torch.backends.cuda, "cudnn_sdp_enabled", None)
    if enabled or switch is None or state is None:
        yield
        return
    before = bool(state())
    switch(False)
    try:
        yield
    finally:
        switch(before)


def _forward_params(cls: type) -> tuple[str, ...]:
    """Names of `cls.forward`'s parameters after `self`, in order: how positional arguments map to names."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def fused_attention_layers(model: Any) -> int:
    """Number of attention layers that `use_fused_attention` switched in `model`."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_original", None) is not None)


_BODY_PARAMS: dict[type, list[str]] = {}


def _planner(body: Any, plan: _Plan) -> Any:
    """The forward pre-hook that decides, once per forward, how every attention layer runs."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        names = _BODY_PARAMS.setdefault(type(module), list(inspect.signature(module.forward).parameters))
        given = dict(zip(names, args, strict=False))
        given.update(kwargs)
        plan.mode, plan.mask, plan.varlen = _decide(given, module)

    return hook


def use_collated_boundaries(model: Any, enabled: bool = True) -> int:
    """Let (`enabled`) or stop the fused attention of `model` taking packed rows' example boundaries from the batch
    (COLLATED_KEYS, as oasst_model.packing.packed_boundaries computes them on the host) instead of reading the
    position ids back from the GPU, a host wait at every forward; returns the Falcon bodies set (0: no fused
    attention in `model`)."""
    plans = {id(m._oasst_plan): m._oasst_plan for m in model.modules() if isinstance(getattr(m, "_oasst_plan", None),
                                                                                      _Plan)}
    for plan in plans.values():
        plan.collated = enabled
    return len(plans)


def _decide(given: dict[str, Any], body: Any) -> tuple[str | None, Any, Any]:
    """(mode, mask, varlen plan) for one forward from the body's arguments."""
    import torch

    cache = given.get("cache", given.get("past_key_values"))
    if given.get("output_attentions") or (cache is not None and cache.get_seq_length() > 0):
        return None, None, None
    attention_mask = given.get("attention_mask")
    position_ids = given.get("position_ids")
    if attention_mask is not None and attention_mask.dim() != 2:
        return "given", None, None
    if body._oasst_plan.collated and attention_mask is None and position_ids is not None:
        collated = _collated_decision(given, body)
        if collated is not None:
            return collated
    # One host sync for both questions; the example starts come over whole (the varlen kernel's boundaries).
    flags = []
    if position_ids is not None:
        flags.append(example_starts(position_ids).flatten())
    if attention_mask is not None:
        flags.append((attention_mask[:, 1:] > attention_mask[:, :-1]).any().view(1))
    host = torch.cat(flags).cpu() if flags else None
    starts = host[:position_ids.numel()].view(position_ids.shape) if position_ids is not None else None
    unsorted_padding = bool(host[-1]) if attention_mask is not None else False
    if starts is not None and bool(starts[..., 1:].any()):
        varlen = _varlen_plan(given, body, starts)
        if varlen is not None:
            return "varlen", None, varlen
        return "block", block_causal_mask(position_ids, attention_mask), None
    if unsorted_padding:
        return "given", None, None  # left padding: the mask transformers built is right, only keys get expanded
    return "causal", None, None


def _collated_decision(given: dict[str, Any], body: Any) -> tuple[str, None, Any] | None:
    """The plan from the boundaries the batch brought (COLLATED_KEYS), no host wait: "causal" when every row holds
    one example (as the read-back plan decides), else the varlen plan. None when the batch has none that fit its
    position ids' device and size, or the kernel cannot run (the planner then reads them back)."""
    import torch

    position_ids = given["position_ids"]
    boundaries, longest = (given.get(key) for key in COLLATED_KEYS)
    if (not isinstance(boundaries, torch.Tensor) or boundaries.dim() != 1 or boundaries.numel() < 2
            or boundaries.device != position_ids.device or boundaries.dtype != torch.int32
            or position_ids.dim() != 2 or type(longest) is not int or not 0 < longest <= position_ids.numel()):
        return None
    if boundaries.numel() - 1 == position_ids.shape[0]:
        return "causal", None, None
    if not _varlen_runs(given, body):
        return None
    return "varlen", None, (boundaries, _bound(longest), _varlen_kwargs(), position_ids)


def _bound(longest: int) -> int:
    """The longest example rounded up to a power of two, at least VARLEN_MIN_BOUND: the kernel only sizes its grid
    by it, and compiled layers recompile for each new value."""
    return max(VARLEN_MIN_BOUND, 1 << (longest - 1).bit_length())


def _varlen_plan(given: dict[str, Any], body: Any, starts: Any) -> tuple[Any, int, dict[str, Any], Any] | None:
    """(boundaries, longest-example bound, kernel keywords, position ids) for a packed batch the varlen kernel can
    run, else None (the block mask then). `starts`: `example_starts` of the position ids, on the host.

    Every row of the batch is one run of tokens."""
    if not _varlen_runs(given, body):
        return None
    position_ids = given["position_ids"]
    boundaries, longest = boundaries_from_starts(starts)
    return boundaries.to(position_ids.device), _bound(longest), _varlen_kwargs(), position_ids


def _varlen_runs(given: dict[str, Any], body: Any) -> bool:
    """Whether the varlen kernel runs this packed batch (no padding mask, one run of tokens per row, a GPU and
    query dtype it takes, its patch on); says why not to the patch registry."""
    import torch

    from oasst_model import patches

    position_ids = given.get("position_ids")
    embeds = given.get("inputs_embeds")
    ids = given.get("input_ids")
    batch = (ids if ids is not None else embeds).shape[0] if (ids is not None or embeds is not None) else None
    if given.get("attention_mask") is not None or position_ids.dim() != 2 or position_ids.shape[0] != batch:
        return False  # padding to hide, or position ids shared by several rows: the block mask does it
    device = position_ids.device
    if not varlen_device(device):
        patches.not_applicable("varlen_attention", f"packed rows on {device.type}: flash's varlen kernel needs a "
                                                   "CUDA GPU of compute capability 8.0 or newer; block mask")
        return False
    config = body.config
    head_dim = config.hidden_size // config.num_attention_heads
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else body.get_input_embeddings().weight.dtype)
    if not _varlen_takes(dtype, head_dim):
        patches.not_applicable("varlen_attention", f"{dtype} queries of head dim {head_dim}: the varlen kernel "
                                                   "takes half precision, head dims up to 256; block mask")
        return False
    if not patches.applies("varlen_attention"):
        return False
    patches.activated("varlen_attention", once=True)
    return True


def varlen_device(device: Any) -> bool:
    """Whether flash's varlen kernel runs on `device` (VARLEN_DEVICES; a CUDA GPU of compute capability 8.0+)."""
    import torch

    old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    return device.type in VARLEN_DEVICES and not old_gpu


def _varlen_kwargs() -> dict[str, Any]:
    """Keywords that make the installed `varlen_attn` causal and let keys have fewer heads than queries.

    torch 2.10 takes `is_causal`; later releases `window_size=(-1, 0)` and, from 2.13, `enable_gqa` (before it, the
    flash kernel took fewer key heads as they came).
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _varlen_takes(dtype: Any, head_dim: int) -> bool:
    """Whether the varlen kernel takes queries of `dtype` and `head_dim`: half precision, a head dim it has.

    Asked by the planner with the dtype it expects and by each layer with the queries it got (dtype objects are
    compared, not their names: torch.compile traces this inside the layers)."""
    import torch

    return dtype in tuple(getattr(torch, name) for name in VARLEN_DTYPES) and head_dim % 8 == 0 and head_dim <= 256


def _varlen_attention(query: Any, key: Any, value: Any, varlen: tuple[Any, int, dict[str, Any], Any]) -> Any:
    """Causal attention within each packed example: [B, L, heads, D] queries, [B, L, kv_heads, D] keys/values."""
    from torch.nn.attention.varlen import varlen_attn

    boundaries, longest, kwargs, _ = varlen
    batch, length, heads, head_dim = query.shape
    tokens = batch * length
    out = varlen_attn(query.reshape(tokens, heads, head_dim), key.reshape(tokens, key.shape[2], head_dim),
                      value.reshape(tokens, value.shape[2], head_dim), boundaries, boundaries, longest, longest,
                      **kwargs)
    return out.view(batch, length, heads * head_dim)


def _fused_forward(self: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """FalconAttention.forward (rotary, no ALiBi) with fused sdpa kernels; falls back to the original otherwise.

    Arguments are read by name from the installed forward's signature: 5.17 and 5.24 pass `alibi` second, 5.25
    dropped it (ALiBi moved into the mask there).
    """
    import torch

    given = dict(zip(self._oasst_params, args))
    given.update(kwargs)
    plan = self._oasst_plan
    if (plan.mode is None or given.get("alibi") is not None or given.get("output_attentions")
            or given.get("position_embeddings") is None
            or (self.training and float(self.config.attention_dropout or 0.0) > 0.0)):
        return self._oasst_original(*args, **kwargs)
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    hidden_states = given["hidden_states"]
    query, key, value = _split_heads(self, self.query_key_value(hidden_states))
    batch, length, heads, head_dim = query.shape
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = given["position_embeddings"]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    layer_past = given.get("layer_past")
    if layer_past is not None:
        # Only reached on a prefill (the planner hands a filled cache to the original forward).
        key, value = layer_past.update(key, value, self.layer_idx)
    if plan.mode == "varlen" and _varlen_takes(query.dtype, head_dim):
        # Back to [B, L, heads, D], where every token's heads are adjacent: the kernel's [tokens, heads, D].
        out = _varlen_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), plan.varlen)
        return self.dense(out), None
    extra: dict[str, Any] = {}
    kv_heads = key.shape[1]
    if kv_heads != heads:
        if KV_MODE == "gqa":
            extra["enable_gqa"] = True
        elif kv_heads == 1:
            key = key.expand(batch, heads, key.shape[2], head_dim)
            value = value.expand(batch, heads, value.shape[2], head_dim)
        else:  # grouped keys (new decoder architecture): query head h reads key group h // (heads / kv_heads)
            groups = heads // kv_heads
            key = key[:, :, None].expand(batch, kv_heads, groups, key.shape[2], head_dim).flatten(1, 2)
            value = value[:, :, None].expand(batch, kv_heads, groups, value.shape[2], head_dim).flatten(1, 2)
    attention_mask = given.get("attention_mask")
    if plan.mode == "causal" or (plan.mode == "given" and attention_mask is None):
        # Keys are as long as queries here (an empty cache at most), so causal is right for one token too. A plain
        # True, not `length > 1`: under torch.compile with symbolic lengths that is a SymBool, which sdpa refuses,
        # and the graph broke around every attention call (4 compiled regions per layer on a GPU).
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, **extra)
    else:
        if plan.mode == "varlen":  # fp32 queries (training without autocast): the block mask, built here
            mask = block_causal_mask(plan.varlen[3])
        else:
            mask = plan.mask if plan.mode == "block" else attention_mask
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, **extra)
    out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return self.dense(out), None


def _split_heads(self: Any, fused_qkv: Any) -> tuple[Any, Any, Any]:
    """Query [B, L, heads, D] and key, value [B, L, kv_heads or heads, D] from the fused QKV projection, as views.

    The layouts of transformers' `_split_heads` (5.17, 5.24; 5.25 splits inline), by slicing only: transformers
    picks the key and value heads with a list index (`qkv[..., [-2], :]`), which copies an index tensor from host
    memory to the GPU at every layer, a host-device synchronization (3.8 s of a 12 s HellaSwag run on an H200 waited
    there), and copies the key and value. The values are the same.
    """
    batch, length, _ = fused_qkv.shape
    config = self.config
    if config.new_decoder_architecture:
        # [.., kv_heads, queries per group + 2, D]: each group's queries, then its key and its value
        grouped = fused_qkv.view(batch, length, self.num_kv_heads, -1, self.head_dim)
        return grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
    if config.multi_query:
        qkv = fused_qkv.view(batch, length, self.num_heads + 2, self.head_dim)
        return qkv[..., :-2, :], qkv[..., -2:-1, :], qkv[..., -1:, :]
    qkv = fused_qkv.view(batch, length, self.num_heads, 3, self.head_dim)
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
