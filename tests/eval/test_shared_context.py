"""Shared-context scoring (oasst_eval.shared) gives every request lm-eval's own log-likelihood, with fewer tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.eval.conftest import HELLASWAG_FIXTURE

ITEMS = 24  # real HellaSwag items of the fixture: 96 requests, four endings per context


def _hellaswag_pairs(items: int = ITEMS) -> list[tuple[str, str]]:
    """(context, " " + ending) for each ending, as lm-eval's hellaswag task builds its requests."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    pairs = []
    with HELLASWAG_FIXTURE.open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(items), strict=False):
            doc = json.loads(line)
            query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
            pairs.extend((query, " " + preprocess(ending)) for ending in doc["endings"])
    return pairs


def _instances(pairs: list[tuple[str, str]]) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]


@pytest.fixture
def fresh_patches() -> Iterator[None]:
    from oasst_model import patches

    patches.begin_run()
    yield
    patches.begin_run()


def _model(path: Path, attention: str = "sdpa") -> tuple[Any, Any]:
    from oasst_model.load import load_model

    model, tokenizer = load_model(str(path), compute_dtype="float32")
    model.config._attn_implementation = attention
    return model, tokenizer


def _lm_eval_answers(model: Any, tokenizer: Any, requests: list[Any]) -> list[tuple[float, bool]]:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8).loglikelihood(requests)


def _assert_same(ours: list[tuple[float, bool]], theirs: list[tuple[float, bool]]) -> None:
    assert [g for _, g in ours] == [g for _, g in theirs]
    # The same keys, values and positions for every scored token; only the order of fp32 sums differs.
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize(("attention", "batch_size"), [("sdpa", "auto"), ("eager", "auto"), ("sdpa", 8)])
def test_shared_loglikelihoods_equal_lm_eval(stories: Path, fresh_patches: None, attention: str,
                                             batch_size: str | int) -> None:
    from oasst_eval.fastlm import FastHFLM
    from oasst_model import patches

    model, tokenizer = _model(stories, attention)
    requests = _instances(_hellaswag_pairs())
    theirs = _lm_eval_answers(model, tokenizer, requests)
    # A small token budget: several batches, so batching and the order of answers are exercised.
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=1024)
    ours = lm.loglikelihood(requests)
    _assert_same(ours, theirs)
    stats = lm.shared_stats
    assert stats["requests"] == len(requests)
    assert 0 < stats["checked"] <= 64 and stats["max_abs_diff"] < 1e-3
    # Each context once instead of four times: HellaSwag endings are short next to their contexts.
    assert stats["tokens"] < 0.6 * stats["unshared_tokens"]
    assert patches.report()["lm_eval_shared_context"]["state"] == "active"


def test_shared_on_falcon_fused_attention(tiny_falcon: Path, fresh_patches: None) -> None:
    """Falcon's multi-query layers with the fused-attention patch read the caller's block mask."""
    from oasst_eval.fastlm import FastHFLM
    from oasst_model.attention import fused_attention_layers

    model, tokenizer = _model(tiny_falcon)
    assert fused_attention_layers(model) == 2
    requests = _instances(_hellaswag_pairs(12))
    theirs = _lm_eval_answers(model, tokenizer, requests)
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=1024)
    _assert_same(lm.loglikelihood(requests), theirs)
    assert lm.shared_stats["requests"] == len(requests)


@pytest.mark.parametrize("check_requests", [64, 2])
def test_a_leaking_mask_falls_back_to_the_unshared_path(stories: Path, fresh_patches: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str],
                                                        check_requests: int) -> None:
    """A model whose attention lets endings see each other is caught by the first-batch check; every request is
    then scored unshared (with 2 checked, the unchecked rest of the first batch too)."""
    import torch

    from oasst_eval import shared
    from oasst_eval.fastlm import FastHFLM
    from oasst_model import patches

    def causal_only(segments: Any, kind: str, dtype: Any = None) -> Any:
        width = segments.shape[-1]
        return torch.ones(width, width, dtype=torch.bool).tril()[None, None].expand(len(segments), 1, width, width)

    monkeypatch.setattr(shared, "block_mask", causal_only)
    monkeypatch.setattr(shared, "CHECK_REQUESTS", check_requests)
    model, tokenizer = _model(stories)
    requests = _instances(_hellaswag_pairs())
    theirs = _lm_eval_answers(model, tokenizer, requests)
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=1024)
    _assert_same(lm.loglikelihood(requests), theirs)
    # lm-eval's tqdm bar (HFLM's, and FastHFLM's outside `oasst eval`) shares stderr without ending its line.
    err = capsys.readouterr().err
    warnings = [line[line.index("warning: patch"):] for line in err.splitlines() if "warning: patch" in line]
    assert len(warnings) == 1 and "lm_eval_shared_context" in warnings[0] and "block mask" in warnings[0]
    assert patches.report()["lm_eval_shared_context"]["state"] == "fallback"
    assert lm.shared_context is False


