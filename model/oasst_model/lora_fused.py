"""LoRA's update added inside the matmul that computes it, not by a clone, a scale and an add over the layer output.

    from oasst_model.lora_fused import fuse_lora_forward, unfuse_lora_forward
    fuse_lora_forward(peft_model)      # LoRA linears switched: 128 for Falcon-7B's four targets
    fuse_lora_forward(peft_model, seeded_dropout=True)  # the same, with the LoRA dropout below
    fuse_lora_forward(peft_model, concat=True)  # 4-bit bases: the update inside the base GEMM (below)
    fuse_lora_forward(peft_model, carved_dropout=True)  # compiled layers: dropout masks from fewer random draws
    unfuse_lora_forward(peft_model)    # peft's own forward again

Why: peft 0.21's LoRA forward (`lora.bnb.Linear4bit`, `lora.Linear`) computes `result = base(x)`, a defensive
`result.clone()` (4-bit only), `lora_B(lora_A(dropout(x))) * scaling` and `result + that`: beside the two thin
matmuls, a copy, a scale and an add over the full [tokens, out_features] output (out_features 18,176 for Falcon-7B's
dense_h_to_4h), and in backward a scale of that whole gradient. On an H200 those element-wise kernels took a large
share of the fast recipe's GPU time after the matmuls. Here the update is one
`addmm(result, lora_A(dropout(x)), lora_B.weight.t(), alpha=scaling)`: the GEMM scales and accumulates into the base
output (addmm's own copy of `result` replaces peft's clone), and addmm's backward scales only the rank-r tensors.
peft's dropout module still runs (unless seeded dropout is on, below), so the RNG stream and the masks are the ones
peft draws.

Same values as peft up to rounding (scale and add happen in the GEMM's fp32 accumulator rather than after rounding
to bf16), same output dtype; checked on a tiny Falcon, 4-bit and plain, fp32 and bf16 autocast, in
tests/train/test_lora_fused.py. Every call that is not plain single-adapter LoRA (adapters disabled or merged,
several active adapters, `adapter_names` or any other argument, DoRA and other variants, `lora_bias`, hooks on
lora_B) runs peft's original forward, which stays reachable as `module._oasst_lora_original`. Where the base output's
dtype is not the dtype addmm would compute in (e.g. fp32 LayerNorm outputs reaching a 4-bit layer under autocast),
the LoRA update is added as peft adds it, without the clone.

Concatenated GEMM (`fuse_lora_forward(model, concat=True)`, the trainer's `concat_lora`), 4-bit bases only: the
base output and the update are one product, `y = [x | h] @ [dequant(W) | s B]^T` with `h = lora_A(dropout(x))`,
whose inner dimension grows by the rank (4,544 -> 4,608 for Falcon-7B: +1.4% FLOPs). In backward `g @ [dequant(W) |
s B]` gives x's gradient and h's in one product too, so neither the addmm's read and write of the [tokens,
out_features] output nor a separate pass over g for h's gradient is left. The concatenated weight is kept from
forward to backward, not dequantized again: 2 bytes per base weight while a step runs (Falcon-7B: 13 GB without
gradient checkpointing; with it, one layer's at a time). That is a choice torch makes anyway inside compiled layers
(its partitioner keeps what a matmul in backward reads, and merges a rebuild with forward's); eager does the same,
so memory does not depend on compile_layers. Inside a compiled layer the dequantization is torch ops
(`dequantize_4bit_ops`, equal to bitsandbytes'), which inductor writes straight into the concatenation.
bench/lora_gemm.py, H100, one Falcon-7B layer's four linears at 10,240 tokens, forward + backward, compiled: 546 ms
(addmm) -> 499 ms per 32 layers against 386 ms for the 4-bit GEMMs without LoRA. Where the layer is not the plain
bitsandbytes `Linear4bit` this computes (hooks, a bias that trains, CPU-packed weights, a quantization state kept
elsewhere, other dtypes), the addmm path runs.

Seeded dropout (`fuse_lora_forward(model, seeded_dropout=True)`, the trainer's `seeded_lora_dropout`): peft's
`nn.Dropout` before lora_A keeps its output ([tokens, in_features], for lora_A's weight gradient) and, on a GPU, a
bool mask until backward: 3 bytes per input element in bf16, 0.73 GiB per Falcon-7B layer at 8,192 tokens. Here
`lora_A(dropout(x))` is one autograd Function that keeps x, lora_A's weight, p and a seed, and draws the mask again
from the seed in backward. Nothing else keeps x in a 4-bit layer (bitsandbytes 0.50's MatMul4Bit keeps only the
packed weight), so x now costs 2 bytes per element where peft's two tensors cost 3; Falcon's query_key_value and
dense_h_to_4h read one LayerNorm output, kept once instead of twice. A Falcon-7B layer at 8,192 tokens keeps 0.31
GiB less (saved tensors counted on a CPU with the GPU's dropout, scaled up); on a GPU dense's input may also be the
output flash attention keeps anyway (0.07 GiB more, not checked). The seed comes from the CPU generator, which
torch.utils.checkpoint saves and restores (reentrant or not), so a recomputed forward draws the same seed and mask as
the first one. The masks are as likely as peft's (keep 1 - p, scale 1 / (1 - p)), not the same draws: peft's come
from the device's generator, these from a generator seeded per call.

Carved dropout (`fuse_lora_forward(model, carved_dropout=True)`, the trainer's `carved_lora_dropout`), inside
compiled layers only: torch's dropout draws one Philox random number per element (inductor: one Philox call, 128
random bits, per element, of which the mask uses one comparison), and Falcon-7B has four LoRA dropouts a layer, 326
million elements a layer at 10,240 tokens. `carved_dropout` carves four 15-bit uniforms out of each 60-bit random word
(one Philox call per word): a quarter of the calls. An element is kept when its uniform is >= round(p * 2^15) and
scaled by 2^15 / (2^15 - round(p * 2^15)), so the output's mean is exactly the input's and the drop probability is
within 2^-16 of p (0.100006 for 0.1). bench/dropout_cost.py, H100, per Falcon-7B layer at 10,240 tokens, forward +
backward, compiled: 1.38 ms without dropout, 3.21 ms with torch's, 2.59 ms carved (58.8 -> 38.8 ms of dropout per
32-layer step). Inside a checkpointed layer the recomputation draws the same words: torch.utils.checkpoint restores
the generators' state before it, as for torch's dropout (a test compares losses and weights with and without
checkpointing through the traced graph). Outside compiled layers torch's dropout runs: eager, the carving is several
kernels where torch's is one. Where the dropout is not a plain `nn.Dropout` in training mode, or the last dimension
is not a multiple of four, it runs as it is.
"""

