"""Hostile input to `oasst train`, `merge`, `generate` and `chat`: every case ends in one `error:` line that names
the file (and line), exit code 1, no traceback, the inputs byte-identical and nothing left behind.

Most cases fail before a model loads (in-process, milliseconds); the write faults (disk full, file-size limit,
read-only folder) are raised by the operating system itself where that works as root too (a path component that
is a file, RLIMIT_FSIZE in a subprocess) and injected at the system call otherwise. A few run the real
`python -m oasst_tools` to show that no traceback reaches a terminal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oasst_tools.errors import describe_os_error
from tests.hostile import Ran, assert_refused, assert_unchanged, snapshot
from tests.train.conftest import REPO, STORIES, error_line

NO_4BIT = ("--no-load-in-4bit", "--compute-dtype", "float32", "--precision", "fp32")
GOOD_ROW = {"text": "### Human: Say hi.### Assistant: Hi!"}
HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "bitsandbytes", "lm_eval")


def _jsonl(*rows: object) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """An `oasst build`-style folder with one good training row (tests overwrite what they need)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_jsonl(GOOD_ROW))
    return folder


def _train(oasst: Any, *args: object) -> Any:
    return oasst("train", "--model", STORIES, *NO_4BIT, *args)


# --- training data: bad bytes and bad shapes, named with file:line ------------------------------------------------

BAD_ROWS = {
    "invalid-utf8": (b'{"text": "caf\xe9"}',
                     "data/train.jsonl:2: not valid UTF-8 text (byte 0xe9 at column 14)"),
    "not-json": (b'{"text": ', "data/train.jsonl:2: not valid JSON (Expecting value)"),
    "row-is-a-list": ([GOOD_ROW], "data/train.jsonl:2: a row must be a JSON object with `text` or `messages`, "
                                  "not a list"),
    "text-not-a-string": ({"text": 42}, "data/train.jsonl:2: `text` must be a string, not a number"),
    "messages-not-a-list": ({"messages": "hi"}, "data/train.jsonl:2: `messages` must be a list of {role, content} "
                                                "objects, not a string"),
    "message-not-an-object": ({"messages": ["hi"]}, "data/train.jsonl:2: messages[0] must be a {role, content} "
                                                    "object, not a string"),
    "role-missing": ({"messages": [{"content": "hi"}]}, "data/train.jsonl:2: messages[0] has no `role`"),
    "role-unknown": ({"messages": [{"role": "[bold]system[/]", "content": "hi"}]},
                     "data/train.jsonl:2: messages[0] role '[bold]system[/]' is not user, assistant or system"),
    "content-not-a-string": ({"messages": [{"role": "user", "content": ["hi"]}]},
                             "data/train.jsonl:2: messages[0] content must be a string, not a list"),
    "messages-checked-beside-text": ({"text": "### Human: hi", "messages": [{"role": "user", "content": None}]},
                                     "data/train.jsonl:2: messages[0] content must be a string, not null"),
    # Python's json refuses to convert it (its 4,300-digit limit); the tokenizer would refuse the lone surrogate.
    "huge-integer": (b'{"text": "### Human: hi### Assistant: x", "n": 1' + b"0" * 5000 + b"}",
                     "data/train.jsonl:2: a number with more than 4,300 digits"),
    "lone-surrogate": ({"messages": [{"role": "user", "content": "hi \ud800"}]},
                       "data/train.jsonl:2: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its "
                       "pair): not text"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_training_row_is_one_error_naming_file_and_line(oasst, data: Path, tmp_path: Path, case: str) -> None:
    row, expected = BAD_ROWS[case]
    (data / "train.jsonl").write_bytes(_jsonl(GOOD_ROW, row))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out"), names="data/train.jsonl:2")
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_bad_bytes_in_the_test_split_are_named_too(oasst, data: Path, tmp_path: Path) -> None:
    (data / "test.jsonl").write_bytes(_jsonl(GOOD_ROW, GOOD_ROW, b'{"text": "\xff\xfe"}'))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out"))
    assert line == "error: data/test.jsonl:3: not valid UTF-8 text (byte 0xff at column 11)"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n"], ids=["empty", "blank-lines"])
def test_empty_train_split_is_refused(oasst, data: Path, tmp_path: Path, content: bytes) -> None:
    (data / "train.jsonl").write_bytes(content)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out"))
    assert line == "error: data/train.jsonl: the train split has no rows"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: (d / "test.jsonl").mkdir(), "data/test.jsonl is a folder: the test split of an `oasst build` output is "
                                           "a file"),
    (lambda d: (d / "train.parquet").write_bytes(b"PAR1"), "data holds both train.jsonl and train.parquet: which one "
                                                           "is the train split cannot be told; keep one"),
], ids=["test-split-a-folder", "two-train-files"])
def test_a_split_that_cannot_be_told_is_refused(oasst, data: Path, tmp_path: Path, make: Any, expected: str) -> None:
    """Both were passed over silently: a folder as no test split (no eval), a second file as not there."""
    make(data)
    before = snapshot(tmp_path)
    assert assert_refused(_train(oasst, "--data", "data", "--out", "out")) == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_markup_in_a_data_path_is_printed_as_typed(oasst, tmp_path: Path) -> None:
    folder = tmp_path / "[bold]data[/]"  # the `/` of `[/]` makes it two folders: `[bold]data[` and `]`
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_bytes(_jsonl({"text": 1}))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "[bold]data[/]", "--out", "out"))
    assert line == "error: [bold]data[/]/train.jsonl:1: `text` must be a string, not a number"
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_markup_in_the_out_path_trains_and_prints_as_typed(oasst, data: Path, tmp_path: Path) -> None:
    result = _train(oasst, "--data", "data", "--out", "[bold]run[/]", "--max-steps", 1, "--batch-size", 1)
    assert result.exit_code == 0, result.output
    assert "oasst train -> [bold]run[/]" in result.stdout  # the summary table's title, not swallowed as markup
    assert "-> [bold]run[/] (config: [bold]run[/]/train_config.yaml)" in result.stderr  # the config line as given
    assert json.loads((tmp_path / "[bold]run[" / "]" / "train_summary.json").read_text())["global_step"] == 1


