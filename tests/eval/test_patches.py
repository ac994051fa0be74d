"""`oasst eval` on a library whose internals changed: lm-eval's and peft's own paths, one warning line per patch,
the same scores, and an eval_summary.json that says which patches ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCORED = ("--tasks", "hellaswag", "--limit", 12)


def _eval(oasst: object, out: Path, *args: object) -> tuple[object, dict]:
    result = oasst("eval", *args, *SCORED, "--out", out)
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "eval_summary.json").read_text())


def _warnings(result: object) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: patch")]


@pytest.mark.slow
def test_changed_lm_eval_internals_score_with_lm_evals_own_hflm(oasst, stories: Path, adapter_dir: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.models.utils
    import lm_eval.utils

    _, fast = _eval(oasst, tmp_path / "fast", "--model", stories, "--adapter", adapter_dir)
    states = {k: v["state"] for k, v in fast["settings"]["patches"].items()}
    assert states == {"lm_eval_fast_loglikelihood": "active", "lm_eval_template_cache": "active",
                      "lm_eval_hellaswag_docs_cache": "active", "lm_eval_request_bars": "active",
                      "lm_eval_shared_context": "active", "lm_eval_env_info_prefetch": "active",
                      "lm_eval_backend_tokenize": "active"}

    # A release that renames a helper FastHFLM imports and changes apply_template's signature.
    monkeypatch.delattr(lm_eval.models.utils, "_add_special_kwargs")
    original = lm_eval.utils.apply_template
    monkeypatch.setattr(lm_eval.utils, "apply_template", lambda *args: original(*args))
    result, plain = _eval(oasst, tmp_path / "plain", "--model", stories, "--adapter", adapter_dir)
    warned = _warnings(result)
    assert sorted(w.split(" is off:")[0] for w in warned) == ["warning: patch lm_eval_fast_loglikelihood",
                                                              "warning: patch lm_eval_template_cache"]
    assert any("lm_eval lacks _add_special_kwargs" in w and "running lm-eval's own HFLM" in w for w in warned)
    assert plain["settings"]["patches"]["lm_eval_fast_loglikelihood"]["state"] == "fallback"
    assert plain["settings"]["patches"]["lm_eval_template_cache"]["state"] == "fallback"
    # lm-eval's own path scores the same items the same way.
    assert plain["adapter"]["hellaswag"]["acc"] == fast["adapter"]["hellaswag"]["acc"]
    assert plain["adapter"]["hellaswag"]["acc_norm"] == fast["adapter"]["hellaswag"]["acc_norm"]


def _changed(monkeypatch: pytest.MonkeyPatch, name: str, problem: str) -> None:
    """Make patch `name`'s check report `problem`, as it would on a release that changed its target (deleting the
    real target would break the library's own path too: bitsandbytes calls its own dequantize_4bit)."""
    from oasst_model import patches

    patch = patches.PATCHES[name]
    monkeypatch.setitem(patches.PATCHES, name, type(patch)(**{**vars(patch), "check": lambda: problem}))