from __future__ import annotations

import functools
import types
from typing import Any


def fuse_lora_forward(model: Any, *, seeded_dropout: bool = False, concat: bool = False,
                      carved_dropout: bool = False) -> int:
    """Switch every peft LoRA linear (4-bit or plain base) of `model` to the fused forward; returns the count.

    Guarded by the patch registry (`fused_lora`): when peft changed the forward or the attributes read here, nothing
    is switched and peft's own forward runs, with one warning line. `concat` (registry `concat_lora`): 4-bit bases
    compute base and update in one GEMM. `carved_dropout` (registry `carved_lora_dropout`): inside compiled layers,
    LoRA dropout masks from a quarter of the random draws (`carved_dropout`).
    """
    from oasst_model import patches

    kinds = _lora_kinds()
    # Exact types: a subclass may have a forward of its own.
    todo = [m for m in model.modules()
            if type(m) in kinds and getattr(m, "_oasst_lora_original", None) is None]
    if not todo:
        return 0
    if not patches.applies("fused_lora", problem=patches.check_lora_module(todo[0])):
        return 0
    four_bit = [m for m in todo if kinds[type(m)] == "4bit"]
    concat = bool(concat and four_bit and patches.applies("concat_lora"))
    carved_on = bool(carved_dropout and patches.applies("carved_lora_dropout"))
    carved = {m for m in todo if any(map(_carvable, m.lora_dropout.values()))} if carved_on else set()
    for module in todo:
        module._oasst_lora_original = module.forward
        module._oasst_lora_kind = kinds[type(module)]
        module._oasst_seeded_dropout = seeded_dropout
        module._oasst_carved_dropout = module in carved
        # The Function class itself, made here: dynamo cannot trace a class definition inside a compiled layer.
        module._oasst_concat = _concat_linear() if concat and kinds[type(module)] == "4bit" else None
        module.forward = types.MethodType(_fused_forward, module)
    patches.activated("fused_lora", len(todo))
    if concat:
        patches.activated("concat_lora", len(four_bit))
    if carved:
        patches.activated("carved_lora_dropout", len(carved))
    return len(todo)


