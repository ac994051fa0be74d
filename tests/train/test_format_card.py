"""The conversation format a run was told or chose is printed, recorded (train_config.yaml, train_summary.json),
kept by --resume and used by generate and chat; the data report goes into train_summary.json; the adapter and every
checkpoint carry a model card instead of peft's and trl's templates."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.train.conftest import GUANACO, RECIPES, STORIES, error_line, invoke, read_summary

CHATML_PROMPT = "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Run:
    """A finished run and what it printed on stderr."""

    out: Path
    stderr: str


@pytest.fixture(scope="module")
def guanaco_run(chatml_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """2 steps of the tiny-cpu recipe on stories260K with a ChatML template, told --format guanaco (auto would pick
    the template), a checkpoint at each step."""
    out = tmp_path_factory.mktemp("format-run") / "run"
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", chatml_model, "--data", GUANACO,
                    "--out", out, "--max-steps", 2, "--save-steps", 1, "--format", "guanaco")
    assert result.exit_code == 0, result.output
    return Run(out, result.stderr)


def test_the_format_a_run_was_told_is_printed_once_and_recorded(guanaco_run: Run) -> None:
    lines = guanaco_run.stderr.splitlines()
    assert [line for line in lines if line.startswith("format: ")] == ["format: guanaco (flag)"]
    saved = yaml.safe_load((guanaco_run.out / "train_config.yaml").read_text(encoding="utf-8"))
    summary = read_summary(guanaco_run.out)
    assert saved["format"] == summary["format"] == "guanaco"
    # The data report, per split, printed at the start and kept in the summary.
    assert set(summary["data"]) == {"train", "test"}
    train = summary["data"]["train"]
    assert (train["rows"], train["format"], train["max_length"]) == (171, "guanaco", 256)
    assert train["loss_tokens_trained"] + train["loss_tokens_lost"] == train["loss_tokens"]
    assert (f"data train: 171 rows, {train['rows_cut']} cut at 256 tokens, {train['rows_dropped']} dropped with no "
            f"token to learn from (first: {train['first_dropped']})") in lines
    assert any(line.startswith("data test: 17 rows, ") for line in lines)


def test_resume_keeps_the_recorded_format_and_refuses_another(guanaco_run: Run, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(guanaco_run.out, out)
    model = yaml.safe_load((out / "train_config.yaml").read_text(encoding="utf-8"))["model"]
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", model, "--data", GUANACO, "--out", out,
                    "--max-steps", 3, "--save-steps", 1, "--format", "chat-template", "--resume")
    assert error_line(result) == (f"error: --resume: the config differs from the run in {out}: "
                                  "format 'guanaco' -> 'chat-template'")


def test_a_resumed_run_takes_the_recorded_format_and_older_runs_were_guanaco(chatml_model: Path) -> None:
    from oasst_train.config import TrainConfig
    from oasst_train.preview import run_format
    from tests.conftest import chatml_tokenizer_of

    tokenizer = chatml_tokenizer_of(chatml_model)
    cfg = TrainConfig(model=str(chatml_model), data=str(GUANACO), out="run")
    assert run_format(cfg, tokenizer) == (dataclasses.replace(cfg, format="chat-template"),
                                          "format: chat-template (auto: the tokenizer has a chat template)")
    resumed, line = run_format(cfg, tokenizer, saved={"format": "guanaco"})
    assert (resumed.format, line) == ("guanaco", "format: guanaco (resumed run)")
    # A train_config.yaml without `format` was written when Guanaco was the only format.
    assert run_format(cfg, tokenizer, saved={})[0].format == "guanaco"
    # A given format says where it came from, in the words of device_defaults and eval's base_loaded.
    told = dataclasses.replace(cfg, format="guanaco")
    assert run_format(told, tokenizer, origins={"format": "r.yaml:3"})[1] == "format: guanaco (config)"
    assert run_format(told, tokenizer, origins={"format": "--format"})[1] == "format: guanaco (flag)"
    assert run_format(told, tokenizer)[1] == "format: guanaco (set)"  # a library caller's TrainConfig


def test_the_adapter_and_every_checkpoint_carry_a_model_card(guanaco_run: Run, chatml_model: Path) -> None:
    out = guanaco_run.out
    summary = read_summary(out)
    build = json.loads((GUANACO / "build_report.json").read_text(encoding="utf-8"))
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    # trl's own card ("fine-tuned version of [None]") is not written beside the checkpoints.
    assert not (out / "checkpoints" / "README.md").exists()
    for folder, step in [(out, 2), (checkpoints[0], 1), (checkpoints[1], 2)]:
        card = (folder / "README.md").read_text(encoding="utf-8")
        for leftover in ("[None]", "More Information Needed", "Model Card for Model ID"):
            assert leftover not in card, (folder, leftover)
        header = yaml.safe_load(card.split("---\n")[1])
        assert header["base_model"] == str(chatml_model) and header["license"] == "apache-2.0"
        # The dataset with the build's counts and with what the run trained of it.
        assert f"{build['trees_read']:,} trees, {build['messages_read']:,} messages read; rows train 171, test 17" \
            in card
        train = summary["data"]["train"]
        assert (f"The train split as trained: 171 rows, {train['rows_cut']} cut at 256 tokens, "
                f"{train['rows_dropped']} dropped with no token to learn from; {train['loss_tokens_trained']:,} of "
                f"{train['loss_tokens']:,} assistant tokens trained") in card
        assert "Format Guanaco" in card
        # The resolved recipe, rerunnable.
        config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
        assert (config["format"], config["max_steps"], config["learning_rate"]) == ("guanaco", 2, 0.005)
        assert f"| optimizer steps | {step} |" in card
        name = str(out) if folder == out else str(out / "checkpoints" / folder.name)
        assert f'oasst generate {name} --prompt "' in card and f'PeftModel.from_pretrained(base, "{name}")' in card
        assert "## License" in card
        # Checkpoints carry the run's config too, so that generate, chat, merge and eval load them as trained.
        assert yaml.safe_load((folder / "train_config.yaml").read_text(encoding="utf-8"))["format"] == "guanaco"
    final = (out / "README.md").read_text(encoding="utf-8")
    assert f"| train loss, last logged | {summary['train_loss_last']:,.4f} |" in final
    assert f"| held-out loss after training | {summary['eval_loss_last']:,.4f} |" in final


def _contexts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt text a Chatbot hands its model from now on."""
    from oasst_train.generate import Chatbot

    seen: list[str] = []
    context = Chatbot.context

    def spy(self: Any, prompt: str) -> str:
        seen.append(context(self, prompt))
        return seen[-1]

    monkeypatch.setattr(Chatbot, "context", spy)
    return seen


