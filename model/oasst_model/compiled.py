"""Regional compilation: each repeated decoder block goes through torch.compile, one compilation for all of them.

    from oasst_model.compiled import compile_layers
    compile_layers(peft_model)     # 32 for Falcon-7B (FalconDecoderLayer), after LoRA and the fused forwards

Why: between its matrix products a decoder layer runs a chain of element-wise kernels (LayerNorm, rotary
embeddings, GELU, LoRA dropout, residual adds, dtype casts), each reading and writing the whole activation; the
fast Falcon recipe's profile puts the remaining GPU time there, and the Colab-class recipe is bound by the host
launching them. torch.compile fuses such chains into a few kernels. Regional: the blocks named by transformers'
`_no_split_modules` (the decoder layer class) are compiled each with `nn.Module.compile`, not the whole model, so
the compilation is done once for the block's code and shared by every layer (parameters are graph inputs), the
loss, LM head and trainer stay eager, and state-dict names do not change. Lengths vary from batch to batch:
`dynamic=None` recompiles once with symbolic lengths after the first change instead of once per length.

Equal to the eager path: the traced graph calls the same operations (bitsandbytes' 4-bit ops are torch.library
ops, traced as calls); tests compare losses and LoRA weights after several steps with the graph path (exact, LoRA
dropout included) and with inductor's generated code (fp32 within 1e-4). A block dynamo cannot compile runs eagerly
(`suppress_errors`), and `compiled_graphs` in train_summary.json says how many graphs were built (0: nothing ran
compiled). Guarded by the patch registry (`compile_layers`): without `nn.Module.compile` or torch._dynamo, nothing
is compiled, with one warning line.
"""

from __future__ import annotations

from typing import Any

# torch.compile's backend; tests use "aot_eager" (the traced graph without code generation) where inductor's
# C++ compilation on a CPU would take most of the test.
BACKEND = "inductor"
# Compiled variants kept per block (dynamo's default is 8): a few shapes, with and without gradients, and
# gradient checkpointing's recomputation.
CACHE_SIZE_LIMIT = 64


def decoder_blocks(model: Any) -> list[Any]:
    """The modules of `model` whose class transformers names in `_no_split_modules` (its repeated blocks)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: Any) -> int:
    """Compile every decoder block of `model` in place with torch.compile; returns the number compiled."""
    from oasst_model import patches

    blocks = decoder_blocks(model)
    if not blocks:
        patches.not_applicable("compile_layers", f"{type(model).__name__} names no repeated block")
        return 0
    if not patches.applies("compile_layers"):
        return 0
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly, training goes on
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    for block in blocks:
        block.compile(backend=BACKEND, dynamic=None)
    patches.activated("compile_layers", len(blocks))
    return len(blocks)


def compile_stats() -> dict[str, int]:
    """What torch.compile did in this process so far: `compiled_graphs` built (0: every compiled block fell back to
    eager) and `compiled_graph_breaks` met (each splits a block into more regions, with eager code and a host round
    trip between them). The keys are train_summary.json's."""
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "compiled_graph_breaks": int(sum(counters["graph_break"].values()))}