def unfuse_lora_forward(model: Any) -> int:
    """Give every module `fuse_lora_forward` switched its original forward back; returns the count."""
    restored = 0
    for module in model.modules():
        original = module.__dict__.pop("_oasst_lora_original", None)
        if original is None:
            continue
        del module._oasst_lora_kind, module._oasst_seeded_dropout, module._oasst_concat, module._oasst_carved_dropout
        if getattr(original, "__func__", None) is type(module).forward:
            del module.forward  # the class's forward again, not a bound copy that pins the module
        else:
            module.forward = original
        restored += 1
    return restored


def fused_lora_modules(model: Any) -> int:
    """Number of LoRA modules of `model` that `fuse_lora_forward` switched."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_lora_original", None) is not None)


def concat_lora_modules(model: Any) -> int:
    """Number of LoRA modules of `model` switched to the concatenated GEMM (4-bit bases, `concat=True`)."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_concat", None) is not None)


def carved_lora_modules(model: Any) -> int:
    """Number of LoRA modules of `model` whose dropout is carved inside compiled layers (`carved_dropout=True`)."""
    return sum(1 for m in model.modules() if getattr(m, "_oasst_carved_dropout", False))


def _lora_kinds() -> dict[type, str]:
    """peft's LoRA linear classes this module knows the forward of: "4bit" (bitsandbytes base) and "plain"."""
    from peft.tuners.lora import layer as lora_layer

    kinds: dict[type, str] = {lora_layer.Linear: "plain"}
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # peft without its bitsandbytes module: nothing is 4-bit LoRA
        return kinds
    linear4bit = getattr(lora_bnb, "Linear4bit", None)  # defined only when bitsandbytes has 4-bit support
    if linear4bit is not None:
        kinds[linear4bit] = "4bit"
    return kinds


