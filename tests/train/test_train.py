"""`oasst train` end to end: 4-bit Falcon, a real model that learns, packing without leaks, kill -9 and resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from oasst_train.checkpoints import last_complete_checkpoint
from tests.train.conftest import (GUANACO, RECIPES, STORIES_STEPS, error_line, kill_at_first_checkpoint,
                                  read_summary)

SUMMARY_KEYS = {"global_step", "train_loss_first", "train_loss_last", "eval_loss_last", "linear4bit_layers",
                "trainable_parameters", "real_tokens_per_second", "peak_memory_bytes", "versions"}


@pytest.mark.slow
def test_tiny_falcon_4bit_run_writes_adapter_and_reports_4bit_layers(oasst, tiny_falcon: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "falcon"
    result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", out, "--load-in-4bit",
                   "--compute-dtype", "float32", "--precision", "fp32", "--max-steps", 3, "--batch-size", 2,
                   "--grad-accum", 1, "--max-length", 64, "--eval-rows", 4, "--save-steps", 3)
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["global_step"] == 3
    assert summary["linear4bit_layers"] == 8  # 2 layers x Falcon's 4 linear modules
    assert summary["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert summary["real_tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0
    # Per-step figures (bench/train_throughput.py recomputes tokens/s over chosen steps from them).
    assert len(summary["step_tokens"]) == len(summary["step_seconds"]) == 3
    assert sum(summary["step_tokens"]) == summary["tokens_seen"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "train_config.yaml",
                 "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"4-bit layers\s*│\s*8\s*│", result.stdout), result.stdout  # the final rich table


@pytest.mark.slow
def test_stories_eval_loss_falls_and_every_lora_weight_changed(stories_run: Path, stories: Path) -> None:
    from safetensors.torch import load_file

    summary = read_summary(stories_run)
    assert summary["global_step"] == STORIES_STEPS
    assert summary["linear4bit_layers"] == 35  # 5 layers x 7 linear modules; the tied head stays unquantized
    # Measured: 4.70 -> ~3.2. A clear margin: at least 0.8 nats/token lower on the 17 held-out rows.
    assert summary["eval_loss_last"] < summary["eval_loss_first"] - 0.8
    assert summary["train_loss_last"] < summary["train_loss_first"]
    lora_b = {k: v for k, v in load_file(stories_run / "adapter_model.safetensors").items() if "lora_B" in k}
    assert len(lora_b) == 35 and all(v.abs().sum() > 0 for v in lora_b.values())  # lora_B starts at zero
    saved = yaml.safe_load((stories_run / "train_config.yaml").read_text())
    assert saved["model"] == str(stories) and saved["max_steps"] == STORIES_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("which", ["falcon", "falcon-fused", "llama"])
def test_packed_sequence_gives_the_same_logits_as_alone(which: str, tiny_falcon: Path, stories: Path) -> None:
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from oasst_model.load import load_model
    from oasst_train.trainer import disable_kv_cache

    net, tokenizer = load_model(str(stories if which == "llama" else tiny_falcon), compute_dtype="float32",
                                attn_implementation="sdpa", fused_attention=which == "falcon-fused")
    disable_kv_cache(net)  # as run_training does
    first = tokenizer("### Human: Tell me about cats.### Assistant: Cats purr.").input_ids
    second = tokenizer("### Human: And dogs?### Assistant: Dogs bark at the mailman.").input_ids
    # trl's own padding-free collator, as SFTTrainer uses it with packing: one row, position ids restart.
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": first}, {"input_ids": second}])
    assert batch["position_ids"][0, len(first)] == 0
    with torch.no_grad():
        packed = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, len(first):]
        alone = net(input_ids=torch.tensor([second])).logits[0]
        cached = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=True).logits[0, len(first):]
    if which == "falcon" and _leaky_transformers():
        # transformers 5.17 lets packed Falcon examples see each other (0.31 here): why check_packing refuses it.
        assert (packed - alone).abs().max() > 1e-2
        return
    assert (packed - alone).abs().max() < 1e-4
    if which == "falcon-fused":
        # The fused path builds its block mask from the position ids, cache or not.
        assert (cached - alone).abs().max() < 1e-4
    else:
        # The trap disable_kv_cache avoids: with a KV cache, the position ids are ignored and the examples mix.
        assert (cached - alone).abs().max() > 1e-2


def _leaky_transformers() -> bool:
    """Whether the installed transformers lets packed Falcon examples attend to each other (before 5.24)."""
    import transformers
    from packaging.version import Version

    from oasst_train.trainer import PACKING_MIN_TRANSFORMERS

    return Version(transformers.__version__) < Version(PACKING_MIN_TRANSFORMERS)


def test_packing_is_refused_for_falcon_on_transformers_that_leak(tiny_falcon: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from oasst_tools.errors import OasstError
    from oasst_model.load import load_model
    from oasst_train.trainer import check_packing

    net, _ = load_model(str(tiny_falcon), compute_dtype="float32", fused_attention=False)
    if not _leaky_transformers():
        check_packing(net)  # the installed version passes the leak test above
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(OasstError, match=r"^packing Falcon on transformers 5\.17\.0 lets packed examples attend"):
        check_packing(net)
    fused, _ = load_model(str(tiny_falcon), compute_dtype="float32")
    check_packing(fused)  # its own block mask does not depend on the transformers version


@pytest.mark.slow
def test_packed_training_runs_and_counts_real_tokens(oasst, stories: Path, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--packing", "--no-load-in-4bit", "--max-steps", 3, "--eval-rows", 2, "-q")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["global_step"] == 3
    # 3 steps x 8 packed rows of at most 256 tokens, none of them padding.
    assert 0 < summary["tokens_seen"] <= 3 * 8 * 256


@pytest.mark.slow
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_training_steps_see_labels_masked_exactly_where_the_loss_mask_says(oasst, stories: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         loss_on: str) -> None:
    """The mask function is tested token by token (test_data.py); this checks that training uses it: the labels
    trl hands the model in each real step are -100 exactly where the mask is 0 (and nowhere with loss_on all)."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from oasst_train.data import render_messages, tokenize_text
    from oasst_model.load import set_pad_token
    from tests.train.test_data import CONVERSATION

    seen: list[dict[str, list[int]]] = []
    original = SFTTrainer.compute_loss

    def spy(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            seen.append({key: inputs[key][0].tolist() for key in ("input_ids", "labels")})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", spy)
    text = render_messages(CONVERSATION)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
    result = oasst("train", "--model", stories, "--data", tmp_path / "data", "--out", tmp_path / "out", "--no-load-in-4bit",
                   "--compute-dtype", "float32", "--precision", "fp32", "--max-steps", 2, "--batch-size", 1,
                   "--grad-accum", 1, "--loss-on", loss_on, "-q")
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(stories)
    set_pad_token(tokenizer)
    ids, mask = tokenize_text(tokenizer, text, assistant_only=True)
    assert 0 < sum(mask) < len(mask)  # both kinds of token are there to be told apart
    want = [token if bit or loss_on == "all" else -100 for token, bit in zip(ids, mask, strict=True)]
    assert len(seen) == 2
    for batch in seen:
        assert batch["input_ids"] == ids
        assert batch["labels"] == want


def _train_args(out: Path, stories: Path) -> list[str]:
    return ["train", "--config", str(RECIPES / "tiny-cpu.yaml"), "--model", str(stories), "--data", str(GUANACO),
            "--out", str(out), "--no-load-in-4bit", "--max-steps", "30", "--save-steps", "5", "--logging-steps", "1",
            "--batch-size", "4", "--lora-dropout", "0.1", "--eval-rows", "4", "-q"]


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_losses_as_an_uninterrupted_run(oasst, stories: Path,
                                                                             tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert oasst(*_train_args(straight, stories)).exit_code == 0
    want = {e["step"]: e["loss"] for e in read_summary(straight)["log_history"] if "loss" in e}

    killed = tmp_path / "killed"
    stopped_at = kill_at_first_checkpoint(killed, _train_args(killed, stories))
    assert stopped_at < 30

    result = oasst(*_train_args(killed, stories), "--resume")
    assert result.exit_code == 0, result.output
    summary = read_summary(killed)
    got = {e["step"]: e["loss"] for e in summary["log_history"] if "loss" in e}
    assert summary["global_step"] == 30 and summary["resumed_from"] == f"checkpoint-{stopped_at}"
    assert sorted(got) == sorted(want)  # the curve continues where it stopped: no gap, no repeated steps
    for step, loss in want.items():  # same optimizer, scheduler, data order and dropout RNG
        assert got[step] == pytest.approx(loss, abs=1e-4), step


@pytest.mark.slow
def test_resume_skips_a_half_written_checkpoint(oasst, stories_run: Path, tmp_path: Path, stories: Path) -> None:
    import shutil

    from oasst_train.checkpoints import incomplete_reason

    out = tmp_path / "run"
    shutil.copytree(stories_run, out)
    good = last_complete_checkpoint(out)
    assert good is not None and good.name == f"checkpoint-{STORIES_STEPS}"
    # A later checkpoint cut short while the optimizer state was being written, as a kill leaves it.
    half = out / "checkpoints" / f"checkpoint-{STORIES_STEPS + 30}"
    shutil.copytree(good, half)
    state = json.loads((half / "trainer_state.json").read_text())
    state["global_step"] = STORIES_STEPS + 30
    (half / "trainer_state.json").write_text(json.dumps(state))
    data = (half / "optimizer.pt").read_bytes()
    (half / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert incomplete_reason(half) == "optimizer.pt is truncated"
    assert last_complete_checkpoint(out) == good
    (half / "trainer_state.json").unlink()
    assert incomplete_reason(half) == "trainer_state.json missing"
    assert last_complete_checkpoint(out) == good


def test_resume_without_checkpoint_is_one_clear_error(oasst, stories: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    result = oasst("train", "--model", stories, "--data", GUANACO, "--out", out, "--resume")
    assert error_line(result) == f"error: --resume: no checkpoint in {out / 'checkpoints'}; start without --resume"
    assert not out.exists()


def test_resume_with_only_half_written_checkpoints_names_them(oasst, stories: Path, tmp_path: Path) -> None:
    half = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    half.mkdir(parents=True)
    (half / "adapter_config.json").write_text("{}")
    result = oasst("train", "--model", stories, "--data", GUANACO, "--out", tmp_path / "run", "--resume")
    assert error_line(result) == (f"error: --resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'} "
                                  "(checkpoint-5: adapter_model.safetensors missing)")


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten(oasst, stories_run: Path, stories: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in stories_run.rglob("*") if p.is_file()}
    result = oasst("train", "--model", stories, "--data", GUANACO, "--out", stories_run, "--no-load-in-4bit")
    assert error_line(result) == (f"error: {stories_run} already holds a training run; pass --resume to continue "
                                  "it, or choose another --out")
    assert before == {p: p.stat().st_mtime_ns for p in stories_run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_resume_with_a_config_that_changes_the_data_order_is_refused(oasst, stories_run: Path,
                                                                      stories: Path) -> None:
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", stories_run, "--batch-size", 2, "--resume")
    assert error_line(result) == f"error: --resume: the config differs from the run in {stories_run}: batch_size 8 -> 2"
