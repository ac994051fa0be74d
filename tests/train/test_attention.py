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


def _reference_varlen(calls: list[tuple[list[int], int]], *, old_signature: bool = False) -> Any:
    """A CPU stand-in for torch's flash varlen kernel, with its signature: causal sdpa over each example alone.

    `old_signature`: torch 2.10's `is_causal` parameter instead of `window_size` and `enable_gqa`."""

    def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
            cu_seq_k: torch.Tensor, max_q: int, max_k: int, causal: bool, gqa: bool) -> torch.Tensor:
        assert causal and cu_seq_q is cu_seq_k and max_q == max_k
        assert cu_seq_q.dtype == torch.int32 and query.dim() == key.dim() == 3
        # Like the kernel: keys with fewer heads only when asked (the old signature's kernel took them as they came).
        assert gqa or key.shape[1] == query.shape[1] or old_signature
        bounds = cu_seq_q.tolist()
        calls.append((bounds, max_q))
        outs = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            assert end - start <= max_q
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=key.shape[1] != query.shape[1]).transpose(0, 1))
        return torch.cat(outs)

    if old_signature:
        def varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                        cu_seq_k: torch.Tensor, max_q: int, max_k: int, is_causal: bool = False,
                        return_aux: Any = None) -> torch.Tensor:
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, False)
    else:
        def varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                        cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, return_aux: Any = None,
                        scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                        enable_gqa: bool = False) -> torch.Tensor:
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), enable_gqa)
    return varlen_attn


@pytest.fixture
def varlen_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], int]]:
    """The varlen kernel as the fused attention would meet it on a GPU, here on the CPU; records each call."""
    import torch.nn.attention.varlen as varlen

    calls: list[tuple[list[int], int]] = []
    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen(calls))
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", ("float16", "bfloat16", "float32"))
    return calls


