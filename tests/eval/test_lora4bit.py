"""A LoRA adapter folded into the dequantized 4-bit weights scores what peft's own 4-bit + LoRA forward scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXTS = ["Once upon a time, there was a little girl named Lily.", "The sun was big and yellow and warm today."]


@pytest.fixture(scope="module")
def nf4_with_adapter(stories: Path, adapter_dir: Path) -> tuple[object, object]:
    """stories260K in NF4 (fp32 compute) with the suite's trained adapter, in eval mode."""
    pytest.importorskip("bitsandbytes")
    from oasst_model.load import load_adapter, load_model

    model, tokenizer = load_model(str(stories), load_in_4bit=True, compute_dtype="float32")
    model = load_adapter(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def _logits(model: object, tokenizer: object) -> object:
    import torch

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_folded_logits_equal_peft_forward(nf4_with_adapter: tuple[object, object]) -> None:
    import torch

    from oasst_eval.lora4bit import merged_4bit_lora

    model, tokenizer = nf4_with_adapter
    peft_logits = _logits(model, tokenizer)
    with model.disable_adapter():
        base_logits = _logits(model, tokenizer)
    with merged_4bit_lora(model) as layers:
        folded = _logits(model, tokenizer)
    assert layers == sum(1 for name, _ in model.named_modules() if name.endswith("lora_A")) > 0
    # The adapter matters here, so equal logits cannot come from a fold that dropped it.
    assert (peft_logits - base_logits).abs().max() > 1e-2
    # fp32 compute: one product with W + s*B@A instead of two summed; rounding only.
    torch.testing.assert_close(folded, peft_logits, rtol=1e-4, atol=1e-4)
    # Leaving the context gives peft's forward back (no instance override left behind).
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(_logits(model, tokenizer), peft_logits, rtol=0, atol=0)


def test_fold_falls_back_when_it_must(nf4_with_adapter: tuple[object, object]) -> None:
    import torch

    from oasst_eval.lora4bit import merged_4bit_lora

    model, tokenizer = nf4_with_adapter
    with model.disable_adapter():
        base_logits = _logits(model, tokenizer)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with merged_4bit_lora(model):
        # A disabled adapter is the base model, not base + a folded adapter.
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, tokenizer), base_logits, rtol=0, atol=0)
        # With autograd on, peft's forward runs (its gradients are the ones training relies on).
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_cli_4bit_adapter_scores_equal_unfolded(oasst: object, stories: Path, adapter_dir: Path,
                                                tmp_path: Path) -> None:
    """`oasst eval --load-in-4bit --adapter` folds by default; --no-merge-adapter (peft's path) scores the same."""
    pytest.importorskip("bitsandbytes")
    summaries = {}
    for label, flags in (("folded", []), ("peft", ["--no-merge-adapter"])):
        out = tmp_path / label
        result = oasst("eval", "--model", stories, "--adapter", adapter_dir, "--load-in-4bit", "--tasks",
                       "hellaswag", "--limit", 12, "--out", out,
                       *flags)
        assert result.exit_code == 0, result.output
        summaries[label] = json.loads((out / "eval_summary.json").read_text())
    assert summaries["folded"]["settings"]["adapter_merged"] == "folded per forward (weights stay 4-bit)"
    assert summaries["peft"]["settings"]["adapter_merged"] is False
    folded, plain = (s["adapter"]["hellaswag"] for s in (summaries["folded"], summaries["peft"]))
    assert folded["acc"] == plain["acc"] and folded["acc_norm"] == plain["acc_norm"]