def test_generate_prompts_in_the_recorded_format_unless_told_otherwise(
        oasst, guanaco_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_tools.conversation import guanaco_prompt

    seen = _contexts(monkeypatch)
    checkpoint = guanaco_run.out / "checkpoints" / "checkpoint-2"
    for adapter, flags in [(guanaco_run.out, ()), (guanaco_run.out, ("--format", "chat-template")), (checkpoint, ())]:
        result = oasst("generate", adapter, "--prompt", "Hi.", "--max-new-tokens", 3, *flags)
        assert result.exit_code == 0, result.output
    assert seen == [guanaco_prompt("Hi."), CHATML_PROMPT, guanaco_prompt("Hi.")]


def test_chat_keeps_the_conversation_in_the_chat_template(oasst, guanaco_run: Run,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _contexts(monkeypatch)
    result = oasst("chat", guanaco_run.out, "--format", "chat-template", "--max-new-tokens", 3, "--temperature", 0,
                   input="Hi.\nAnd?\n\n")
    assert result.exit_code == 0, result.output
    assert seen[0] == CHATML_PROMPT
    assert seen[1].startswith(CHATML_PROMPT) and seen[1].endswith("<|im_start|>user\nAnd?<|im_end|>\n"
                                                                  "<|im_start|>assistant\n")


def test_chat_template_format_without_a_template_is_one_error_line(oasst) -> None:
    result = oasst("train", "--model", STORIES, "--data", GUANACO, "--format", "chat-template", "--dry-run")
    assert error_line(result) == (f"error: format chat-template: the tokenizer of {STORIES} has no chat template; "
                                  "train with format guanaco (or auto)")


def test_an_unknown_format_in_a_recipe_is_one_error_line_naming_it(oasst, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_length: 64\nformat: chatml\n", encoding="utf-8")
    result = oasst("train", "--config", recipe, "--model", STORIES, "--data", GUANACO, "--dry-run")
    assert error_line(result) == f"error: {recipe}:2: format must be one of auto, guanaco, chat-template, not 'chatml'"