def test_unreadable_train_file_names_it(oasst, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_tools import files

    # Root reads through chmod 000, so the refusal is injected where the file is read.
    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).name == "train.jsonl":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
        return open(file, *args, **kwargs)

    before = snapshot(tmp_path)
    monkeypatch.setattr(files, "open", refuse, raising=False)
    result = _train(oasst, "--data", "data", "--out", "out")
    monkeypatch.undo()
    assert assert_refused(result) == "error: cannot read data file data/train.jsonl: permission denied"
    assert_unchanged(before, tmp_path)


# --- where --data points: missing paths at once, hub ids within two seconds -----------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    ("no-such-folder", "dataset folder no-such-folder does not exist"),
    ("data/typo", "dataset folder data/typo does not exist"),  # data/ exists: a mistyped path, not a hub id
    ("notes.txt/data", "dataset folder notes.txt/data does not exist (notes.txt is a file, not a folder)"),
    ("train.jsonl", "dataset folder train.jsonl does not exist"),
], ids=["plain-name", "local-owner-folder", "component-is-a-file", "file-suffix"])
def test_missing_data_path_fails_at_once_without_asking_the_hub(oasst, data: Path, tmp_path: Path, given: str,
                                                                expected: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_tools import hub

    (tmp_path / "notes.txt").write_text("not a folder")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=1.5: pytest.fail("a path must not probe the Hub"))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", given, "--out", "out"), names=given)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_a_bad_input_is_the_only_line_of_output(oasst, data: Path, tmp_path: Path) -> None:
    """The resolved config is printed only once the cheap checks passed: a typo gets one line, not 46."""
    result = _train(oasst, "--data", "no-such-folder", "--out", "out")
    assert result.stdout == ""
    assert result.stderr == "error: dataset folder no-such-folder does not exist\n"