def single_plain_adapter(module: Any) -> str | None:
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

    name = None if args or kwargs else single_plain_adapter(self)
    if name is None:
        return self._oasst_lora_original(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    scaling = self.scaling[name]
    concat = self._oasst_concat is not None and _concat_applies(self.base_layer, x)
    base_input = x  # the base layer's input, before the LoRA branch's cast below
    result = None if concat else self.base_layer(x)
    # The input casts are peft's, per class, so dropout and lora_A see the dtypes they see under peft. The 4-bit class
    # asks torch.is_autocast_enabled() without a device, which is CUDA's state only (peft 0.21): kept as is.
    convert = self._oasst_lora_kind == "plain" or not torch.is_autocast_enabled()
    if convert:
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
    dropout = self.lora_dropout[name]
    # Inside a compiled layer the seeded Function would break the graph (a Generator made per call, a seed read
    # back with .item()): peft's dropout (or the carved one) runs there, which inductor fuses with its neighbours.
    compiling = torch.compiler.is_compiling()
    if self._oasst_seeded_dropout and not compiling and _seeded_dropout_applies(dropout, lora_a, x):
        h = _seeded_dropout_linear().apply(x, lora_a.weight, dropout.p, _draw_seed())
    elif self._oasst_carved_dropout and compiling and carved_dropout_applies(dropout, x):
        h = lora_a(carved_dropout(x, dropout.p))
    else:
        h = lora_a(dropout(x))

    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    # addmm under autocast computes in the autocast dtype; without, all three operands must share one dtype. Either
    # way the output dtype must be the base output's, which is what peft returns whenever h has that dtype too.
    compute = torch.get_autocast_dtype(device) if autocast else lora_b.weight.dtype
    if concat:
        if h.dtype == base_input.dtype == compute:
            base = self.base_layer
            bias = None if base.bias is None else base.bias.to(compute)
            return self._oasst_concat.apply(base_input, h, lora_b.weight.to(compute) * scaling, base.weight,
                                            base.weight.quant_state, bias)
        result = self.base_layer(base_input)  # mixed dtypes: the addmm path below, or peft's arithmetic, decides
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


CARVE_BITS = 15  # bits per uniform; four to a 60-bit word (torch.randint's int64 range ends at 2**63)
CARVE_FIELDS = 4


def carved_threshold(p: float) -> int:
    """The carved uniform (0 .. 2**15 - 1) below which an element is dropped: round(p * 2**15)."""
    return round(p * 2**CARVE_BITS)


def _carvable(dropout: Any) -> bool:
    """Whether `dropout` is a plain `nn.Dropout` (no hooks, not in place) whose p is neither 0 nor 1 at 15 bits."""
    import torch

    if type(dropout) is not torch.nn.Dropout or dropout.inplace or dropout._forward_hooks or dropout._forward_pre_hooks:
        return False
    return 0 < carved_threshold(dropout.p) < 2**CARVE_BITS


def carved_dropout_applies(dropout: Any, x: Any) -> bool:
    """Whether `dropout(x)` is torch's dropout in training, over a last dimension the carving splits in fours."""
    return _carvable(dropout) and dropout.training and x.dim() > 0 and x.shape[-1] % CARVE_FIELDS == 0


def carved_dropout(x: Any, p: float) -> Any:
    """Dropout with probability round(p * 2**15) / 2**15 whose masks take four 15-bit uniforms from each random word.

    Each kept element is scaled by 2**15 / (2**15 - round(p * 2**15)): the output's expectation is x exactly.
    Needs x.shape[-1] % 4 == 0 (`carved_dropout_applies`).
    """
    import torch

    threshold = carved_threshold(p)
    words = torch.randint(0, 2 ** (CARVE_BITS * CARVE_FIELDS), (*x.shape[:-1], x.shape[-1] // CARVE_FIELDS),
                          device=x.device, dtype=torch.int64)
    mask = 2**CARVE_BITS - 1
    # Field i of word j is element 4 j + i of the row: each 15-bit field is an independent uniform.
    uniforms = torch.stack([(words >> (CARVE_BITS * i)) & mask for i in range(CARVE_FIELDS)], dim=-1)
    keep = uniforms.reshape(x.shape) >= threshold
    scale = 2**CARVE_BITS / (2**CARVE_BITS - threshold)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


def seeded_dropout_mask(seed: int, shape: tuple[int, ...], p: float, device: Any) -> Any:
    """The keep mask (bool, True with probability 1 - p) that seeded dropout draws for `seed`."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # A bool mask: 1 byte per element in flight (the mask lives only inside forward and backward, never saved).
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p, generator=generator)


def _draw_seed() -> int:
    """A seed for one seeded-dropout call, from the global CPU generator.

    The CPU generator because torch.utils.checkpoint restores it before recomputing (reentrant and not, with
    preserve_rng_state, the default), so the recomputation draws this same seed; reading it is free of device syncs,
    which a seed drawn on the GPU would not be. Trainer checkpoints save and restore it too, so --resume continues
    the same stream.
    """
    import torch

    return int(torch.randint(2**62, (1,)).item())


def _seeded_dropout_applies(dropout: Any, lora_a: Any, x: Any) -> bool:
    """Whether `lora_a(dropout(x))` is the plain dropout-then-linear the seeded Function computes."""
    import torch

    if type(dropout) is not torch.nn.Dropout or not dropout.training or dropout.p == 0:
        return False  # peft's nn.Identity (p 0) or eval mode: nothing is dropped, lora_a(x) as it is
    if type(lora_a) is not torch.nn.Linear or lora_a.bias is not None:
        return False
    if dropout._forward_hooks or dropout._forward_pre_hooks or lora_a._forward_hooks or lora_a._forward_pre_hooks:
        return False
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in floats or lora_a.weight.dtype not in floats:
        return False  # autocast leaves float64 alone; F.linear's own errors are peft's to raise
    return torch.is_autocast_enabled(x.device.type) or x.dtype == lora_a.weight.dtype


@functools.cache
def _seeded_dropout_linear() -> Any:
    """The autograd Function `dropout(x) @ weight.T` that keeps x and a seed, not the dropout output and its mask.

    Built on first use so that importing this module does not import torch.
    """
    import torch

    class SeededDropoutLinear(torch.autograd.Function):
        """`lora_A(dropout(x))` whose backward draws the dropout mask again from the seed forward drew it from."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, p: float, seed: int) -> Any:
            """h = (x * mask / (1 - p)) @ weight.T in F.linear's dtype: the autocast dtype, or the weight's."""
            device = x.device.type
            compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
            xc = x.to(compute)  # x itself when it is in that dtype already: nothing new is kept
            keep = seeded_dropout_mask(seed, x.shape, p, x.device)
            # The dropout scale goes on the rank-r output, not on x: x * mask is exact, and the only full-width
            # element-wise work is the mask and that product.
            h = torch.matmul(xc * keep, weight.to(compute).t()).mul_(1 / (1 - p))
            ctx.save_for_backward(xc, weight)
            ctx.p, ctx.seed, ctx.x_dtype = p, seed, x.dtype
            return h

        @staticmethod
        def backward(ctx: Any, grad_h: Any) -> tuple[Any, Any, None, None]:
            """grad_x = (grad_h @ weight) * mask / (1 - p) and grad_weight = grad_h.T @ (x * mask) / (1 - p)."""
            xc, weight = ctx.saved_tensors
            grad_x = grad_weight = None
            # The forward's dtype, whatever autocast state backward runs under (on CPU, the caller's).
            with torch.autocast(xc.device.type, enabled=False):
                keep = seeded_dropout_mask(ctx.seed, xc.shape, ctx.p, xc.device)
                grad = grad_h.to(xc.dtype).mul(1 / (1 - ctx.p))
                if ctx.needs_input_grad[1]:
                    dropped = (xc * keep).reshape(-1, xc.shape[-1])
                    grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ dropped).to(weight.dtype)
                    del dropped  # gone before grad_x's tensor of the same size is made
                if ctx.needs_input_grad[0]:
                    grad_x = (grad @ weight.to(xc.dtype)).mul_(keep).to(ctx.x_dtype)
            return grad_x, grad_weight, None, None

    return SeededDropoutLinear


def _concat_applies(base: Any, x: Any) -> bool:
    """Whether `base(x)` is the plain bitsandbytes 4-bit product the concatenated GEMM reproduces."""
    import bitsandbytes as bnb
    import torch

    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if type(base).forward is not bnb.nn.Linear4bit.forward or state is None or weight.dtype != torch.uint8:
        return False  # another forward, a state kept on the module (bitsandbytes' fix-up), other storage
    if base._forward_hooks or base._forward_pre_hooks or getattr(state, "packing_format_for_cpu", False):
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    # bitsandbytes computes in compute_dtype and returns the input's dtype: one dtype for both, or it casts.
    return base.compute_dtype in (None, x.dtype) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def dequantize_4bit_ops(packed: Any, state: Any, dtype: Any) -> Any | None:
    """bitsandbytes' 4-bit dequantization (NF4 or FP4, nested absmax or not) in torch ops, in `dtype`: equal to
    `bitsandbytes.functional.dequantize_4bit(packed, state)` (tests compare them), or None for a layout it does not
    know (then bitsandbytes' own op runs)."""
    import torch

    code, absmax, shape = getattr(state, "code", None), getattr(state, "absmax", None), getattr(state, "shape", None)
    if code is None or absmax is None or shape is None or len(shape) != 2 or code.numel() != 16:
        return None
    elements = shape[0] * shape[1]
    if packed.dtype != torch.uint8 or packed.numel() * 2 != elements or elements % state.blocksize:
        return None
    if state.nested:
        inner = state.state2
        if inner.code.numel() != 256 or absmax.numel() > inner.absmax.numel() * inner.blocksize:
            return None
        # The absmax of each block of `blocksize` weights is itself 8-bit, blockwise over `inner.blocksize` absmaxes.
        scale = inner.absmax.repeat_interleave(inner.blocksize)[:absmax.numel()]
        absmax = inner.code[absmax.long()] * scale + state.offset
    flat = packed.reshape(-1)
    # Each byte holds two weights, the first in its high nibble.
    nibbles = torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=-1).reshape(-1)
    values = code[nibbles.long()].view(-1, state.blocksize) * absmax.float().view(-1, 1)
    return values.view(shape[0], shape[1]).to(state.dtype).to(dtype)