def _packed_batch(lengths: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of packed examples (position ids restart per example; `pad` trailing pad tokens, each at position 0,
    as trl's padding-free collator pads to a multiple); returns ids, position ids and the examples."""
    seqs = _ids([n for row in lengths for n in row], seed=3)
    ids, positions, at = [], [], 0
    for row in lengths:
        ids.append(torch.cat([*seqs[at:at + len(row)], torch.zeros(pad, dtype=torch.long)]))
        positions.append(torch.cat([*(torch.arange(n) for n in row), torch.zeros(pad, dtype=torch.long)]))
        at += len(row)
    return torch.stack(ids), torch.stack(positions), seqs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_rows_on_the_varlen_kernel_match_the_block_mask(tiny_falcon: Path, layout: str,
                                                               varlen_calls: list[tuple[list[int], int]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packed rows with trl's padding tail: the varlen path gets every example's boundaries (row starts and
    pad tokens included) and gives the logits the block mask gives, each example's logits as alone."""
    _, fused = _pair(tiny_falcon, layout)
    _forbid_fallback(fused)
    ids, positions, seqs = _packed_batch([[11, 23, 7, 3], [30, 14]], pad=3)
    with torch.no_grad():
        varlen = fused(ids, position_ids=positions).logits
        assert fused.transformer._oasst_plan.mode == "varlen"
        monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda",))
        block = fused(ids, position_ids=positions).logits
        assert fused.transformer._oasst_plan.mode == "block"
        flat = varlen.reshape(-1, varlen.shape[-1])
        start = 0
        for i, seq in enumerate(seqs):
            alone = fused(seq[None]).logits[0]
            assert (flat[start:start + len(seq)] - alone).abs().max() < TOL
            start += len(seq) + (3 if i in (3, 5) else 0)  # the pad tail ends each row
    assert (varlen - block).abs().max() < TOL
    row = ids.shape[1]  # 47 tokens a row
    bounds = [0, 11, 34, 41, 44, 45, 46, row, row + 30, row + 44, row + 45, row + 46, 2 * row]
    assert varlen_calls == [(bounds, attention.VARLEN_MIN_BOUND)] * 2  # each layer; no example over 512 tokens
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "VARLEN_MIN_BOUND", 8)
    with torch.no_grad():
        fused(ids, position_ids=positions)
    assert varlen_calls[-1] == (bounds, 32)  # the longest example (30) rounded up to a power of two


def test_varlen_training_gradients_equal_the_block_mask(tiny_falcon: Path,
                                                        varlen_calls: list[tuple[list[int], int]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    fused.train()
    ids, positions, _ = _packed_batch([[13, 19, 6]], pad=2)
    weight = fused.transformer.h[0].self_attention.query_key_value.weight
    grads = []
    for devices in (("cuda", "cpu"), ("cuda",)):
        monkeypatch.setattr(attention, "VARLEN_DEVICES", devices)
        fused.zero_grad()
        fused(ids, position_ids=positions).logits.square().mean().backward()
        grads.append(weight.grad.clone())
    assert len(varlen_calls) == 2
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * grads[1].abs().max()


def test_varlen_kernel_with_torch_2_10_signature(tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.10's varlen_attn says causal with `is_causal` and has no `enable_gqa`."""
    import torch.nn.attention.varlen as varlen

    calls: list[tuple[list[int], int]] = []
    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen(calls, old_signature=True))
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", ("float32",))
    _, fused = _pair(tiny_falcon)
    ids, positions, seqs = _packed_batch([[9, 15]])
    with torch.no_grad():
        packed = fused(ids, position_ids=positions).logits[0]
        alone = fused(seqs[1][None]).logits[0]
    assert calls and (packed[9:] - alone).abs().max() < TOL


def test_varlen_steps_aside_for_a_padding_mask_or_a_changed_torch(tiny_falcon: Path,
                                                                  varlen_calls: list[tuple[list[int], int]],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A padding mask in the batch, or a torch whose varlen_attn changed: the block mask, and (for the changed
    torch) one warning line naming the patch."""
    import torch.nn.attention.varlen as varlen

    from oasst_model import patches

    _, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    ids, positions, _ = _packed_batch([[9, 15]])
    with torch.no_grad():
        fused(ids, position_ids=positions, attention_mask=torch.ones_like(ids))
        assert fused.transformer._oasst_plan.mode == "block"
        assert not varlen_calls
        patches.begin_run()
        monkeypatch.delattr(varlen, "varlen_attn")
        reference = fused(ids, position_ids=positions).logits
        assert fused.transformer._oasst_plan.mode == "block"
    err = capsys.readouterr().err
    assert err.count("warning: patch varlen_attention is off: torch ") == 1 and "lacks varlen_attn" in err
    assert patches.report()["varlen_attention"]["state"] == "fallback"
    assert torch.isfinite(reference).all()


@pytest.mark.slow
def test_packed_training_run_on_the_varlen_kernel_learns_as_on_the_block_mask(
        oasst: Any, tiny_falcon: Path, tmp_path: Path, varlen_calls: list[tuple[list[int], int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`oasst train --packing` through trl's padding-free batches: every step's attention goes to the varlen kernel,
    with the same losses as the block mask, and train_summary.json records the patch. With `--async-inputs` and
    `--lazy-metrics` (the Falcon recipes' pair) the boundaries come with each batch (every forward takes the collated
    plan), and the losses and token counts are the varlen run's."""
    from tests.train.conftest import GUANACO, read_summary

    args = ("--model", tiny_falcon, "--data", GUANACO, "--packing", "--no-load-in-4bit", "--max-steps", 3,
            "--batch-size", 2, "--grad-accum", 1, "--max-length", 384, "--lora-dropout", 0.0, "--eval-rows", 2,
            "--save-steps", 3, "--logging-steps", 1, "-q")
    decided: dict[str, list[str]] = {}
    own = attention._collated_decision

    def counting(given: dict[str, Any], body: Any) -> Any:
        decision = own(given, body)
        decided.setdefault(name, []).append(decision[0] if decision else "read back")
        return decision

    monkeypatch.setattr(attention, "_collated_decision", counting)
    runs = {}
    for name, devices, flag in (("varlen", ("cuda", "cpu"), "--no-async-inputs"),
                                ("async", ("cuda", "cpu"), "--async-inputs"), ("block", ("cuda",), "--async-inputs")):
        monkeypatch.setattr(attention, "VARLEN_DEVICES", devices)
        lazy = ("--lazy-metrics",) if name == "async" else ()  # as the Falcon recipes run: both options together
        result = oasst("train", *args, flag, *lazy, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = read_summary(tmp_path / name)
    losses = {name: [h["loss"] for h in s["log_history"] if "loss" in h] for name, s in runs.items()}
    assert len(losses["varlen"]) == 3 and losses["varlen"] == pytest.approx(losses["block"], rel=1e-5)
    assert losses["async"] == pytest.approx(losses["varlen"], rel=1e-6)
    # lazy_metrics counts tokens at collate, around the collator async_inputs wrapped: the Trainer's own counts.
    assert runs["async"]["patches"]["lazy_metrics"]["state"] == "active"
    assert runs["async"]["step_tokens"] == runs["varlen"]["step_tokens"]
    assert runs["async"]["tokens_seen"] == runs["varlen"]["tokens_seen"] > 0
    assert len(varlen_calls) >= 2 * 3 * 2  # two runs of 3 steps, a forward of 2 layers each
    assert max(len(bounds) for bounds, _ in varlen_calls) > 3  # 3+ examples in 2 rows: a bin holds several
    assert runs["varlen"]["patches"]["varlen_attention"]["state"] == "active"
    assert runs["block"]["patches"]["varlen_attention"]["state"] == "not needed"  # a CPU: the block mask
    # Every forward of the async run (3 steps, 2 evaluations) on the collated boundaries; none of the others asked.
    assert set(decided) == {"async"} and len(decided["async"]) >= 5 and set(decided["async"]) == {"varlen"}
    assert runs["async"]["patches"]["collated_boundaries"]["state"] == "active"
    assert runs["block"]["patches"]["collated_boundaries"]["state"] == "not needed"  # no varlen kernel there
    assert "collated_boundaries" not in runs["varlen"]["patches"]


def test_queries_the_kernel_does_not_take_get_the_block_mask(tiny_falcon: Path,
                                                              varlen_calls: list[tuple[list[int], int]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 queries (a GPU run without autocast) cannot go to flash: the planner sees the dtype coming and plans the
    block mask (the report says why); a layer that meets such queries in a varlen plan builds the mask itself."""
    from oasst_model import patches

    _, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    ids, positions, seqs = _packed_batch([[9, 15, 4]])
    with torch.no_grad():
        alone = fused(seqs[1][None]).logits[0]
        patches.begin_run()
        monkeypatch.setattr(attention, "VARLEN_DTYPES", ("float16", "bfloat16"))
        packed = fused(ids, position_ids=positions).logits[0]
        assert fused.transformer._oasst_plan.mode == "block"
        assert patches.report()["varlen_attention"]["state"] == "not needed"
        assert "float32 queries" in patches.report()["varlen_attention"]["detail"]
        assert (packed[9:24] - alone).abs().max() < TOL
        # The planner (asked first) expects queries the kernel takes; both layers then meet queries it does not.
        answers = iter([True, False, False])
        monkeypatch.setattr(attention, "_varlen_takes", lambda dtype, head_dim: next(answers))
        packed = fused(ids, position_ids=positions).logits[0]
        assert fused.transformer._oasst_plan.mode == "varlen" and not varlen_calls
    assert (packed[9:24] - alone).abs().max() < TOL


def test_an_example_starts_wherever_the_position_ids_break(tiny_falcon: Path,
                                                           varlen_calls: list[tuple[list[int], int]]) -> None:
    """A restart at an id other than 0 starts an example too, for the block mask and the varlen boundaries alike."""
    positions = torch.tensor([[0, 1, 2, 5, 6, 0, 1]])
    mask = block_causal_mask(positions)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]
    assert mask[6].tolist() == [False] * 5 + [True, True]
    _, fused = _pair(tiny_falcon)
    with torch.no_grad():
        fused(torch.stack(_ids([7])), position_ids=positions)
    assert varlen_calls[0][0] == [0, 3, 5, 7]