@pytest.fixture
def fresh_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """oasst_tools.hub with no probe made yet in this process, and the offline variables unset."""
    from oasst_tools import hub

    monkeypatch.setattr(hub, "_probe", {})
    monkeypatch.setattr(hub, "_offline_reason", [])
    monkeypatch.setattr(hub, "_assumed", [])
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "oasst-empty-hub-cache"))
    yield hub


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """HF_ENDPOINT on a local port that accepts connections and never answers: a Hub that hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        yield endpoint


@pytest.mark.parametrize("flag", ["--data", "--model"])
def test_hub_id_with_a_hanging_hub_fails_within_two_seconds(oasst, data: Path, tmp_path: Path, flag: str,
                                                           fresh_hub: Any, silent_endpoint: str) -> None:
    args = {"--data": ["--model", STORIES, "--data", "owner/name"],
            "--model": ["--model", "owner/name", "--data", "data"]}[flag]
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = oasst("train", *args, "--out", "out", *NO_4BIT)
    seconds = time.monotonic() - started
    line = assert_refused(result, names="owner/name")
    assert seconds < 2.5, seconds
    what = "dataset" if flag == "--data" else "model"
    assert line.startswith(f"error: cannot load {what} owner/name from the Hugging Face Hub (127.0.0.1 did not "
                           "answer within 1.5 s) and it is not in the local cache"), line
    assert_unchanged(before, tmp_path)


def test_hub_id_under_hf_hub_offline_fails_at_once(oasst, data: Path, tmp_path: Path, fresh_hub: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    line = assert_refused(oasst("train", "--model", STORIES, "--data", "OpenAssistant/oasst1-missing", "--out", "out",
                                *NO_4BIT))
    assert time.monotonic() - started < 1.0
    assert line == ("error: cannot load dataset OpenAssistant/oasst1-missing from the Hugging Face Hub "
                    "(HF_HUB_OFFLINE is set) and it is not in the local cache; pass --data PATH with an "
                    "`oasst build` folder")


# --- the YAML config: bad bytes, wrong shapes, impossible numbers ----------------------------------------------------

BAD_CONFIGS = {
    "invalid-utf8": (b"model: m\nout: \"caf\xe9\"\n", "cfg.yaml:2: not valid UTF-8 text (byte 0xe9 at column 10)"),
    "a-list": (b"- model\n- data\n", "cfg.yaml: expected a mapping of settings, got a list"),
    "non-string-key": (b"model: m\n1: 2\n", "cfg.yaml: setting names must be text, not 1"),
    "learning-rate-nan": (b"learning_rate: .nan\n", "cfg.yaml:1: learning_rate must be a finite number, not nan"),
    "learning-rate-inf": (b"learning_rate: .inf\n", "cfg.yaml:1: learning_rate must be a finite number, not inf"),
    "lora-dropout-nan": (b"lora_dropout: .nan\n", "cfg.yaml:1: lora_dropout must be a finite number, not nan"),
    "max-grad-norm-negative": (b"max_grad_norm: -1\n", "cfg.yaml:1: max_grad_norm must not be negative, not -1.0"),
    # Refused before the run (it failed at the first optimizer step: float32 overflow).
    "learning-rate-overflow": (b"learning_rate: 1.0e+300\n", "cfg.yaml:1: learning_rate must be at most 1,000, not "
                                                              "1e+300"),
    "weight-decay-overflow": (b"weight_decay: 1.0e+40\n", "cfg.yaml:1: weight_decay must be at most 1,000, not 1e+40"),
    # A YAML merge key sets its keys too: YAML keeps the explicit one silently.
    "set-twice-through-a-merge": (b"lora_r: 8\n<<: {lora_r: 4}\n", "cfg.yaml:2: lora_r is set twice (first at line 1); "
                                                                  "keep one"),
    "epochs-inf": (b"epochs: .inf\n", "cfg.yaml:1: epochs must be a finite number, not inf"),
    "epochs-overflow": (b"epochs: 1.0e+300\n", "cfg.yaml:1: epochs must be at most 2,147,483,647, not 1e+300"),
    "weight-decay-negative": (b"weight_decay: -0.1\n", "cfg.yaml:1: weight_decay must not be negative, not -0.1"),
    "warmup-steps-negative": (b"\nwarmup_steps: -5\n", "cfg.yaml:2: warmup_steps must not be negative, not -5"),
    "max-steps-inf": (b"max_steps: .inf\n", "cfg.yaml:1: max_steps must be a whole number, not inf"),
    "group-by-length-with-packing": (b"packing: true\ngroup_by_length: true\n", "cfg.yaml:2: group_by_length does "
                                     "not apply with packing (packed rows are all near max_length); set "
                                     "group_by_length false"),
    "model-a-list": (b"model: [a, b]\n", "cfg.yaml:1: model must be text, not ['a', 'b']"),
    "not-yaml": (b"model: [unclosed\n", "cfg.yaml:2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    "nul-character": (b"model: m\nout: a\x00b\n", "cfg.yaml:2: not valid YAML (the character U+0000 is not allowed "
                                                  "in YAML)"),
    "pad-past-max-length": (b"max_length: 256\npad_to_multiple_of: 2147483647\n", "cfg.yaml:2: pad_to_multiple_of "
                            "must be at most max_length (256), not 2147483647"),
    "pad-one-past-max-length": (b"max_length: 256\npad_to_multiple_of: 257\n", "cfg.yaml:2: pad_to_multiple_of "
                                "must be at most max_length (256), not 257"),
    # 20,000 items, and a list of aliases whose full repr would never end: the value is shown cut short.
    "a-huge-list": (b"lora_r: [" + b",".join([b"xxxxxxxxxx"] * 20000) + b"]\n",
                    "cfg.yaml:1: lora_r must be a whole number, not ['xxxxxxxxxx', 'xxxxxxxxxx', 'xxxxxxxxxx', "
                    "'xxxxxxxxxx', ...]"),
    "an-alias-bomb": (b"model: [&a [x,x,x,x,x,x,x,x,x], " + b"".join(
        f"&{b} [{','.join([f'*{a}'] * 9)}], ".encode() for a, b in zip("abcdefgh", "bcdefghi")) + b"*i]\n",
        "cfg.yaml:1: model must be text, not [['x', 'x', 'x', 'x', ...], [['x', 'x', 'x', 'x', ...], ['x', 'x', 'x', "
        "'x', ...], ['x', 'x', 'x', 'x', ...], ['x', '..."),
}


def test_a_config_file_with_a_byte_order_mark_reads_its_first_key(tmp_path: Path) -> None:
    from oasst_train.config import resolve_config

    (tmp_path / "cfg.yaml").write_bytes(b"\xef\xbb\xbflora_r: 8\nmodel: m\ndata: d\nout: o\n")
    assert resolve_config(tmp_path / "cfg.yaml", {}).lora_r == 8


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_file_is_one_error_naming_file_and_line(oasst, data: Path, tmp_path: Path, case: str) -> None:
    content, expected = BAD_CONFIGS[case]
    (tmp_path / "cfg.yaml").write_bytes(content)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--config", "cfg.yaml", "--data", "data", "--out", "out"), names="cfg.yaml")
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--learning-rate", "nan", "--learning-rate: learning_rate must be a finite number, not nan"),
    ("--lr", "nan", "--learning-rate: learning_rate must be a finite number, not nan"),  # the hidden former spelling
    ("--lora-dropout", "nan", "--lora-dropout: lora_dropout must be a finite number, not nan"),
    ("--max-grad-norm", "-0.5", "--max-grad-norm: max_grad_norm must not be negative, not -0.5"),
])
def test_impossible_hyperparameter_flag_is_refused(oasst, data: Path, tmp_path: Path, flag: str, value: str,
                                                   expected: str) -> None:
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", flag, value))
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_a_setting_under_both_spellings_with_different_values_is_refused(oasst, data: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", "--lr", "1e-3", "--learning-rate", "2e-3"))
    assert line == ("error: --learning-rate is given twice, also under a former spelling, with different values "
                    "(0.002 and 0.001): give --learning-rate once")
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("given", "expected"), [
    ("nope.yaml", "config file nope.yaml does not exist"),
    ("notes.txt/cfg.yaml", "config file notes.txt/cfg.yaml does not exist (notes.txt is a file, not a folder)"),
    ("data", "config file data is a folder, not a file"),
], ids=["missing", "component-is-a-file", "a-folder"])
def test_config_path_that_is_not_a_file(oasst, data: Path, tmp_path: Path, given: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--config", given, "--data", "data", "--out", "out"), names=given)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


# --- --model: damaged config and weights, before torch loads the model ----------------------------------------------

def _model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(STORIES, folder)
    return folder


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


MODEL_DAMAGE = {
    "config-not-json": (lambda m: (m / "config.json").write_text("{not json"),
                        "model/config.json:1: not valid JSON (Expecting property name enclosed in double quotes)"),
    "config-a-list": (lambda m: (m / "config.json").write_text("[]"),
                      "model/config.json: expected a JSON object, got a list"),
    "config-invalid-utf8": (lambda m: (m / "config.json").write_bytes(b'{"a": "\xc3"}'),
                            "model/config.json:1: not valid UTF-8 text (byte 0xc3 at column 8)"),
    "weights-truncated": (lambda m: _truncate(m / "model.safetensors", 5000),
                          "model/model.safetensors: truncated safetensors file (the header promises"),
    "weights-garbage-header": (lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64),
                               "model/model.safetensors: not a safetensors file"),
    "config-missing": (lambda m: (m / "config.json").unlink(), "model folder model has no config.json"),
    "tokenizer-garbage": (lambda m: (m / "tokenizer.json").write_text('{"model": 1}'),
                          "cannot load the tokenizer of model: "),
}


@pytest.mark.parametrize("case", MODEL_DAMAGE)
def test_damaged_model_folder_is_one_error_naming_the_file(oasst, data: Path, tmp_path: Path, case: str) -> None:
    damage, expected = MODEL_DAMAGE[case]
    damage(_model_copy(tmp_path))
    before = snapshot(tmp_path)
    result = oasst("train", "--model", "model", *NO_4BIT, "--data", "data", "--out", "out")
    line = assert_refused(result, names="model")
    assert line.startswith(f"error: {expected}"), line
    assert_unchanged(before, tmp_path)


def test_model_path_through_a_file_is_named(oasst, data: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("train", "--model", "notes.txt/model", *NO_4BIT, "--data", "data", "--out", "out"))
    assert line == "error: model folder notes.txt/model does not exist (notes.txt is a file, not a folder)"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)], ids=["run", "dry-run"])
@pytest.mark.parametrize(("flag", "name", "close"), [("--optim", "optim", "adamw_torch"),
                                                     ("--lr-scheduler", "lr_scheduler", "cosine")])
def test_a_name_transformers_does_not_know_is_one_line_before_a_model_loads(
        oasst, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, name: str, close: str,
        dry_run: tuple[str, ...]) -> None:
    import oasst_model.load

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model loaded before the name was checked")

    monkeypatch.setattr(oasst_model.load, "load_model", no_model)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", flag, "[bold]nope", "-q", *dry_run))
    assert line.startswith(f"error: {flag}: {name} '[bold]nope' is not a name transformers knows ("), line
    typo = close[:-1] + "x"  # one letter off: the name meant is offered
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", flag, typo, "-q", *dry_run))
    assert f"(close: {close}" in line, line
    assert_unchanged(before, tmp_path)


def test_where_the_early_name_check_cannot_run_transformers_refusal_is_still_one_line(
        oasst, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_train import arguments

    # A release that moved its list of schedule names.
    monkeypatch.setattr(arguments, "NAME_LISTS", (("lr_scheduler", "transformers.trainer_utils", "Moved"),))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", "--lr-scheduler", "nope", "-q"))
    assert line.startswith("error: the training settings were refused: nope is not a valid SchedulerType"), line
    assert_unchanged(before, tmp_path)  # `out` was made after the model loaded, and is gone again


# --- --out: a file in the way, a read-only or full disk, a file-size limit -----------------------------------------

@pytest.mark.parametrize(("out", "expected"), [
    ("data", "--out data is the input --data data; choose another --out"),
    ("data/run", "--out data/run lies inside the input --data data; choose another --out"),
    ("data/../data", "--out data/../data is the input --data data; choose another --out"),
    (".", "--out . contains the input --data data; choose another --out"),
    ("model/run", "--out model/run lies inside the input --model model; choose another --out"),
], ids=["out-is-data", "out-inside-data", "out-is-data-spelled-otherwise", "out-contains-data", "out-inside-model"])
def test_out_that_is_contains_or_lies_inside_an_input_is_refused(oasst, data: Path, tmp_path: Path, out: str,
                                                                 expected: str) -> None:
    shutil.copytree(STORIES, tmp_path / "model")
    before = snapshot(tmp_path)
    result = oasst("train", "--model", "model", *NO_4BIT, "--data", "data", "--out", out)
    assert assert_refused(result, names=out) == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("out", "expected"), [
    ("notes.txt", "--out notes.txt is a file, not a folder"),
    ("notes.txt/run", "--out notes.txt/run cannot be created: notes.txt is a file, not a folder"),
], ids=["out-is-a-file", "component-is-a-file"])
def test_out_that_cannot_be_a_folder(oasst, data: Path, tmp_path: Path, out: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", out), names=out)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "permission-denied"])
def test_out_in_a_folder_that_cannot_be_written(oasst, data: Path, tmp_path: Path, code: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores chmod and a test cannot mount a read-only file system: the refusal comes from mkdir.
    real = os.mkdir

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.abspath(os.fsdecode(path)).startswith(str(tmp_path / "locked")):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        real(path, *args, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "mkdir", refuse)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "locked/run"), names="locked/run")
    assert line == f"error: --out locked/run: cannot write in locked ({describe_os_error(OSError(code, os.strerror(code)))})"
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_disk_full_while_writing_the_run_leaves_no_output(oasst, data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if "out" in self.parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() on an open file: no file name
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", "--max-steps", 1, "-q"), names="out")
    assert line == "error: cannot write the run's config out/train_config.yaml: no space left on device"
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_leaves_no_output(oasst, data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)  # transformers saves optimizer, scheduler and RNG state with it
    before = snapshot(tmp_path)
    result = _train(oasst, "--data", "data", "--out", "out", "--max-steps", 1, "--save-steps", 1,
                    "--batch-size", 1, "--grad-accum", 1, "-q")
    line = assert_refused(result, names="out")
    assert line == "error: --out out: no space left on device (writing the run)"
    assert_unchanged(before, tmp_path)


def _oasst_process(*args: object, cwd: Path, file_size_limit: int | None = None, timeout: float = 120,
                   code: str | None = None, close_stdin: bool = False, close_stdout: bool = False) -> Ran:
    """`python -m oasst_tools ARGS` (or `python -c CODE`) in a fresh interpreter, as a user's terminal runs it
    (`close_stdin`, `close_stdout`: with file descriptor 0 or 1 closed, as `<&-` and `>&-` start it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")

    def limit() -> None:  # Python ignores SIGXFSZ, so the limit surfaces as OSError(EFBIG)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        if close_stdin:
            os.close(0)
        if close_stdout:
            os.close(1)

    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "oasst_tools"]
    done = subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)
    return Ran(done.returncode, done.stdout, done.stderr)


