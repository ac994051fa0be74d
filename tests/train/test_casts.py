"""`cast_norm_outputs` computes what the plain autocast path computes, with fewer casts."""

from __future__ import annotations

from pathlib import Path

import torch

from oasst_model.casts import cast_norm_outputs


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """bf16-autocast loss of the tiny model on `ids` and the gradients of its trainable weights."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_norm_outputs_in_bf16_give_the_same_loss_and_gradients(tiny_falcon: Path) -> None:
    from transformers import FalconForCausalLM

    ids = torch.randint(10, 60000, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = FalconForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32).train()
    hooked = FalconForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32).train()
    for model in (plain, hooked):
        model.config.hidden_dropout = model.config.attention_dropout = 0.0
    assert cast_norm_outputs(hooked) == 2 + 1  # one norm per decoder layer (parallel attention) + the final one
    seen = []
    hooked.transformer.h[0].input_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(hooked, ids)
    assert seen == [torch.bfloat16]  # the hook really changed what the next layers get
    assert abs(loss_a - loss_b) < 1e-4 * abs(loss_a)
    for name, grad in grads_a.items():
        rel = (grad - grads_b[name]).norm() / grad.norm().clamp(min=1e-12)
        assert rel < 2e-2, (name, float(rel))


def test_outside_autocast_nothing_changes(tiny_falcon: Path) -> None:
    from transformers import FalconForCausalLM

    model = FalconForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32).eval()
    ids = torch.randint(10, 60000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        cast_norm_outputs(model)
        assert cast_norm_outputs(model) == 0  # idempotent
        assert torch.equal(before, model(ids).logits)