def test_attention_without_a_caller_mask_keeps_the_unshared_path(stories: Path, fresh_patches: None) -> None:
    from oasst_eval.fastlm import FastHFLM
    from oasst_model import patches

    model, tokenizer = _model(stories)
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert lm._mask_kind() is None
    finally:
        model.config._attn_implementation = "sdpa"
    entry = patches.report()["lm_eval_shared_context"]
    assert entry["state"] == "not needed" and "flash_attention_2" in entry["detail"]


def test_off_scores_every_request_unshared(stories: Path, fresh_patches: None) -> None:
    from oasst_eval.fastlm import FastHFLM

    model, tokenizer = _model(stories)
    requests = _instances(_hellaswag_pairs(6))
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, shared_context=False)
    _assert_same(lm.loglikelihood(requests), _lm_eval_answers(model, tokenizer, requests))
    assert lm.shared_stats["requests"] == 0


# ---- which requests share, and how rows are packed ----------------------------------------------------------

def test_plan_groups_by_context_and_leaves_lm_eval_special_cases() -> None:
    from oasst_eval.shared import plan

    requests = [
        (None, [1, 2, 3], [4, 5]),  # 0: context A
        (None, [1, 2, 3], [6]),  # 1: context A
        (None, [1, 2, 3], [4, 5]),  # 2: context A, the same continuation again: answered from one slot
        (None, [7, 8], [9, 9, 9, 9, 9, 9]),  # 3: context B, too long for the window: lm-eval truncates it
        (None, [7, 8], [9]),  # 4: context B, alone once 3 is out
        (None, [], [1, 2]),  # 5: empty context (lm-eval's prefix-token branch)
        (None, [1, 2], [3, 4]),  # 6: context C; its input [1, 2, 3] is also context A's with continuation [6]
        (None, [1, 2], [5]),  # 7: context C
    ]
    groups, rest = plan(requests, max_length=6)
    # Context A's request 1 has input [1, 2, 3] + [] = context C's request 6 input [1, 2, 3]: lm-eval's logits
    # cache groups those across contexts, so neither context shares.
    assert rest == [0, 1, 2, 3, 4, 5, 6, 7] and groups == []
    groups, rest = plan([r for i, r in enumerate(requests) if i not in (6, 7)], max_length=6)
    assert rest == [3, 4, 5]
    (group,) = groups
    assert group.context == [1, 2, 3] and group.continuations == [[4, 5], [6]] and group.members == [[0, 2], [1]]
    assert group.length == 4 and group.requests == 3


def test_plan_splits_a_context_whose_choices_overflow_the_window() -> None:
    from oasst_eval.shared import plan

    requests = [(None, [1, 2, 3], [10 + i, 20 + i, 30 + i]) for i in range(4)]
    groups, rest = plan(requests, max_length=8)
    assert rest == []
    assert all(g.length <= 8 for g in groups)
    assert sorted(i for g in groups for m in g.members for i in m) == [0, 1, 2, 3]
    assert all(g.context == [1, 2, 3] for g in groups) and len(groups) == 2


def test_pack_positions_segments_and_mask() -> None:
    import torch

    from oasst_eval.shared import Group, block_mask, pack

    group = Group(context=[5, 6], continuations=[[7, 8, 9], [3]], members=[[0], [1]])
    other = Group(context=[4], continuations=[[1, 2]], members=[[2]])
    packed = pack([group, other])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8], [4, 1, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert packed.segments.tolist() == [[0, 0, 1, 1], [0, 1, -1, -1]]
    # Ending 1 ([7, 8, 9]) is predicted from the last context position, then its own tokens; ending 2 ([3]) from
    # the last context position alone.
    assert packed.gather == [[[1, 2, 3], [1]], [[4, 5]]]
    mask = block_mask(packed.segments, "bool")[:, 0]
    assert mask[0].tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, True, True, False], [True, True, True, True]]
    # No real token sees padding; a padding row is never empty (it sees itself).
    assert mask[1, :2].tolist() == [[True, False, False, False], [True, True, False, False]]
    assert mask[1, 2, 2] and mask[1, 3, 3]
    additive = block_mask(packed.segments, "float", torch.float32)
    assert torch.equal(additive == 0, block_mask(packed.segments, "bool"))


def test_two_endings_never_see_each_other() -> None:
    from oasst_eval.shared import Group, block_mask, pack

    packed = pack([Group(context=[1], continuations=[[2, 3, 4], [5, 6, 7]], members=[[0], [1]])])
    mask = block_mask(packed.segments, "bool")[0, 0]
    # Row layout: context 1 | ending-1 body 2 3 | ending-2 body 5 6
    assert mask[3, 1:3].tolist() == [False, False] and mask[4, 1:3].tolist() == [False, False]
    assert mask[4].tolist() == [True, False, False, True, True]