def test_chat_with_stdin_closed_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    """`input()` raised RuntimeError (lost sys.stdin) after the model had loaded."""
    fake_adapter(tmp_path / "adapter")
    ran = _oasst_process("chat", "adapter", cwd=tmp_path, close_stdin=True)
    assert assert_refused(ran) == ("error: stdin is closed: chat reads your turns from it (pipe them in, or use "
                                   "oasst generate)")


def test_generate_with_stdout_closed_is_one_line_not_a_lost_reply(tmp_path: Path) -> None:
    """It exited 0 with the reply written nowhere."""
    fake_adapter(tmp_path / "adapter")
    ran = _oasst_process("generate", "adapter", "--prompt", "hi", cwd=tmp_path, close_stdout=True)
    assert assert_refused(ran) == ("error: stdout is closed: generate writes the reply there (redirect it to a file "
                                   "instead)")


@pytest.mark.slow
def test_file_size_limit_while_writing_the_run_in_a_real_process(data: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    ran = _oasst_process("train", "--model", STORIES, *NO_4BIT, "--data", "data", "--out", "out", "-q",
                         cwd=tmp_path, file_size_limit=512)
    line = assert_refused(ran, names="out/train_config.yaml")
    assert line == "error: cannot write the run's config out/train_config.yaml: file too large (the file-size limit, `ulimit -f`, was reached)"
    assert ran.stderr.strip() == line  # nothing else on the terminal
    assert_unchanged(before, tmp_path)


def test_invalid_utf8_config_in_a_real_process_prints_one_line(data: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_bytes(b"model: \xff\n")
    before = snapshot(tmp_path)
    ran = _oasst_process("train", "--config", "cfg.yaml", "--data", "data", "--out", "out", cwd=tmp_path)
    assert assert_refused(ran, names="cfg.yaml") == "error: cfg.yaml:1: not valid UTF-8 text (byte 0xff at column 8)"
    assert ran.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in ran.stderr
    assert_unchanged(before, tmp_path)


# --- --resume: every checkpoint damaged in one way or another -------------------------------------------------------

def fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder that passes every completeness check (tiny tensors, empty optimizer state)."""
    import torch
    from safetensors.torch import save_file

    path = folder / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, str(path / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


CHECKPOINT_DAMAGE = {
    "adapter-truncated": (lambda c: _truncate(c / "adapter_model.safetensors", 60),
                          "adapter_model.safetensors: truncated safetensors file"),
    "adapter-garbage-header": (lambda c: (c / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage" * 9),
                               "adapter_model.safetensors: not a safetensors file"),
    "optimizer-truncated": (lambda c: _truncate(c / "optimizer.pt", 100), "optimizer.pt is truncated"),
    "rng-truncated": (lambda c: _truncate(c / "rng_state.pth", 50), "rng_state.pth is truncated"),
    "state-not-json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 1'),
                       "trainer_state.json is truncated"),
    "state-a-list": (lambda c: (c / "trainer_state.json").write_text("[10]"),
                     "trainer_state.json is not a JSON object"),
    "state-wrong-step": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 7}'),
                         "trainer_state.json says step 7"),
    "scheduler-missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt missing"),
    "adapter-config-not-json": (lambda c: (c / "adapter_config.json").write_bytes(b"\xff{"),
                                "adapter_config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_resume_with_only_a_damaged_checkpoint_names_it_and_why(oasst, data: Path, tmp_path: Path,
                                                                case: str) -> None:
    damage, reason = CHECKPOINT_DAMAGE[case]
    damage(fake_checkpoint(tmp_path / "run", 10))
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "run", "--resume"), names="run/checkpoints")
    assert line.startswith(f"error: --resume: no complete checkpoint in run/checkpoints (checkpoint-10: {reason}"), line
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_resume_falls_back_to_the_previous_checkpoint_with_one_warning(tmp_path: Path, case: str) -> None:
    from oasst_train.checkpoints import require_checkpoint

    damage, reason = CHECKPOINT_DAMAGE[case]
    good = fake_checkpoint(tmp_path, 5)
    damage(fake_checkpoint(tmp_path, 10))
    warnings: list[str] = []
    assert require_checkpoint(tmp_path, warn=warnings.append) == good
    assert len(warnings) == 1 and warnings[0].startswith(f"--resume: skipping checkpoint-10: {reason}"), warnings
    assert warnings[0].endswith("; resuming from checkpoint-5")


# --- merge, generate, chat: damaged adapters, fail before the model loads -------------------------------------------

def fake_adapter(folder: Path, base: Path = STORIES) -> Path:
    """An adapter folder as `oasst train` writes one (config, weights, train_config.yaml): valid on disk."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": str(base)}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)},
              str(folder / "adapter_model.safetensors"))
    (folder / "train_config.yaml").write_text(f"model: {base}\nload_in_4bit: false\ncompute_dtype: float32\n")
    return folder