@functools.cache
def _concat_linear() -> Any:
    """The autograd Function `[x | h] @ [dequant(W) | s B]^T (+ bias)`: a 4-bit linear and its LoRA update in one
    GEMM. Built on first use so that importing this module does not import torch."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    def concatenated(packed: Any, state: Any, scaled_b: Any) -> Any:
        """[out, in + r]: the dequantized weight beside lora_B's scaled weight, in lora_B's dtype.

        Inside a compiled layer the dequantization is torch ops (`dequantize_4bit_ops`), which inductor writes
        straight into the concatenation; outside, bitsandbytes' kernel and a copy.
        """
        weight = dequantize_4bit_ops(packed, state, scaled_b.dtype) if torch.compiler.is_compiling() else None
        if weight is None:
            weight = dequantize_4bit(packed, state).to(scaled_b.dtype)
        return torch.cat((weight, scaled_b), dim=1)

    class ConcatLinear(torch.autograd.Function):
        """base(x) + h @ scaled_b^T as one product; the 4-bit weight takes no gradient."""

        @staticmethod
        def forward(ctx: Any, x: Any, h: Any, scaled_b: Any, packed: Any, state: Any, bias: Any) -> Any:
            """y = [x | h] @ [dequant(W) | scaled_b]^T + bias, in x's dtype; the concatenated weight is kept for
            backward (compiled, torch's partitioner keeps it whatever this saves: a matmul in backward reads it)."""
            weight = concatenated(packed, state, scaled_b)
            ctx.save_for_backward(h, weight)
            return torch.nn.functional.linear(torch.cat((x, h), dim=-1), weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any, Any, None, None, None]:
            """(x's, h's, scaled_b's gradients): x's and h's from one product with the concatenated weight."""
            h, weight = ctx.saved_tensors
            grad_x = grad_h = grad_b = None
            # The forward's dtype, whatever autocast state backward runs under (on CPU, the caller's).
            with torch.autocast(grad.device.type, enabled=False):
                grad = grad.to(weight.dtype)
                if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                    both = grad @ weight
                    inner = both.shape[-1] - h.shape[-1]
                    grad_x, grad_h = both[..., :inner], both[..., inner:]
                if ctx.needs_input_grad[2]:
                    grad_b = grad.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
            return grad_x, grad_h, grad_b, None, None, None

    return ConcatLinear