@pytest.mark.slow
def test_a_changed_4bit_lora_target_runs_peft_forward_with_the_same_scores(oasst, stories: Path, adapter_dir: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    _, folded = _eval(oasst, tmp_path / "folded", "--model", stories, "--adapter", adapter_dir, "--load-in-4bit")
    entry = folded["settings"]["patches"]["eval_folded_4bit_lora"]
    assert (entry["state"], entry["places"]) == ("active", 35)  # every LoRA Linear4bit of stories260K
    assert entry["library"].startswith("peft ")

    _changed(monkeypatch, "eval_folded_4bit_lora", "bitsandbytes.functional lacks dequantize_4bit")
    result, fallback = _eval(oasst, tmp_path / "fallback", "--model", stories, "--adapter", adapter_dir,
                             "--load-in-4bit")
    (line,) = [w for w in _warnings(result) if "eval_folded_4bit_lora" in w]
    assert line.startswith("warning: patch eval_folded_4bit_lora is off: peft ")
    assert "(bitsandbytes.functional lacks dequantize_4bit); running peft's own LoRA forward" in line
    entry = fallback["settings"]["patches"]["eval_folded_4bit_lora"]
    assert (entry["state"], entry["places"]) == ("fallback", 0)
    assert "adapter folded into the dequantized weights of 0 4-bit layers" in result.stderr
    assert fallback["adapter"]["hellaswag"]["acc"] == folded["adapter"]["hellaswag"]["acc"]
    assert fallback["adapter"]["hellaswag"]["acc_norm"] == folded["adapter"]["hellaswag"]["acc_norm"]


@pytest.mark.slow
def test_shared_context_off_or_changed_scores_the_same(oasst, stories: Path, adapter_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-shared-context, and a transformers whose mask handling changed, score exactly what sharing scores."""
    _, shared = _eval(oasst, tmp_path / "shared", "--model", stories, "--adapter", adapter_dir, "--compare-base")
    used = shared["settings"]["shared_context_used"]
    assert used["requests"] > 0 and used["tokens"] < 0.6 * used["unshared_tokens"] and used["checked"] > 0
    # Time inside FastHFLM (both models: --compare-base) is part of the two simple_evaluate spans, never more.
    inside = shared["settings"]["loglikelihood_seconds"]
    assert inside["score"] > 0 and inside["tokenize"] > 0
    assert inside["score"] + inside["tokenize"] <= sum(shared["settings"]["seconds"].values()) + 0.02

    result, off = _eval(oasst, tmp_path / "off", "--model", stories, "--adapter", adapter_dir, "--compare-base",
                        "--no-shared-context")
    assert off["settings"]["shared_context"] is False and off["settings"]["shared_context_used"]["requests"] == 0
    assert "lm_eval_shared_context" not in off["settings"]["patches"] and not _warnings(result)

    _changed(monkeypatch, "lm_eval_shared_context", "create_causal_mask lacks position_ids")
    result, changed = _eval(oasst, tmp_path / "changed", "--model", stories, "--adapter", adapter_dir,
                            "--compare-base")
    (warned,) = _warnings(result)
    assert "lm_eval_shared_context is off: transformers" in warned and "create_causal_mask lacks" in warned
    assert changed["settings"]["patches"]["lm_eval_shared_context"]["state"] == "fallback"
    for label in ("base", "adapter"):
        for metric in ("acc", "acc_norm"):
            assert off[label]["hellaswag"][metric] == shared[label]["hellaswag"][metric]
            assert changed[label]["hellaswag"][metric] == shared[label]["hellaswag"][metric]


def test_a_changed_hellaswag_process_docs_runs_uncached_with_the_same_scores(oasst, stories: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks.hellaswag import utils

    calls: list[int] = []
    original = utils.process_docs
    monkeypatch.setattr(utils, "process_docs", lambda dataset: calls.append(1) or original(dataset))
    _, cached = _eval(oasst, tmp_path / "cached", "--model", stories)
    assert cached["settings"]["patches"]["lm_eval_hellaswag_docs_cache"]["state"] == "active"
    cached_calls = len(calls)  # once per dataset the task reads

    calls.clear()
    _changed(monkeypatch, "lm_eval_hellaswag_docs_cache", "process_docs takes another argument")
    result, uncached = _eval(oasst, tmp_path / "uncached", "--model", stories)
    (warned,) = _warnings(result)
    assert "lm_eval_hellaswag_docs_cache is off: lm-eval" in warned and "takes another argument" in warned
    assert uncached["settings"]["patches"]["lm_eval_hellaswag_docs_cache"]["state"] == "fallback"
    assert len(calls) > cached_calls  # lm-eval's own path: processed at every read of the documents
    for metric in ("acc", "acc_norm"):
        assert uncached["base"]["hellaswag"][metric] == cached["base"]["hellaswag"][metric]


def test_cudnn_attention_is_off_while_scoring_unless_asked(oasst, stories: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN attention is switched off around scoring by default (cuDNN plans every new batch shape), on with
    --cudnn-attention or `cudnn_attention: true`; torch's own switch is back as it was after; scores are the same."""
    import torch

    from tests.sdpa import record_cudnn_switch

    seen = record_cudnn_switch(monkeypatch)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    _, off = _eval(oasst, tmp_path / "off", "--model", stories)
    assert seen and not any(seen) and off["settings"]["cudnn_attention"] is False
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored

    seen.clear()
    (tmp_path / "eval.yaml").write_text("cudnn_attention: true\n")
    _, on = _eval(oasst, tmp_path / "on", "--model", stories, "--config", tmp_path / "eval.yaml")
    assert seen and all(seen) and on["settings"]["cudnn_attention"] is True
    seen.clear()
    _, flag = _eval(oasst, tmp_path / "flag", "--model", stories, "--cudnn-attention")
    assert seen and all(seen) and flag["settings"]["cudnn_attention"] is True
    for metric in ("acc", "acc_norm"):
        assert on["base"]["hellaswag"][metric] == off["base"]["hellaswag"][metric]


def test_cudnn_sdpa_without_the_switch_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without cuDNN attention's switch (older, or a build without it): the block runs, nothing raised."""
    import torch

    from oasst_model.attention import cudnn_sdpa

    with cudnn_sdpa(False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.delattr(torch.backends.cuda, "enable_cudnn_sdp")
    with cudnn_sdpa(False):
        assert torch.backends.cuda.cudnn_sdp_enabled()