ADAPTER_DAMAGE = {
    "config-not-json": (lambda a: (a / "adapter_config.json").write_text('{"r": 2,'),
                        "adapter/adapter_config.json:1: not valid JSON"),
    "config-not-an-object": (lambda a: (a / "adapter_config.json").write_text('"LORA"'),
                             "adapter/adapter_config.json: expected a JSON object, got a string"),
    "config-no-peft-type": (lambda a: (a / "adapter_config.json").write_text('{"r": 2}'),
                            "adapter/adapter_config.json: not a LoRA adapter config (no peft_type"),
    "config-bad-rank": (lambda a: (a / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": "two", "lora_alpha": 4, "target_modules": ["q"]}'),
        "adapter/adapter_config.json: `r` must be a positive integer, not 'two'"),
    "weights-missing": (lambda a: (a / "adapter_model.safetensors").unlink(),
                        "adapter has no adapter_model.safetensors"),
    # DPO's --init-adapter read it with float() (ValueError: an "unexpected" line); every command checks it now.
    "config-bad-dropout": (lambda a: (a / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "lora_dropout": "abc"}'),
        "adapter/adapter_config.json: `lora_dropout` must be a number in [0, 1), not 'abc'"),
    # peft took the list and failed where it first used it (AttributeError: an "unexpected" line after loading).
    "config-bad-alpha-pattern": (lambda a: (a / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "alpha_pattern": [1]}'),
        "adapter/adapter_config.json: `alpha_pattern` must map layer names to numbers, not [1]"),
    "weights-truncated": (lambda a: _truncate(a / "adapter_model.safetensors", 100),
                          "adapter/adapter_model.safetensors: truncated safetensors file"),
    "weights-garbage-header": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"PK\x03\x04" * 40),
                               "adapter/adapter_model.safetensors: not a safetensors file"),
    # The tokenizer saved beside the adapter failed to load only after the model had (and named no file).
    "tokenizer-not-json": (lambda a: (a / "tokenizer_config.json").write_text('{"pad_token": '),
                           "adapter/tokenizer_config.json:1: not valid JSON"),
    "train-config-invalid-utf8": (lambda a: (a / "train_config.yaml").write_bytes(b"model: \xfe\n"),
                                  "adapter/train_config.yaml:1: not valid UTF-8 text (byte 0xfe at column 8)"),
    "train-config-a-list": (lambda a: (a / "train_config.yaml").write_text("- model\n"),
                            "adapter/train_config.yaml: expected a mapping of settings, got a list"),
    "base-model-gone": (lambda a: (a / "train_config.yaml").write_text("model: gone-model\n"),
                        "adapter/train_config.yaml: model folder gone-model does not exist (a hub model id has the "
                        "form owner/name); pass --model to load another base"),
}
ADAPTER_COMMANDS = {
    "generate": ("generate", "adapter", "--prompt", "hi"),
    "chat": ("chat", "adapter"),
    "merge": ("merge", "adapter", "--out", "merged"),
}


