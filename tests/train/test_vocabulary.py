"""One vocabulary: every setting is `--field-name` in each command where it applies, `--help` shows each default,
help texts stay short, and the former spellings (`--lr`, `--4bit`, `--dtype`) still work, hidden."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import pytest

from oasst_tools.errors import OasstError

# Options that have no default to show: inputs the user must name, and switches of the command itself.
NO_DEFAULT = {"config_file", "model", "data", "out", "adapter", "prompt"}


def _visible_options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and p.name != "help"]


def _commands() -> dict[str, click.Command]:
    from oasst_eval.cli import eval_command
    from oasst_train.cli import chat, generate, merge, train

    return {"train": train, "merge": merge, "generate": generate, "chat": chat, "eval": eval_command}


@pytest.mark.parametrize("name", ["train", "eval", "merge", "generate", "chat"])
def test_help_shows_a_default_for_every_option_that_has_one(name: str) -> None:
    command = _commands()[name]
    ctx = click.Context(command, info_name=name)
    missing = []
    for param in _visible_options(command):
        record = param.get_help_record(ctx)
        assert record is not None
        shows = "[default: " in record[1] or "[required]" in record[1]
        if not shows and param.name not in NO_DEFAULT:
            missing.append(record[0])
    assert missing == [], f"oasst {name} --help shows no default for {missing}"
    assert "(auto)" not in command.get_help(ctx)  # click's parentheses around descriptive defaults are dropped


def test_help_texts_are_one_or_two_lines() -> None:
    from oasst_eval.config import EvalConfig
    from oasst_model.spec import OPTIONS
    from oasst_train.config import TrainConfig

    helps = {f"TrainConfig.{f.name}": f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    helps |= {f"EvalConfig.{f.name}": f.metadata["help"] for f in dataclasses.fields(EvalConfig)}
    helps |= {f"OPTIONS.{name}": o.help for name, o in OPTIONS.items()}
    # 160 characters: two lines of click's help column beside the flag names.
    assert {k: len(v) for k, v in helps.items() if len(v) > 160} == {}


def test_the_loading_options_are_the_same_flags_in_every_command() -> None:
    from oasst_model.spec import LOAD_FIELDS, OPTIONS

    for name, command in _commands().items():
        flags = {p.name: p for p in command.params if isinstance(p, click.Option) and not p.hidden}
        for field in LOAD_FIELDS:
            assert field in flags, f"oasst {name} has no flag for {field}"
            want = f"--{field.replace('_', '-')}"
            assert flags[field].opts[0] == want, (name, flags[field].opts)
            if field != "compute_dtype" or name != "merge":  # merge's compute_dtype is the merged model's dtype
                assert flags[field].help == OPTIONS[field].help, (name, field)


@pytest.fixture
def captured_train(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The TrainConfig `oasst train` resolved, recorded instead of training."""
    import oasst_train.trainer as trainer

    seen: list[Any] = []

    def capture(cfg: Any, **kwargs: Any) -> dict:
        seen.append(cfg)
        raise OasstError("captured")

    monkeypatch.setattr(trainer, "run_training", capture)
    return seen


@pytest.mark.parametrize(("flags", "expected"), [
    (["--learning-rate", "1e-3", "--no-load-in-4bit"], (1e-3, False, "auto")),
    (["--load-in-4bit", "--compute-dtype", "float32"], (2e-4, True, "float32")),
    (["--lr", "3e-3", "--no-4bit", "--dtype", "float16"], (3e-3, False, "float16")),  # hidden former spellings
    # Both spellings with one value; with two, one error line (test_hostile).
    (["--lr", "1e-3", "--learning-rate", "1e-3"], (1e-3, True, "auto")),
], ids=["new", "4bit-on", "aliases", "both-agree"])
def test_train_takes_learning_rate_and_load_in_4bit(oasst, captured_train: list[Any], flags: list[str],
                                                    expected: tuple[Any, ...]) -> None:
    result = oasst("train", "--model", "m", "--data", "d", "--out", "o", *flags)
    assert result.stderr.strip() == "error: captured", result.output
    (cfg,) = captured_train
    assert (cfg.learning_rate, cfg.load_in_4bit, cfg.compute_dtype) == expected


def test_a_bad_value_names_the_current_flag_even_when_given_by_its_alias(oasst, captured_train: list[Any]) -> None:
    result = oasst("train", "--model", "m", "--data", "d", "--out", "o", "--lr", "-1")
    assert result.stderr.strip() == "error: --learning-rate: learning_rate must be positive, not -1.0"


@pytest.mark.parametrize("command", ["generate", "chat", "merge"])
def test_inference_commands_take_the_loading_flags(oasst, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import oasst_train.generate as generate
    import oasst_train.merge as merge

    seen: list[dict[str, Any]] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise OasstError("captured")

    monkeypatch.setattr(generate.Chatbot, "load", classmethod(lambda cls, *a, **k: capture(*a, **k)))
    monkeypatch.setattr(merge, "merge_adapter", capture)
    args = {"generate": ["--prompt", "hi"], "chat": [], "merge": ["--out", "merged"]}[command]
    result = oasst(command, "adapter", *args, "--model", "base", "--no-load-in-4bit", "--dtype", "float32")
    assert result.stderr.strip() == "error: captured", result.output
    (given,) = seen
    assert (given["model"], given["load_in_4bit"], given["compute_dtype"], given["quant_type"]) == (
        "base", False, "float32", None)  # None: as the adapter's record says


def test_cudnn_attention_is_one_flag_with_one_help_where_it_applies() -> None:
    """train, eval, generate and chat share the setting's name, flag pair and help (defaults differ by design)."""
    from oasst_model.attention import CUDNN_ATTENTION_HELP

    for name in ("train", "eval", "generate", "chat"):
        (param,) = [p for p in _commands()[name].params if p.name == "cudnn_attention"]
        assert param.opts == ["--cudnn-attention"] and param.secondary_opts == ["--no-cudnn-attention"], name
        assert param.help == CUDNN_ATTENTION_HELP, name
