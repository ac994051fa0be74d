"""The fused Falcon attention option computes what transformers' own attention computes, and packs without leaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from oasst_model import attention
from oasst_model.attention import block_causal_mask, fused_attention_layers, use_fused_attention

TOL = 1e-5


# Falcon's three attention layouts: multi-query (7B), grouped keys of the new decoder architecture (40B, 180B), and
# one key/value per head.
LAYOUTS = {
    "multi_query": {},
    "grouped": {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True},
    "per_head": {"multi_query": False},
}


def _pair(tiny_falcon: Path, layout: str = "multi_query") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny Falcon twice, in fp32: as transformers builds it, and with the fused attention switched on.

    The fused copy's layers keep transformers' forward only for what the fused path hands over (decoding with a
    cache): a test of a fused case that reached it would fail, so a silent fallback cannot pass for a match.
    """
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig.from_pretrained(tiny_falcon)
    for key, value in LAYOUTS[layout].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    plain = FalconForCausalLM(config).eval()
    fused = FalconForCausalLM(config).eval()
    fused.load_state_dict(plain.state_dict())
    assert use_fused_attention(fused) == 2 == fused_attention_layers(fused)
    assert fused_attention_layers(plain) == 0
    return plain, fused


def _forbid_fallback(fused: torch.nn.Module) -> None:
    """Make transformers' own forward raise in the fused model: the case under test must take the fused path."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fused attention fell back to transformers' forward")

    for module in fused.modules():
        if getattr(module, "_oasst_original", None) is not None:
            module._oasst_original = refuse


def _ids(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Random token sequences of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 60000, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kv_mode", ["expand", "gqa"])
def test_unpadded_batch_gives_the_same_logits(tiny_falcon: Path, kv_mode: str, layout: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "KV_MODE", kv_mode)
    plain, fused = _pair(tiny_falcon, layout)
    _forbid_fallback(fused)
    ids = torch.stack(_ids([24, 24]))
    with torch.no_grad():
        assert (plain(ids).logits - fused(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_right_padded_batch_gives_the_same_logits_on_every_real_token(tiny_falcon: Path, layout: str) -> None:
    plain, fused = _pair(tiny_falcon, layout)
    _forbid_fallback(fused)
    seqs = _ids([30, 17, 9])
    ids = torch.zeros(3, 30, dtype=torch.long)
    mask = torch.zeros(3, 30, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        a = plain(ids, attention_mask=mask).logits
        b = fused(ids, attention_mask=mask).logits
    assert fused.transformer._oasst_plan.mode == "causal"  # the mask-free fused path really ran
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < TOL


def test_left_padded_batch_uses_the_given_mask_and_matches(tiny_falcon: Path) -> None:
    plain, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    ids = torch.stack(_ids([20, 20]))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        a = plain(ids, attention_mask=mask).logits
        b = fused(ids, attention_mask=mask).logits
    assert fused.transformer._oasst_plan.mode == "given"
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < TOL


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_row_gives_each_example_the_logits_it_has_alone(tiny_falcon: Path, layout: str) -> None:
    _, fused = _pair(tiny_falcon, layout)
    _forbid_fallback(fused)
    seqs = _ids([11, 23, 7])
    row = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = fused(row, position_ids=positions).logits[0]
        assert fused.transformer._oasst_plan.mode == "block"
        start = 0
        for seq in seqs:
            alone = fused(seq[None]).logits[0]
            assert (packed[start:start + len(seq)] - alone).abs().max() < TOL
            start += len(seq)


def test_packed_training_gradients_equal_the_sum_over_examples_alone(tiny_falcon: Path) -> None:
    """A leak would show in the gradients too: the packed loss's gradient must be the per-example sum."""
    _, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    fused.train()
    seqs = _ids([13, 19])
    row = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]

    def loss_of(ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        logits = fused(ids, position_ids=pos).logits[0]
        targets = ids[0].clone()
        if pos is not None:  # no target across the boundary between two packed examples
            targets[1:][pos[0, 1:] == 0] = -100
        return torch.nn.functional.cross_entropy(logits[:-1], targets[1:], ignore_index=-100, reduction="sum")

    weight = fused.transformer.h[0].self_attention.query_key_value.weight
    fused.zero_grad()
    loss_of(row, positions).backward()
    packed_grad = weight.grad.clone()
    fused.zero_grad()
    for seq in seqs:
        loss_of(seq[None], None).backward()
    assert (packed_grad - weight.grad).abs().max() < 1e-4 * weight.grad.abs().max()


def test_generation_with_a_kv_cache_is_unchanged(tiny_falcon: Path) -> None:
    plain, fused = _pair(tiny_falcon)
    prompt = torch.stack(_ids([12]))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(plain.generate(prompt, **kwargs), fused.generate(prompt, **kwargs))


def test_block_mask_hides_other_examples_and_padding_but_never_empties_a_row() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(positions)[0, 0]
    assert mask.tolist()[4] == [False, False, False, True, True, False]
    padded = block_causal_mask(positions, torch.tensor([[1, 1, 1, 1, 1, 0]]))[0, 0]
    assert padded[5].tolist() == [False] * 5 + [True]
    assert padded.any(dim=-1).all()


def test_models_other_than_falcon_are_left_alone(stories: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories)
    assert use_fused_attention(model) == 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_heads_are_split_by_views_with_transformers_values(tiny_falcon: Path, layout: str) -> None:
    """No list index (transformers' `[..., [-2], :]` copies an index tensor to the GPU and syncs at every layer):
    keys and values are views of the fused projection, and hold what transformers' split gives."""
    plain, _ = _pair(tiny_falcon, layout)
    layer = plain.transformer.h[0].self_attention
    fused_qkv = layer.query_key_value(torch.randn(2, 5, plain.config.hidden_size))
    ours = attention._split_heads(layer, fused_qkv)
    storage = fused_qkv.untyped_storage().data_ptr()
    # Grouped queries interleave with their group's key and value: gathering them is a copy in any split.
    views = ours[1:] if layout == "grouped" else ours
    assert all(t.untyped_storage().data_ptr() == storage for t in views)
    if hasattr(layer, "_split_heads"):
        theirs = layer._split_heads(fused_qkv)
        assert torch.equal(ours[0], theirs[0])
        for mine, reference in zip(ours[1:], theirs[1:], strict=True):
            # transformers broadcasts grouped keys to every query head; the fused path expands them itself.
            groups = reference.shape[2] // mine.shape[2]
            assert torch.equal(mine.repeat_interleave(groups, dim=2), reference)


def test_cudnn_attention_off_while_training_when_asked(oasst: Any, stories: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-cudnn-attention switches cuDNN attention off for every step and evaluation (recorded in the run's
    config), torch's own switch is back afterwards; by default torch keeps its choice."""
    import torch
    import yaml

    from tests.sdpa import record_cudnn_switch
    from tests.train.conftest import GUANACO

    seen = record_cudnn_switch(monkeypatch)
    args = ("--model", stories, "--data", GUANACO, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1,
            "--max-length", 64, "--eval-rows", 2, "--save-steps", 2, "-q")
    result = oasst("train", *args, "--out", tmp_path / "off", "--no-cudnn-attention")
    assert result.exit_code == 0, result.output
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert yaml.safe_load((tmp_path / "off" / "train_config.yaml").read_text())["cudnn_attention"] is False
    seen.clear()
    result = oasst("train", *args, "--out", tmp_path / "on")
    assert result.exit_code == 0, result.output
    assert seen and all(seen)