@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
@pytest.mark.parametrize("case", ADAPTER_DAMAGE)
def test_damaged_adapter_is_one_error_before_the_model_loads(oasst, tmp_path: Path, command: str,
                                                             case: str) -> None:
    damage, expected = ADAPTER_DAMAGE[case]
    damage(fake_adapter(tmp_path / "adapter"))
    before = snapshot(tmp_path)
    result = oasst(*ADAPTER_COMMANDS[command], input="hello\n\n")
    line = assert_refused(result, names="model" if case == "base-model-gone" else "adapter")
    assert line.startswith(f"error: {expected}"), line
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("args", "expected"), [
    (("generate", "a", "--prompt", "hi", "--seed", str(2**32)), "Invalid value for '--seed': 4294967296 is not in "
                                                                "the range 0<=x<=4294967295."),
    (("generate", "a", "--prompt", "hi", "--temperature", "nan"), "Invalid value for '--temperature': 'nan' is not "
                                                                  "a finite number >= 0"),
    (("chat", "a", "--temperature", "inf"), "Invalid value for '--temperature': 'inf' is not a finite number >= 0"),
    (("merge", "a", "--out", "m", "--tolerance", "-1"), "Invalid value for '--tolerance': '-1' is not a number >= 0"),
    (("merge", "a", "--out", "m", "--tolerance", "nan"), "Invalid value for '--tolerance': 'nan' is not a number >= 0"),
    (("merge", "a", "--out", ""), "Invalid value for '--out': is empty: give a folder"),
], ids=["seed-past-32-bit", "temperature-nan", "temperature-inf", "tolerance-negative", "tolerance-nan", "out-empty"])
def test_sampling_and_merge_flags_out_of_range_are_usage_errors(oasst, tmp_path: Path, args: tuple[str, ...],
                                                                expected: str) -> None:
    """NaN passed FloatRange(min=0) (greedy output, silently); a bad tolerance failed after the whole merge."""
    before = snapshot(tmp_path)
    assert assert_refused(oasst(*args), code=2) == f"Error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("adapter", "expected"), [
    ("nope", "adapter folder nope does not exist"),
    ("notes.txt", "adapter notes.txt is a file, not a folder (give the folder `oasst train` wrote)"),
    ("notes.txt/adapter", "adapter folder notes.txt/adapter does not exist (notes.txt is a file, not a folder)"),
    ("[/]adapter", "adapter folder [/]adapter does not exist"),
], ids=["missing", "a-file", "component-is-a-file", "markup-in-path"])
def test_adapter_path_that_is_not_an_adapter_folder(oasst, tmp_path: Path, adapter: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("generate", adapter, "--prompt", "hi"), names=adapter)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("out", "expected"), [
    ("notes.txt/merged", "--out notes.txt/merged cannot be created: notes.txt is a file, not a folder"),
    ("adapter/merged", "--out adapter/merged lies inside the input adapter adapter; choose another --out"),
    ("notes.txt", "--out notes.txt already exists and is not empty; choose another folder"),
    # The merge ran to its end, then the rename failed on the link and the merged model was deleted.
    ("link", "--out link is a symbolic link; pass the folder itself or another --out"),
], ids=["component-is-a-file", "inside-the-adapter", "out-is-a-file", "out-is-a-symlink"])
def test_merge_out_that_cannot_be_written(oasst, tmp_path: Path, out: str, expected: str) -> None:
    fake_adapter(tmp_path / "adapter")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("merge", "adapter", "--out", out), names=out)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_truncated_adapter_in_a_real_process_prints_one_line(tmp_path: Path) -> None:
    adapter = fake_adapter(tmp_path / "adapter")
    _truncate(adapter / "adapter_model.safetensors", 100)
    before = snapshot(tmp_path)
    ran = _oasst_process("generate", "adapter", "--prompt", "hi", cwd=tmp_path)
    line = assert_refused(ran, names="adapter/adapter_model.safetensors")
    assert line.startswith("error: adapter/adapter_model.safetensors: truncated safetensors file (the header ")
    assert ran.stderr.strip() == line
    assert_unchanged(before, tmp_path)


