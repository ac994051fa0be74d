"""`oasst train --method dpo`: pair rows in both formats (the EOS / end of turn scored, pad not EOS, the tokens we count
are the ones trl scores), the reference (the bare base for a fresh adapter, the SFT model with --init-adapter), the
speed patches under trl's fused LM head, kill -9 and --resume, the tiny-cpu-dpo recipe learning the preferences of 20
trees, the card, and every user error as one line."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.train.conftest import (GUANACO, RECIPES, REPO, STORIES, error_line, invoke, kill_at_first_checkpoint,
                                  read_summary)

TREES = REPO / "fixtures" / "oasst1" / "en-20.trees.jsonl.gz"
RECIPE = RECIPES / "tiny-cpu-dpo.yaml"
USER, BOT = "user", "assistant"
# Short pairs whose replies fit: one exchange and one with an earlier reply in the prompt.
SHORT_PAIRS = [
    {"prompt": [{"role": USER, "content": "What is the capital of France?"}],
     "chosen": [{"role": BOT, "content": "Paris."}], "rejected": [{"role": BOT, "content": "Rome, I think."}]},
    {"prompt": [{"role": USER, "content": "Hi."}, {"role": BOT, "content": "Hello!"},
                {"role": USER, "content": "Name a color."}],
     "chosen": [{"role": BOT, "content": "Blue."}], "rejected": [{"role": BOT, "content": "No."}]},
]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`oasst build --pairs best` of the 20-tree fixture: 73 pairs, train split only."""
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    result = invoke("build", "--input", TREES, "--pairs", "best", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def write_pairs(folder: Path, rows: list[Any], split: str = "train") -> Path:
    """A pairs folder holding `rows` (dicts as JSON, strings as they are) as `split`.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def dpo_trainer(data: Path, out: Path, **flags: Any) -> tuple[Any, Any, Any]:
    """(trainer, data, cfg) as `oasst train --config tiny-cpu-dpo.yaml` builds them, without training."""
    from oasst_model.load import load_tokenizer
    from oasst_train import dpo
    from oasst_train.config import resolve_config
    from oasst_train.preview import run_format
    from oasst_train.trainer import prepare_model, resolve_device_defaults

    cfg = resolve_config(RECIPE, {"model": str(STORIES), "data": str(data), "out": str(out), **flags})
    cfg, _ = dpo.adopt_init_adapter(cfg)
    cfg, _ = resolve_device_defaults(cfg)
    cfg, _ = run_format(cfg, load_tokenizer(cfg.model))
    prepared = prepare_model(cfg)
    built_data = dpo.build_pairs(cfg, prepared.tokenizer, dpo.read_pairs(cfg.data))
    return dpo.build_trainer(cfg, prepared, built_data, fresh=True).trainer, built_data, cfg


def scored_tokens(trainer: Any, max_length: int) -> tuple[int, int]:
    """(reply tokens, reply tokens within max_length) of the rows trl tokenized."""
    rows = trainer.train_dataset
    total = trained = 0
    for prompt, *replies in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
        total += sum(len(r) for r in replies)
        trained += sum(min(len(r), max_length - len(prompt)) for r in replies)
    return total, trained


def test_loss_types_are_the_ones_trl_documents_but_exo_pair() -> None:
    from trl import DPOConfig

    from oasst_train.config import DPO_LOSS_TYPES

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    documented = set(re.findall(r"`'([a-z_]+)'`", help_text))
    assert set(DPO_LOSS_TYPES) == documented - {"exo_pair"}  # exo_pair needs label_smoothing, which no flag sets


def test_a_thread_build_trained_with_method_dpo_is_one_line_naming_the_build_needed(oasst, tmp_path: Path) -> None:
    result = oasst("train", "--method", "dpo", "--model", STORIES, "--data", GUANACO, "--out", tmp_path / "run")
    assert error_line(result) == (
        f"error: {GUANACO / 'train.jsonl'} holds conversations (`text` / `messages` rows, an `oasst build` without "
        "--pairs); method dpo trains on preference pairs: build them with `oasst build --pairs best`, or train these "
        "with --method sft")
    assert not (tmp_path / "run").exists()


def test_a_pairs_build_trained_with_method_sft_is_one_line_naming_the_build_needed(oasst, pairs: Path,
                                                                                  tmp_path: Path) -> None:
    result = oasst("train", "--model", STORIES, "--data", pairs, "--out", tmp_path / "run")
    assert error_line(result) == (
        f"error: {pairs / 'train.jsonl'} holds preference pairs (prompt, chosen, rejected), as `oasst build --pairs` "
        "writes them: train them with --method dpo, or build conversations (without --pairs) for --method sft")


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": SHORT_PAIRS[0]["prompt"], "chosen": SHORT_PAIRS[0]["chosen"]},
     "row has no `rejected` column (it has: prompt, chosen)"),
    ({**SHORT_PAIRS[0], "chosen": SHORT_PAIRS[0]["chosen"] * 2},
     "`chosen` must be one assistant message ([{\"role\": \"assistant\", \"content\": ...}]), not 2 turns"),
    ({**SHORT_PAIRS[0], "rejected": [{"role": "robot", "content": "x"}]},
     "rejected: messages[0] role 'robot' is not user, assistant or system"),
    ({**SHORT_PAIRS[0], "prompt": SHORT_PAIRS[1]["prompt"][:2]},
     "`prompt` must end with the user turn the replies answer, not assistant"),
    ("[1, 2]", "a row must be a JSON object with prompt, chosen and rejected, not a list"),
    ({**SHORT_PAIRS[0], "chosen": [{"role": "user", "content": "x"}]},
     "`chosen` must be one assistant message ([{\"role\": \"assistant\", \"content\": ...}]), not one user turn"),
    ({**SHORT_PAIRS[0], "rejected": [{"role": "assistant", "content": " "}]},
     "`rejected` content is empty: a reply with no text to prefer or not"),
    ({"text": "### Human: a### Assistant: b"}, "row is a conversation thread (`text` / `messages`) among preference "
                                                "pairs"),
], ids=["missing-column", "two-replies", "bad-role", "prompt-ends-with-reply", "not-an-object", "a-user-reply",
        "empty-reply", "one-thread-row"])
def test_a_bad_pair_row_is_one_line_naming_its_line(oasst, tmp_path: Path, row: Any, message: str) -> None:
    data = write_pairs(tmp_path / "pairs", [SHORT_PAIRS[1], row])
    result = oasst("train", "--method", "dpo", "--model", STORIES, "--data", data, "--out", tmp_path / "run")
    assert error_line(result) == f"error: {data / 'train.jsonl'}:2: {message}"


def test_pairs_whose_replies_are_one_text_are_skipped_with_one_warning(oasst, tmp_path: Path) -> None:
    same = {**SHORT_PAIRS[0], "rejected": SHORT_PAIRS[0]["chosen"]}
    data = write_pairs(tmp_path / "pairs", [SHORT_PAIRS[1], same, same])
    result = oasst("train", "--method", "dpo", "--model", STORIES, "--data", data, "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"warning: {data / 'train.jsonl'}: 2 pair(s) whose chosen and rejected replies are the same text were "
            f"skipped: neither can be preferred (first: {data / 'train.jsonl'}:2)") in result.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (("--init-adapter", "runs/sft"), "--init-adapter: init_adapter is for method dpo (the SFT adapter DPO starts "
                                     "from); with method sft, leave it empty"),
    (("--method", "dpo", "--beta", "0"), "--beta: beta must be positive, not 0.0"),
    (("--method", "dpo", "--packing"), "--packing: packing does not apply to method dpo (each pair is scored as its "
                                       "own two rows); set packing false"),
    (("--method", "dpo", "--group-by-length"), "--group-by-length: group_by_length does not apply to method dpo (its "
                                               "sampler needs conversation rows); set group_by_length false"),
    (("--method", "dpo", "--init-adapter", "no/such/adapter"), "adapter folder no/such/adapter does not exist"),
    # `--init-adapter "$SFT"` with SFT unset trained against the bare base, silently.
    (("--method", "dpo", "--init-adapter", ""), "--init-adapter: init_adapter is empty: give a path, or leave the "
                                                "flag out"),
])
def test_dpo_settings_that_cannot_work_are_one_line(oasst, pairs: Path, tmp_path: Path, flags: tuple[str, ...],
                                                    message: str) -> None:
    result = oasst("train", "--model", STORIES, "--data", pairs, "--out", tmp_path / "run", *flags)
    assert error_line(result) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_an_out_inside_the_init_adapter_is_refused(oasst, pairs: Path, tmp_path: Path) -> None:
    """It trained and wrote into the SFT run (inputs are never touched, as for --data and --model)."""
    from tests.train.test_hostile import fake_adapter

    fake_adapter(tmp_path / "sft")
    result = oasst("train", "--method", "dpo", "--model", STORIES, "--data", pairs, "--init-adapter",
                   tmp_path / "sft", "--out", tmp_path / "sft" / "dpo")
    assert error_line(result) == (f"error: --out {tmp_path / 'sft' / 'dpo'} lies inside the input --init-adapter "
                                  f"{tmp_path / 'sft'}; choose another --out")


def test_a_loss_type_trl_lacks_is_one_line_naming_the_recipe_line(oasst, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dpo\nloss_type: exo_pair\n")
    result = oasst("train", "--config", recipe, "--model", STORIES, "--data", "d", "--out", tmp_path / "run")
    assert error_line(result).startswith(f"error: {recipe}:2: loss_type must be one of sigmoid, hinge, ipo, ")


def test_a_setting_the_method_ignores_is_one_warning_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from oasst_train.config import resolve_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dpo\nloss_on: all\n")
    resolve_config(recipe, {"model": "m", "data": "d", "out": "o"})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "beta": 0.5})
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {recipe}:2: loss_on is ignored with method dpo (DPO scores the replies of each pair only)",
        "warning: --beta: beta is ignored with method sft (it is a DPO setting)"]


def test_dry_run_prints_the_pair_report_and_the_first_pair(oasst, pairs: Path) -> None:
    result = oasst("train", "--config", RECIPE, "--model", STORIES, "--data", pairs, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "format: guanaco (auto: the tokenizer has no chat template)",
        "reference: the base model (the new adapter disabled while scoring)",
        f"data train: 73 pairs, 42 cut at 128 tokens, 31 dropped: the prompt alone fills them (first: "
        f"{pairs / 'train.jsonl'}:4)",
        "  4,453 of 46,965 reply tokens scored (9.5%); pairs whose two replies end (EOS / end of turn) within "
        "max_length: 0 of 42"]
    assert lines[4] == f"example: {pairs / 'train.jsonl'}:1 (prompt, chosen, rejected):"
    assert lines[5].startswith("### Human: How can I find the best 401k plan for my needs?### Assistant: The first")


def test_card_says_dpo_its_beta_loss_reference_and_reward_figures() -> None:
    from oasst_train.card import model_card

    summary = {"global_step": 40, "method": "dpo", "reward_accuracy_first": 0.0, "reward_accuracy_last": 0.975,
               "reward_margin_first": 0.0, "reward_margin_last": 12.5, "logps_chosen_last": -250.0,
               "logps_rejected_last": -380.0}
    config = {"model": "m", "data": "", "method": "dpo", "beta": 0.1, "loss_type": "sigmoid",
              "init_adapter": "runs/sft", "format": "guanaco"}
    card = model_card(summary, config)
    assert "\n- dpo\n" in card
    assert ("Method: DPO on preference pairs (trl's DPOTrainer), loss type sigmoid, beta 0.1; reference model: the SFT "
            "adapter `runs/sft` (a frozen copy), which this adapter continues from.") in card
    assert "| DPO reward accuracy, last logged | 0.9750 |" in card
    assert "| DPO reward margin, last logged | 12.5000 |" in card
    assert "`dpo.png` plots the reward accuracy" in card
    fresh = model_card(summary, {**config, "init_adapter": ""})
    assert "reference model: the base model (this adapter disabled)" in fresh


@pytest.mark.slow
def test_guanaco_pairs_end_in_eos_pad_is_not_eos_and_trl_scores_the_tokens_we_count(pairs: Path,
                                                                                   tmp_path: Path) -> None:
    trainer, data, cfg = dpo_trainer(write_pairs(tmp_path / "short", SHORT_PAIRS), tmp_path / "out")
    tokenizer = trainer.processing_class
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # padding never hides an EOS
    rows = trainer.train_dataset
    assert tokenizer.decode(rows[1]["prompt_ids"]) == ("<s> ### Human: Hi.### Assistant: Hello!### Human: Name a "
                                                       "color.### Assistant:")
    assert [tokenizer.decode(r["chosen_ids"]) for r in rows] == ["Paris.</s>", "Blue.</s>"]
    assert [tokenizer.decode(r["rejected_ids"]) for r in rows] == ["Rome, I think.</s>", "No.</s>"]
    assert all(r["chosen_ids"].count(tokenizer.eos_token_id) == 1 for r in rows)
    batch = trainer.data_collator([rows[0]])
    eos_at = batch["input_ids"][0].tolist().index(tokenizer.eos_token_id)
    assert batch["completion_mask"][0, eos_at] == 1  # the EOS is scored: the model learns to stop
    assert data.report["train"]["rows_end_trained"] == 2

    # The 73 pairs of 20 trees: cut and dropped where trl cuts and drops them.
    trainer, data, cfg = dpo_trainer(pairs, tmp_path / "out2")
    report = data.report["train"]
    assert len(trainer.train_dataset) == report["rows"] - report["rows_dropped"] == 42
    assert scored_tokens(trainer, cfg.max_length) == (report["reply_tokens"], report["reply_tokens_trained"])


@pytest.mark.slow
def test_chat_template_pairs_train_with_the_end_of_turn_scored(oasst, chatml_model: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "short", SHORT_PAIRS * 4)
    trainer, built, cfg = dpo_trainer(data, tmp_path / "out", model=str(chatml_model))
    assert cfg.format == "chat-template"
    tokenizer = trainer.processing_class
    rows = trainer.train_dataset
    assert tokenizer.decode(rows[0]["prompt_ids"]) == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                       "<|im_start|>assistant\n")
    assert tokenizer.decode(rows[0]["chosen_ids"]) == "Paris.<|im_end|>\n"
    assert scored_tokens(trainer, cfg.max_length) == (built.report["train"]["reply_tokens"],
                                                      built.report["train"]["reply_tokens_trained"])
    out = tmp_path / "run"
    result = oasst("train", "--config", RECIPE, "--model", chatml_model, "--data", data, "--out", out,
                   "--max-steps", 3, "-q")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["global_step"] == 3 and summary["format"] == "chat-template"
    assert summary["reward_accuracy_last"] is not None and summary["logps_chosen_last"] < 0


@pytest.mark.slow
def test_reference_is_the_bare_base_for_a_fresh_adapter_and_the_sft_model_with_init_adapter(
        pairs: Path, stories_run: Path, tmp_path: Path) -> None:
    """The trap: with --init-adapter a reference scored with the adapter disabled is the bare base, not SFT."""
    import torch

    from oasst_model.spec import ModelSpec, load

    sft, _ = load(ModelSpec.from_adapter(stories_run))  # the SFT model on its own, as `oasst generate` loads it
    sft.eval()

    def sequence_logps(batch: dict[str, Any], adapter: bool) -> torch.Tensor:
        """Sum of the completion tokens' log-probs, from the full logits of a plain forward."""
        ids = batch["input_ids"]
        with torch.no_grad():
            if adapter:
                logits = sft(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            else:
                with sft.disable_adapter():
                    logits = sft(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logps * batch["completion_mask"][:, 1:]).sum(1)

    for init, expected in (("", False), (str(stories_run), True)):
        trainer, _, _ = dpo_trainer(pairs, tmp_path / f"out{int(expected)}", init_adapter=init, batch_size=4)
        assert ("ref" in trainer.model.peft_config) is expected
        batch = next(iter(trainer.get_train_dataloader()))
        reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
        with torch.no_grad():
            policy = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                                   labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                                   fused_lm_head=True).log_probs.sum(1)
        base, tuned = sequence_logps(batch, adapter=False), sequence_logps(batch, adapter=True)
        assert (tuned - base).abs().mean() > 10  # SFT moved these replies' log-probs: the test can tell them apart
        want = tuned if expected else base
        torch.testing.assert_close(reference, want, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(policy, want, atol=1e-3, rtol=1e-5)  # step 0: the policy is its reference


@pytest.mark.slow
@pytest.mark.parametrize("concat", [False, True], ids=["addmm", "concat"])
def test_falcon_4bit_dpo_keeps_every_training_patch_under_trls_fused_lm_head(oasst, tiny_falcon: Path,
                                                                            tmp_path: Path, concat: bool) -> None:
    from tests.train.test_patches import SHORT  # the settings a GPU user gets without a recipe, cut to seconds

    data = write_pairs(tmp_path / "pairs", SHORT_PAIRS * 2)
    result = oasst("train", "--method", "dpo", "--model", tiny_falcon, "--data", data, "--out", tmp_path / "run",
                   *SHORT, *(["--concat-lora"] if concat else []))
    assert result.exit_code == 0, result.output
    assert "warning: patch" not in result.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["global_step"] == 2 and summary["linear4bit_layers"] == 8
    states = {name: (entry["state"], entry["places"]) for name, entry in summary["patches"].items()}
    assert states == {"falcon_4bit_linear": ("active", 1), "bnb_cpu_weights_unpacked": ("active", 8),
                      "falcon_fused_attention": ("active", 2), "cast_norm_outputs": ("active", 3),
                      "fused_lora": ("active", 8), **({"concat_lora": ("active", 8)} if concat else {})}
    assert summary["reward_accuracy_last"] is not None


@pytest.mark.slow
def test_tiny_cpu_dpo_recipe_learns_the_preferences_of_20_trees(oasst, pairs: Path, tmp_path: Path) -> None:
    """Issue 13's acceptance: the recipe on the pairs of 20 trees, 40 steps (~7.6 epochs of the 42 pairs kept)."""
    out = tmp_path / "run"
    started = time.monotonic()
    result = oasst("train", "--config", RECIPE, "--model", STORIES, "--data", pairs, "--out", out)
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["global_step"] == 40 and summary["method"] == "dpo"
    # Measured (seed 42): accuracy 0.0 -> 0.975, margin 0 -> ~12.6; lr 2.5e-4 already reaches 0.975.
    assert summary["reward_accuracy_first"] == 0.0 and summary["reward_margin_first"] == 0.0  # policy == reference
    assert summary["reward_accuracy_last"] > 0.6 and summary["reward_margin_last"] > 0
    assert summary["logps_chosen_last"] > summary["logps_rejected_last"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["data"]["train"]["rows"] == 73 and summary["data"]["train"]["rows_dropped"] == 31
    for name in ("loss.png", "dpo.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "ref").exists()  # only the trained adapter is the output
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (saved["method"], saved["beta"], saved["loss_type"], saved["init_adapter"]) == ("dpo", 0.1, "sigmoid", "")
    card = (out / "README.md").read_text()
    assert "loss type sigmoid, beta 0.1; reference model: the base model" in card
    assert re.search(r"reward accuracy first -> last\s*│\s*0\.000 -> 0\.9", result.stdout), result.stdout
    assert seconds < 60, seconds


def _resume_args(out: Path, adapter: Path, pairs: Path) -> list[str]:
    return ["train", "--config", str(RECIPE), "--model", str(STORIES), "--data", str(pairs), "--out", str(out),
            "--init-adapter", str(adapter), "--max-steps", "12", "--save-steps", "3", "--logging-steps", "1",
            "--batch-size", "4", "--max-length", "96", "-q"]


@pytest.mark.slow
def test_dpo_from_sft_kill_9_then_resume_reaches_the_same_losses_as_an_uninterrupted_run(
        oasst, pairs: Path, stories_run: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert oasst(*_resume_args(straight, stories_run, pairs)).exit_code == 0
    want = {e["step"]: (e["loss"], e["rewards/margins"]) for e in read_summary(straight)["log_history"]
            if "loss" in e}

    killed = tmp_path / "killed"
    stopped_at = kill_at_first_checkpoint(killed, _resume_args(killed, stories_run, pairs))
    assert stopped_at < 12

    result = oasst(*_resume_args(killed, stories_run, pairs), "--resume")
    assert result.exit_code == 0, result.output
    summary = read_summary(killed)
    got = {e["step"]: (e["loss"], e["rewards/margins"]) for e in summary["log_history"] if "loss" in e}
    assert summary["global_step"] == 12 and summary["resumed_from"] == f"checkpoint-{stopped_at}"
    assert sorted(got) == sorted(want)  # the curve continues where it stopped: no gap, no repeated steps
    for step, (loss, margin) in want.items():  # same optimizer, data order and reference (the SFT adapter again)
        assert got[step][0] == pytest.approx(loss, abs=1e-4), step
        assert got[step][1] == pytest.approx(margin, abs=1e-3), step
    assert summary["reward_accuracy_first"] == 0.0  # step 1: the policy is the SFT model, its own reference


def test_an_init_adapter_naming_another_base_is_one_warning_and_the_new_adapter_names_the_real_one(
        pairs: Path, stories_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """peft compared vocabularies against the named model at every save (its UserWarning on the terminal, the
    embeddings saved for nothing)."""
    import shutil

    adapter = tmp_path / "sft"
    shutil.copytree(stories_run, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    other = str(REPO.parent / "shared" / "models" / "falcon-7b-tokenizer")
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": other}))
    trainer, _, cfg = dpo_trainer(pairs, tmp_path / "out", init_adapter=str(adapter), batch_size=4)
    assert trainer.model.peft_config["default"].base_model_name_or_path == cfg.model
    assert (f"warning: --init-adapter {adapter} names {other} as its base; its weights fit {cfg.model}, which DPO "
            "trains on and the new adapter names") in capsys.readouterr().err