# --- the safety net: whatever escapes is still one line ------------------------------------------------------------

def test_unexpected_exception_is_one_line_that_says_it_is_a_bug(oasst, data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_train import data as data_module

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(data_module, "read_rows", broken)
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out"))
    assert line == ("error: unexpected TypeError: unsupported operand type(s) for +: 'int' and 'str' (a bug in "
                    "oasst-tools; rerun with OASST_DEBUG=1 for the traceback)")
    assert_unchanged(before, tmp_path)
    monkeypatch.setenv("OASST_DEBUG", "1")
    with pytest.raises(TypeError):
        _train(oasst, "--data", "data", "--out", "out")


def test_ctrl_c_before_training_is_one_line_and_exit_130(oasst, data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_train import data as data_module

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module, "read_rows", interrupted)
    before = snapshot(tmp_path)
    assert assert_refused(_train(oasst, "--data", "data", "--out", "out"), code=130) == "error: interrupted"
    assert_unchanged(before, tmp_path)


# --- a core install without the train extra -------------------------------------------------------------------------

HIDE_EXTRAS = f"import sys; sys.modules.update(dict.fromkeys({HEAVY!r}))\nfrom oasst_tools.cli import main\nmain()"


def test_core_install_lists_the_plugin_commands_as_needing_their_extra(tmp_path: Path) -> None:
    ran = _oasst_process("--help", cwd=tmp_path, code=HIDE_EXTRAS)
    assert ran.exit_code == 0, ran.stderr
    lines = {line.split()[0]: line.split(None, 1)[1] for line in ran.stdout.split("Commands:")[1].splitlines()
             if line.strip()}
    for name in ("train", "merge", "generate", "chat"):
        assert lines[name] == "(needs the train extra: pip install 'oasst-tools[train]')", lines
    assert lines["eval"] == "(needs the eval extra: pip install 'oasst-tools[eval]')"
    assert not lines["build"].startswith("(needs")


@pytest.mark.parametrize("command", ["train", "merge", "generate", "chat"])
def test_core_install_running_a_train_command_names_the_extra(tmp_path: Path, command: str) -> None:
    started = time.monotonic()
    ran = _oasst_process(command, "--config", "x.yaml", "--help", cwd=tmp_path, code=HIDE_EXTRAS)
    assert time.monotonic() - started < 5
    assert ran.exit_code == 1 and ran.stdout == ""
    assert ran.stderr == f"error: oasst {command} needs the train extra: pip install 'oasst-tools[train]'\n"


def test_target_modules_that_match_no_layer_are_named_with_the_layers_there_are(oasst, data: Path,
                                                                                tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--data", "data", "--out", "out", "--target-modules", "nope,q_proj"))
    assert line == (f"error: --target-modules nope: {STORIES} has no layer of that name (its linear layers: "
                    "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")
    assert_unchanged(before, tmp_path)
    # From a recipe: its file and line, under the YAML key's name (the flag was not typed).
    (tmp_path / "recipe.yaml").write_text("max_steps: 1\ntarget_modules: [q_proj, nope]\n")
    before = snapshot(tmp_path)
    line = assert_refused(_train(oasst, "--config", "recipe.yaml", "--data", "data", "--out", "out"))
    assert line.startswith(f"error: recipe.yaml:2: target_modules nope: {STORIES} has no layer of that name")
    assert_unchanged(before, tmp_path)


# --- two runs into one --out ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_the_out_of_a_running_one_is_refused_and_the_first_ends_intact(data: Path,
                                                                                          tmp_path: Path) -> None:
    """Both trained, and the second failed at its end blaming a missing .final.tmp/loss.png."""
    from oasst_tools.output import LOCK

    args = ["train", "--model", STORIES, *NO_4BIT, "--data", "data", "--out", "out", "-q", "--max-steps", "3"]
    first = subprocess.Popen([sys.executable, "-m", "oasst_tools", *map(str, args)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out" / LOCK).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = _oasst_process(*args, cwd=tmp_path)
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    line = assert_refused(second, names="out")
    assert re.fullmatch(rf"error: --out out: another oasst train run \(pid {first.pid} on [^,]+, since [-0-9: ]+\) is "
                        r"writing there; wait for it to end or choose another --out", line), line
    assert second.stderr.strip() == line
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["global_step"] == 3
    assert not (tmp_path / "out" / LOCK).exists()
    # Now the run is there and finished: the usual refusal, which names no lock.
    again = _oasst_process(*args, cwd=tmp_path)
    assert assert_refused(again, names="out") == ("error: out already holds a training run; pass --resume to continue "
                                                  "it, or choose another --out")


def test_a_run_that_ends_while_another_waits_for_the_lock_is_not_overwritten(oasst, data: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--out is checked again once the lock is held: the other run may have finished between the two."""
    from contextlib import contextmanager

    from oasst_train import trainer

    @contextmanager
    def other_run_finished_first(cfg: Any) -> Iterator[None]:
        (Path(cfg.out) / "train_summary.json").write_text("{}\n")
        yield

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(trainer, "out_lock", other_run_finished_first)
    result = _train(oasst, "--data", "data", "--out", "out", "-q")
    assert error_line(result) == ("error: out already holds a training run; pass --resume to continue it, or choose "
                                  "another --out")


def test_a_run_refused_by_the_lock_removes_nothing_of_the_run_holding_it(oasst, data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--out did not exist when this run started and appeared (another run's) before it took the lock: the failed
    run's clean-up removed a folder it had not made, the other run's, while that one was writing there."""
    from oasst_train import trainer

    hold = ("import sys; from pathlib import Path; from oasst_tools.output import run_lock\n"
            "with run_lock(Path('out'), 'oasst train'):\n"
            "    Path('out/train_config.yaml').write_text('model: x\\n')\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    holders: list[subprocess.Popen] = []
    first_check = trainer.check_out

    def other_run_starts_meanwhile(cfg: Any, resume: bool, quiet: bool = False) -> Any:
        result = first_check(cfg, resume, quiet)
        if not holders:
            env = dict(os.environ, PYTHONPATH=str(REPO))
            holders.append(subprocess.Popen([sys.executable, "-c", hold], cwd=tmp_path, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env))
            assert holders[0].stdout is not None and holders[0].stdout.readline() == "held\n"
        return result

    monkeypatch.setattr(trainer, "check_out", other_run_starts_meanwhile)
    try:
        result = _train(oasst, "--data", "data", "--out", "out", "-q")
        assert "another oasst train run (pid " in error_line(result)
        assert (tmp_path / "out" / "train_config.yaml").read_text() == "model: x\n"
    finally:
        holders[0].communicate("", timeout=30)


@pytest.mark.parametrize("variable", ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"])
def test_only_rank_0_takes_the_out_lock_whichever_launcher_set_the_rank(tmp_path: Path, variable: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under mpirun (no RANK until accelerate sets it) every rank took the lock, and all but one failed."""
    from oasst_train.config import TrainConfig
    from oasst_train.outputs import RANK_VARIABLES, out_lock

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path / "out"))
    monkeypatch.setenv(variable, "1")
    with out_lock(cfg) as made:
        assert made is False and not (tmp_path / "out").exists()
    monkeypatch.setenv(variable, "0")
    with out_lock(cfg) as made:
        assert made is True and (tmp_path / "out" / ".oasst-lock").is_file()
