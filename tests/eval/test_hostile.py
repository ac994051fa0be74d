"""Hostile input to `oasst eval`: a damaged config, data file, adapter or model, an --out that cannot be written,
a Hub that hangs. Every case ends in one `error:` line naming the file (and line), exit code 1, no traceback,
inputs byte-identical and nothing left behind; all but the write faults fail before a model loads.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
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

from tests.conftest import STORIES
from tests.eval.conftest import GUANACO, HELLASWAG_FIXTURE, REPO
from oasst_tools.errors import describe_os_error
from tests.hostile import Ran, assert_refused, assert_unchanged, snapshot

HELLASWAG_ROWS = [json.loads(line) for line in HELLASWAG_FIXTURE.read_text(encoding="utf-8").splitlines()[:3]]


def _jsonl(*rows: object) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def _hellaswag(tmp_path: Path, content: bytes, name: str = "validation.jsonl") -> Path:
    folder = tmp_path / "data" / "hellaswag"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


# --- the config file --------------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "invalid-utf8": (b"model: m\nout: \"r\xe9sultats\"\n", "eval.yaml:2: not valid UTF-8 text (byte 0xe9 at column 8)"),
    "a-list": (b"- model\n", "eval.yaml: expected a mapping of settings, got a list"),
    "non-string-key": (b"model: m\n3: x\n", "eval.yaml: setting names must be text, not 3"),
    "limit-negative": (b"model: m\nlimit: -1\n", "eval.yaml:2: limit must be at least 1, not -1"),
    "limit-nan": (b"model: m\nlimit: .nan\n", "eval.yaml:2: limit must be a whole number, not nan"),
    "fewshot-text": (b"model: m\nnum_fewshot: five\n", "eval.yaml:2: num_fewshot must be a whole number, not 'five'"),
    "batch-size-list": (b"model: m\nbatch_size: [8]\n", "eval.yaml:2: batch_size must be text, not [8]"),
    "tasks-a-number": (b"model: m\ntasks: 5\n", "eval.yaml:2: tasks must be task names (text or a list of text), "
                                                 "not 5"),
    "flag-not-a-bool": (b"model: m\ncompare_base: maybe\n", "eval.yaml:2: compare_base must be true or false, "
                                                            "not 'maybe'"),
    "not-yaml": (b"model: {m\n", "eval.yaml:2: not valid YAML (expected ',' or '}', but got '<stream end>')"),
    "limit-past-int32": (b"model: m\nlimit: 99999999999999999999\n", "eval.yaml:2: limit must be at most "
                                                                      "2,147,483,647, not 99999999999999999999"),
    "batch-size-negative": (b"model: m\nbatch_size: -1\n", "eval.yaml:2: batch_size must be auto or a whole number "
                                                            "from 1 to 2,147,483,647, not '-1'"),
    "tasks-empty": (b"model: m\ntasks: []\n", "eval.yaml:2: tasks is empty: name at least one task, e.g. --tasks "
                                               "hellaswag"),
    "nul-character": (b"model: m\n\nadapter: a\x00\n", "eval.yaml:3: not valid YAML (the character U+0000 is not "
                                                        "allowed in YAML)"),
    "batch-size-superscript": ("model: m\nbatch_size: \"\u00b2\"\n".encode(),
                               "eval.yaml:2: batch_size must be auto or a whole number from 1 to 2,147,483,647, "
                               "not '\u00b2'"),
    "a-huge-list": (b"model: m\nlimit: [" + b",".join([b"1"] * 20000) + b"]\n",
                    "eval.yaml:2: limit must be a whole number, not [1, 1, 1, 1, ...]"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_file_is_one_error_naming_file_and_line(oasst, tmp_path: Path, case: str) -> None:
    content, expected = BAD_CONFIGS[case]
    (tmp_path / "eval.yaml").write_bytes(content)
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--config", "eval.yaml"), names="eval.yaml")
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


def test_config_file_batch_size_as_a_number_is_accepted(tmp_path: Path) -> None:
    from oasst_eval.config import resolve_config

    (tmp_path / "eval.yaml").write_text("model: m\nbatch_size: 8\nlimit: 3\n")
    cfg = resolve_config(tmp_path / "eval.yaml", {})
    assert (cfg.batch_size, cfg.limit) == ("8", 3)


# --- local data files ---------------------------------------------------------------------------------------------

def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


BAD_HELLASWAG = {
    "invalid-utf8": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0], b'{"ctx_a": "\xe9"}'),
                     "validation.jsonl:2: not valid UTF-8 text (byte 0xe9 at column 12)"),
    "not-json": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0], b"{oops"),
                 "validation.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)"),
    "row-a-list": ("validation.jsonl", _jsonl([1, 2]), "validation.jsonl:1: a row must be a JSON object, not a list"),
    "endings-missing": ("validation.jsonl", _jsonl({k: v for k, v in HELLASWAG_ROWS[0].items() if k != "endings"}),
                        "validation.jsonl:1: no `endings`"),
    "ctx-not-a-string": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0], HELLASWAG_ROWS[1] | {"ctx_a": 7}),
                         "validation.jsonl:2: `ctx_a` must be a string, not a number"),
    "label-out-of-range": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"label": 9}),
                           "validation.jsonl:1: `label` must be the index of the right ending (0-3), not 9"),
    "empty": ("validation.jsonl", b"\n", "validation.jsonl: no rows to score"),
    "gz-truncated": ("validation.jsonl.gz", _gz(_jsonl(*HELLASWAG_ROWS))[:-30],
                     "validation.jsonl.gz:"),
    "gz-garbage": ("validation.jsonl.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 40,
                   "validation.jsonl.gz:1: not a readable gzip file"),
    "gz-not-gzip": ("validation.jsonl.gz", b"plain text, not gzip\n",
                    "validation.jsonl.gz:1: not a gzip file (named .gz, but without gzip's first bytes)"),
    "gz-short-not-gzip": ("validation.jsonl.gz", b"garbage",
                          "validation.jsonl.gz:1: not a gzip file (named .gz, but without gzip's first bytes)"),
    # lm-eval's preprocessing makes these endings empty, and its first-document check indexes ending[0].
    "ending-empty": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0], HELLASWAG_ROWS[1] | {"endings": ["a", "", "b"]}),
                     "validation.jsonl:2: ending 1 is empty once lm-eval's hellaswag preprocessing drops its "
                     "[bracketed] parts: ''"),
    "ending-only-brackets": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"endings": ["a", " [title]", "b"]}),
                             "validation.jsonl:1: ending 1 is empty once"),
    # Texts `int()` or `str.isdigit` take that lm-eval's `{{label}}` then cannot use.
    "label-padded": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"label": " 1 "}),
                     "validation.jsonl:1: `label` must be the index of the right ending (0-3), not ' 1 '"),
    "label-superscript": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"label": "\u00b2"}),
                          "validation.jsonl:1: `label` must be the index of the right ending (0-3), not '\u00b2'"),
    "label-arabic-indic": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"label": "\u0663"}),
                           "validation.jsonl:1: `label` must be the index"),
    "label-5000-digits": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"label": "9" * 5000}),
                          "validation.jsonl:1: `label` must be the index"),
    # A column of the schema with another type could not share lm-eval's table with the other rows.
    "ind-a-string": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0], HELLASWAG_ROWS[1] | {"ind": "x"}),
                     "validation.jsonl:2: `ind` must be an integer, not a string"),
    "source-id-a-list": ("validation.jsonl", _jsonl(HELLASWAG_ROWS[0] | {"source_id": [1, 2]}),
                         "validation.jsonl:1: `source_id` must be a string, not a list"),
    "huge-integer": ("validation.jsonl",
                     _jsonl(json.dumps(HELLASWAG_ROWS[0]).encode()[:-1] + b', "n": 1' + b"0" * 5000 + b"}"),
                     "validation.jsonl:1: a number with more than 4,300 digits"),
}


@pytest.mark.parametrize("case", BAD_HELLASWAG)
def test_bad_hellaswag_file_is_one_error_naming_file_and_line(oasst, tmp_path: Path, case: str) -> None:
    name, content, expected = BAD_HELLASWAG[case]
    _hellaswag(tmp_path, content, name)
    before = snapshot(tmp_path)
    result = oasst("eval", "--model", STORIES, "--tasks", "hellaswag", "--data-dir", "data")
    line = assert_refused(result, names=f"data/hellaswag/{name}")
    assert line.startswith(f"error: data/hellaswag/{expected}"), line
    assert_unchanged(before, tmp_path)


def test_rows_that_differ_in_optional_types_share_one_table(tmp_path: Path) -> None:
    """An int and a digit-string label, a column outside the schema that changes type: lm-eval's table takes them
    (labels as ints, the extra column left out), where Arrow refused to build it."""
    from oasst_eval import data

    _hellaswag(tmp_path, _jsonl(HELLASWAG_ROWS[0] | {"note": {"a": 1}}, HELLASWAG_ROWS[1] | {"label": "2", "note": [1]},
                                HELLASWAG_ROWS[2]))
    table = data.hellaswag_dataset(data_dir=str(tmp_path / "data"))["validation"]
    assert table["label"] == [int(HELLASWAG_ROWS[0]["label"]), 2, int(HELLASWAG_ROWS[2]["label"])]
    assert "note" not in table.column_names and table["endings"] == [r["endings"] for r in HELLASWAG_ROWS]


def test_guanaco_rows_with_ids_of_other_types_share_one_table(tmp_path: Path) -> None:
    from oasst_eval import data

    (tmp_path / "build").mkdir()
    text = "### Human: a### Assistant: b"
    rows = _jsonl({"text": text, "message_tree_id": 5}, {"text": text, "message_tree_id": "t"}, {"text": text})
    (tmp_path / "build" / "test.jsonl").write_bytes(rows)
    table = data.guanaco_test_dataset(data=str(tmp_path / "build"), tokenizer=str(STORIES), format="guanaco")["test"]
    assert table["message_tree_id"] == ["", "t", ""]


def test_a_choice_longer_than_the_model_window_names_its_row(oasst, tmp_path: Path) -> None:
    """stories260K reads 512 tokens: no window holds a 3,000-word ending (lm-eval fails on a shape mismatch)."""
    long_row = HELLASWAG_ROWS[1] | {"endings": ["a", "b", "word " * 3000, "c"], "label": 0}
    _hellaswag(tmp_path, _jsonl(HELLASWAG_ROWS[0], long_row))
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "hellaswag", "--data-dir", "data",
                                "--out", "out"))
    assert line.startswith("error: ") and line.endswith("shorten it or leave that row out"), line
    assert "data/hellaswag/validation.jsonl:2 (choice 2): a choice of " in line
    assert "tokens is longer than the model's 512-token window" in line
    assert_unchanged(before, tmp_path)


def test_bad_few_shot_split_is_named_too(oasst, tmp_path: Path) -> None:
    _hellaswag(tmp_path, _jsonl(*HELLASWAG_ROWS))
    _hellaswag(tmp_path, _jsonl(HELLASWAG_ROWS[0], HELLASWAG_ROWS[1] | {"label": "x"}), "train.jsonl")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--data-dir", "data", "--num-fewshot", 1))
    assert line == ("error: data/hellaswag/train.jsonl:2: `label` must be the index of the right ending (0-3), "
                    "not 'x'")
    assert_unchanged(before, tmp_path)


def test_unreadable_hellaswag_file_names_it(oasst, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_tools import files

    path = _hellaswag(tmp_path, _jsonl(*HELLASWAG_ROWS))
    before = snapshot(tmp_path)

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:  # root reads through chmod 000
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))

    monkeypatch.setattr(files, "open", refuse, raising=False)
    result = oasst("eval", "--model", STORIES, "--data-dir", "data")
    monkeypatch.undo()
    assert assert_refused(result) == f"error: cannot read data file {path.relative_to(tmp_path)}: permission denied"
    assert_unchanged(before, tmp_path)


BAD_GUANACO = {
    "invalid-utf8": (_jsonl({"text": "ok"}, b'{"text": "\xc0\xaf"}'),
                     "build/test.jsonl:2: not valid UTF-8 text (byte 0xc0 at column 11)"),
    "text-not-a-string": (_jsonl({"text": ["a"]}), "build/test.jsonl:1: `text` must be a string, not a list"),
    "no-text": (_jsonl({"messages": []}), "build/test.jsonl:1: row has no `text` (it has: messages)"),
    "not-json": (b'{"text": "a"\n', "build/test.jsonl:1: not valid JSON (Expecting ',' delimiter)"),
    "empty": (b"", "build/test.jsonl: no rows to score"),
    "lone-surrogate": (_jsonl({"text": "ok"}, b'{"text": "### Human: hi \\ud800### Assistant: x"}'),
                       "build/test.jsonl:2: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its "
                       "pair): not text"),
}


@pytest.mark.parametrize("case", BAD_GUANACO)
def test_bad_guanaco_test_file_is_one_error_naming_file_and_line(oasst, tmp_path: Path, case: str) -> None:
    content, expected = BAD_GUANACO[case]
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "test.jsonl").write_bytes(content)
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "guanaco_test", "--data", "build"),
                          names="build/test.jsonl")
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--data-dir", "notes.txt/data", "notes.txt/data (from --data-dir) has no hellaswag/validation.jsonl or "
                                     "hellaswag/validation.jsonl.gz"),
    ("--data", "notes.txt/build", "notes.txt/build/test.jsonl not found (notes.txt is a file, not a folder): "
                                  "--data must be an `oasst build` output folder with test.jsonl"),
    ("--data-dir", "[bold]data[/]", "[bold]data[/] (from --data-dir) has no hellaswag/validation.jsonl"),
], ids=["data-dir-through-a-file", "data-through-a-file", "markup-in-data-dir"])
def test_data_path_that_cannot_hold_the_files(oasst, tmp_path: Path, flag: str, value: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    task = "guanaco_test" if flag == "--data" else "hellaswag"
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", task, flag, value), names=value)
    assert line.startswith(f"error: {expected}"), line
    assert_unchanged(before, tmp_path)


# --- --adapter and --model: damaged files, before anything loads --------------------------------------------------

def _safetensors(tensors: dict[str, list[int]]) -> bytes:
    """A float32 safetensors file of zeros (the format by hand: 8-byte header length, JSON header, data)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * int(__import__("math").prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": str(STORIES)}))
    (folder / "adapter_model.safetensors").write_bytes(_safetensors(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [2, 64]}))
    return folder


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


ADAPTER_DAMAGE = {
    "config-not-json": (lambda a: (a / "adapter_config.json").write_text("{"), "adapter/adapter_config.json:1: "
                                                                               "not valid JSON"),
    "config-invalid-utf8": (lambda a: (a / "adapter_config.json").write_bytes(b'{"r": "\xff"}'),
                            "adapter/adapter_config.json:1: not valid UTF-8 text"),
    "config-an-array": (lambda a: (a / "adapter_config.json").write_text("[]"),
                        "adapter/adapter_config.json: expected a JSON object, got a list"),
    "config-other-peft-type": (lambda a: (a / "adapter_config.json").write_text('{"peft_type": "IA3"}'),
                               "adapter/adapter_config.json: not a LoRA adapter config (peft_type 'IA3'"),
    "config-no-targets": (lambda a: (a / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4}'),
        "adapter/adapter_config.json: `target_modules` must name the adapted layers, not None"),
    "weights-missing": (lambda a: (a / "adapter_model.safetensors").unlink(),
                        "adapter has no adapter_model.safetensors"),
    "weights-truncated": (lambda a: _cut(a / "adapter_model.safetensors", 200),
                          "adapter/adapter_model.safetensors: truncated safetensors file (the header promises 512 "
                          "bytes of tensors, the file holds"),
    "weights-garbage-header": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x7fELF" * 30),
                               "adapter/adapter_model.safetensors: not a safetensors file"),
    "weights-empty": (lambda a: (a / "adapter_model.safetensors").write_bytes(b""),
                      "adapter/adapter_model.safetensors: truncated safetensors file (0 bytes, not even a header)"),
}


@pytest.mark.parametrize("case", ADAPTER_DAMAGE)
def test_damaged_adapter_is_one_error_before_the_model_loads(oasst, tmp_path: Path, case: str) -> None:
    damage, expected = ADAPTER_DAMAGE[case]
    damage(_adapter(tmp_path / "adapter"))
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--adapter", "adapter"), names="adapter")
    assert line.startswith(f"error: {expected}"), line
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("record", ["train_config.yaml", "adapter_config.json"])
def test_an_adapter_whose_recorded_base_moved_names_the_file_that_records_it(oasst, tmp_path: Path,
                                                                             record: str) -> None:
    """No --model: the base comes from the adapter's train_config.yaml, else its adapter_config.json; a base that
    is gone is said with that file, where the user finds (and fixes) the path."""
    adapter = _adapter(tmp_path / "adapter")
    if record == "train_config.yaml":
        (adapter / record).write_text("model: moved-base\nload_in_4bit: false\n")
    else:
        config = json.loads((adapter / record).read_text())
        (adapter / record).write_text(json.dumps(config | {"base_model_name_or_path": "moved-base"}))
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--adapter", "adapter", "--tasks", "hellaswag"), names="adapter")
    assert line == (f"error: adapter/{record}: model folder moved-base does not exist (a hub model id has the form "
                    "owner/name); pass --model to load another base")
    assert_unchanged(before, tmp_path)


MODEL_DAMAGE = {
    "config-not-json": (lambda m: (m / "config.json").write_text("{,}"), "model/config.json:1: not valid JSON"),
    "weights-truncated": (lambda m: _cut(m / "model.safetensors", 10_000),
                          "model/model.safetensors: truncated safetensors file"),
    "weights-garbage": (lambda m: (m / "model.safetensors").write_bytes(os.urandom(256)),
                        "model/model.safetensors: "),
}


@pytest.mark.parametrize("case", MODEL_DAMAGE)
def test_damaged_model_is_one_error_naming_the_file(oasst, tmp_path: Path, case: str) -> None:
    damage, expected = MODEL_DAMAGE[case]
    shutil.copytree(STORIES, tmp_path / "model")
    damage(tmp_path / "model")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", "model"), names="model/")
    assert line.startswith(f"error: {expected}"), line
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("model", "expected"), [
    ("notes.txt/model", "model folder notes.txt/model does not exist (notes.txt is a file, not a folder)"),
    ("missing.gguf", "model file missing.gguf does not exist"),
    ("fake.gguf", "fake.gguf: not a GGUF file (it does not start with the GGUF signature)"),
    ("stories260k", "model folder stories260k does not exist (a hub model id has the form owner/name)"),
], ids=["component-is-a-file", "gguf-missing", "gguf-not-gguf", "not-a-hub-id"])
def test_model_path_that_is_not_a_model(oasst, tmp_path: Path, model: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.gguf").write_bytes(b"\x00" * 64)
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", model), names=model)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.fixture
def hanging_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No probe made yet, no offline variable set, HF_ENDPOINT on a port that accepts and never answers."""
    from oasst_tools import hub

    monkeypatch.setattr(hub, "_probe", {})
    monkeypatch.setattr(hub, "_offline_reason", [])
    monkeypatch.setattr(hub, "_assumed", [])
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "oasst-empty-hub-cache"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield


def test_model_hub_id_with_a_hanging_hub_fails_within_two_seconds(oasst, tmp_path: Path, hanging_hub: None) -> None:
    before = snapshot(tmp_path)
    started = time.monotonic()
    line = assert_refused(oasst("eval", "--model", "owner/model"), names="owner/model")
    assert time.monotonic() - started < 2.5
    assert line.startswith("error: cannot load model owner/model from the Hugging Face Hub (127.0.0.1 did not answer "
                           "within 1.5 s) and it is not in the local cache"), line
    assert_unchanged(before, tmp_path)


# --- adapter weights that load but do not adapt: renamed, dropped, NaN ------------------------------------------------

def _rewrite_weights(folder: Path, change: Any) -> None:
    import torch  # noqa: F401 - safetensors.torch needs it
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


ADAPTER_WEIGHTS = {
    "none-match": (lambda t: {"foo.weight": next(iter(t.values()))}, "70 of the 70 weights"),
    "lora-a-renamed": (lambda t: {k.replace("lora_A", "lora_X"): v for k, v in t.items()}, "35 of the 70 weights"),
    "a-layer-dropped": (lambda t: {k: v for k, v in t.items() if ".layers.1." not in k}, "14 of the 70 weights"),
    "nan": (lambda t: {k: v * float("nan") if ".layers.2.mlp.up_proj.lora_B" in k else v for k, v in t.items()},
            "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", ADAPTER_WEIGHTS)
def test_adapter_weights_its_layers_cannot_use_are_refused(oasst, tmp_path: Path, adapter_dir: Path,
                                                           case: str) -> None:
    """peft loads what matches and leaves the rest at init: without the check these scored as the base model."""
    change, expected = ADAPTER_WEIGHTS[case]
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    _rewrite_weights(tmp_path / "adapter", change)
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--adapter", "adapter", "--limit", 2, "--out", "out"),
                          names="adapter/adapter_model.safetensors")
    assert line.startswith("error: adapter/adapter_model.safetensors: ") and expected in line, line
    assert_unchanged(before, tmp_path)


def test_an_adapter_config_whose_rank_is_not_its_weights_names_the_adapter(oasst, tmp_path: Path,
                                                                            adapter_dir: Path) -> None:
    """It read as a base model that changed since training (peft's size message names the model's layer)."""
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    rank = config["r"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"r": rank // 2}))
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--adapter", "adapter", "--limit", 2, "--out", "out"))
    assert line.startswith(f"error: adapter: adapter_config.json says r {rank // 2}, but "), line
    assert line.endswith(f"in adapter_model.safetensors has rank {rank}: the config is not these weights' own"), line
    assert_unchanged(before, tmp_path)


def test_adapter_tensors_no_layer_takes_are_a_warning(oasst, tmp_path: Path, adapter_dir: Path) -> None:
    import torch

    shutil.copytree(adapter_dir, tmp_path / "adapter")
    _rewrite_weights(tmp_path / "adapter", lambda t: {**t, "notes.weight": torch.zeros(2)})
    result = oasst("eval", "--adapter", "adapter", "--limit", 2, "--out", "out")
    assert result.exit_code == 0, result.output
    assert ("warning: adapter/adapter_model.safetensors: 1 tensor(s) match no adapted layer and are ignored "
            "(first: notes.weight)") in result.stderr


# --- --out -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "out"), [("--adapter", "adapter/eval"), ("--data", "build"),
                                         ("--model", "model/eval")], ids=["inside-adapter", "is-data", "inside-model"])
def test_out_that_is_or_lies_inside_an_input_fails_before_scoring(oasst, tmp_path: Path, adapter_dir: Path,
                                                                  flag: str, out: str) -> None:
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    shutil.copytree(STORIES, tmp_path / "model")
    shutil.copytree(GUANACO, tmp_path / "build")
    before = snapshot(tmp_path)
    result = oasst("eval", "--model", "model", "--adapter", "adapter", "--tasks", "guanaco_test", "--data", "build",
                   "--out", out)
    given = {"--adapter": "adapter", "--data": "build", "--model": "model"}[flag]
    where = "is" if out == given else "lies inside"
    assert assert_refused(result, names=out) == f"error: --out {out} {where} the input {flag} {given}; choose another --out"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(("out", "expected"), [
    ("notes.txt", "--out notes.txt is a file, not a folder"),
    ("notes.txt/eval", "--out notes.txt/eval cannot be created: notes.txt is a file, not a folder"),
], ids=["out-is-a-file", "component-is-a-file"])
def test_out_that_cannot_be_a_folder_fails_before_scoring(oasst, tmp_path: Path, out: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--out", out), names=out)
    assert line == f"error: {expected}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "permission-denied"])
def test_out_in_a_folder_that_cannot_be_written_fails_before_scoring(oasst, tmp_path: Path, code: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.abspath(os.fsdecode(path)).startswith(str(tmp_path / "locked")):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        real(path, *args, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "mkdir", refuse)
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--out", "locked/eval"), names="locked/eval")
    assert line == f"error: --out locked/eval: cannot write in locked ({describe_os_error(OSError(code, os.strerror(code)))})"
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_disk_full_after_scoring_leaves_no_half_written_results(oasst, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_eval import report

    real = report.write_temp

    def fills_up(path: Path, data: bytes) -> Path:
        if path.name == "eval_summary.json":  # the second file: the first one was written and must go again
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(report, "write_temp", fills_up)
    before = snapshot(tmp_path)
    result = oasst("eval", "--model", STORIES, "--tasks", "hellaswag", "--limit", 2, "--out", "out")
    line = assert_refused(result, names="out/eval_summary.json")
    assert line == ("error: cannot write out/eval_summary.json: no space left on device (the scores are lost; "
                    "nothing was left half-written)")
    assert_unchanged(before, tmp_path)


def _process(args: list[object], cwd: Path, *, code: str | None = None, file_size_limit: int | None = None) -> Ran:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")

    def limit() -> None:  # Python ignores SIGXFSZ: the limit surfaces as OSError(EFBIG)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "oasst_tools"]
    done = subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.mark.slow
def test_file_size_limit_on_the_results_in_a_real_process(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    ran = _process(["eval", "--model", STORIES, "--tasks", "hellaswag", "--limit", 2, "--out", "out"], tmp_path,
                   file_size_limit=4096)
    line = assert_refused(ran, names="out/")
    assert line.startswith("error: cannot write out/") and line.endswith(": file too large (the file-size limit, `ulimit -f`, was reached) (the scores are lost; "
                                                                         "nothing was left half-written)"), line
    assert "Traceback" not in ran.stderr
    assert_unchanged(before, tmp_path)


def test_bad_data_file_in_a_real_process_prints_one_line(tmp_path: Path) -> None:
    _hellaswag(tmp_path, _jsonl(HELLASWAG_ROWS[0], b"\xff"))
    before = snapshot(tmp_path)
    ran = _process(["eval", "--model", STORIES, "--data-dir", "data"], tmp_path)
    line = assert_refused(ran, names="data/hellaswag/validation.jsonl:2")
    assert ran.stderr.strip() == line == ("error: data/hellaswag/validation.jsonl:2: not valid UTF-8 text (byte 0xff "
                                          "at column 1)")
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_markup_in_the_out_path_is_printed_as_typed(oasst, tmp_path: Path) -> None:
    result = oasst("eval", "--model", STORIES, "--tasks", "guanaco_test", "--data", GUANACO, "--limit", 2,
                   "--out", "[bold]res[/]")
    assert result.exit_code == 0, result.output
    assert "[bold]res[/]/eval_summary.json" in result.stdout
    assert json.loads((tmp_path / "[bold]res[" / "]" / "eval_summary.json").read_text())["base"]["guanaco_test"]


def test_core_install_without_lm_eval_names_the_eval_extra(tmp_path: Path) -> None:
    code = "import sys; sys.modules['lm_eval'] = None\nfrom oasst_tools.cli import main\nmain()"
    ran = _process(["eval", "--model", "m"], tmp_path, code=code)
    assert (ran.exit_code, ran.stdout) == (1, "")
    assert ran.stderr == "error: oasst eval needs the eval extra: pip install 'oasst-tools[eval]'\n"


@pytest.mark.parametrize(("device", "expected"), [
    ("tpu", "--device tpu: not a device torch knows; use cpu, cuda or cuda:N"),
    ("meta", "--device meta: oasst eval runs on cpu or cuda, not meta"),
], ids=["unknown", "not-cpu-or-cuda"])
def test_a_device_torch_cannot_run_on_is_one_line_before_the_model_loads(oasst, tmp_path: Path, device: str,
                                                                         expected: str) -> None:
    before = snapshot(tmp_path)
    result = oasst("eval", "--model", STORIES, "--device", device, "--limit", 2)
    assert assert_refused(result, names=device) == f"error: {expected}"
    assert result.stderr.count("\n") == 1  # nothing loaded, nothing printed before it
    assert_unchanged(before, tmp_path)


# --- an --out that holds an earlier eval, or that another eval is writing ------------------------------------------

def _earlier_eval(out: Path) -> None:
    out.mkdir()
    (out / "results_adapter.json").write_text('{"adapter": "hours of scoring"}')
    (out / "eval_summary.json").write_text('{"adapter": {}}')
    (out / "notes.txt").write_text("mine")


def test_an_out_with_an_earlier_eval_is_refused_before_scoring(oasst, tmp_path: Path) -> None:
    """It was replaced without a word: the adapter's results deleted by a base-only eval into the default --out."""
    _earlier_eval(tmp_path / "out")
    before = snapshot(tmp_path)
    started = time.perf_counter()
    line = assert_refused(oasst("eval", "--model", STORIES, "--out", "out"), names="out")
    assert line == ("error: --out out holds an earlier eval (eval_summary.json, results_adapter.json); pass "
                    "--overwrite to replace it, or choose another --out")
    assert time.perf_counter() - started < 5  # before any model loads
    assert_unchanged(before, tmp_path)


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_eval_and_keeps_other_files(oasst, tmp_path: Path) -> None:
    _earlier_eval(tmp_path / "out")
    result = oasst("eval", "--model", STORIES, "--tasks", "hellaswag", "--limit", 2, "--out", "out", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.png", "eval_summary.json", "notes.txt",
                                                                   "results_base.json"]
    assert json.loads((tmp_path / "out" / "eval_summary.json").read_text())["settings"]["overwrite"] is True


def test_an_eval_into_the_out_another_eval_is_writing_is_refused_naming_it(oasst, tmp_path: Path) -> None:
    hold = ("import sys; from pathlib import Path; from oasst_tools.output import run_lock\n"
            "with run_lock(Path('out'), 'oasst eval'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = snapshot(tmp_path)
        line = assert_refused(oasst("eval", "--model", STORIES, "--out", "out"), names="out")
        assert line.startswith(f"error: --out out: another oasst eval run (pid {holder.pid} on ")
        assert line.endswith(") is writing there; wait for it to end or choose another --out")
        assert_unchanged(before, tmp_path)
    finally:
        holder.communicate("", timeout=30)
    assert not (tmp_path / "out").exists()  # the holder made it and wrote nothing


def test_a_signal_while_the_outputs_are_written_leaves_one_whole_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The results went in one by one: Ctrl-C between two left this run's results_base.json beside the earlier
    run's eval_summary.json and results_adapter.json, reading as one run. Before the renames, the earlier eval
    stays whole; during them the signal waits, and the new run is whole."""
    import signal

    from oasst_eval import report
    from tests.eval.test_report import _run

    out = tmp_path / "out"
    _earlier_eval(out)
    before = snapshot(tmp_path)
    runs = [_run("base", [1, 0, 0, 1], [(-40.0, 10)])]
    doc = report.summary(runs, {"seconds": {"base": 1.0}})

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "plot", interrupted)  # the chart is drawn after every results file is written
        with pytest.raises(KeyboardInterrupt):
            report.write_outputs(out, runs, doc)
    assert_unchanged(before, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["eval_summary.json", "notes.txt", "results_adapter.json"]

    real = os.replace
    renamed: list[str] = []

    def signal_after_the_first(src: Any, dst: Any) -> None:
        real(src, dst)
        renamed.append(os.path.basename(dst))
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", signal_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        report.write_outputs(out, runs, doc)
    assert renamed == ["results_base.json", "eval_summary.json", "eval.png"]  # all three, then the signal
    assert sorted(p.name for p in out.iterdir()) == ["eval.png", "eval_summary.json", "notes.txt",
                                                     "results_base.json"]
    assert json.loads((out / "eval_summary.json").read_text())["base"]


def test_a_chart_that_cannot_be_drawn_is_a_warning_and_the_scores_are_kept(tmp_path: Path, capsys: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn after the results were in temp files: a matplotlib error threw every score away."""
    from oasst_eval import report
    from tests.eval.test_report import _run

    def cannot_draw(doc: Any, path: Path) -> Path:
        path.write_bytes(b"half a png")
        raise ValueError("Axis limits cannot be NaN or Inf\nmore detail")

    monkeypatch.setattr(report, "plot", cannot_draw)
    runs = [_run("base", [1, 0, 0, 1], [(-40.0, 10)])]
    written = report.write_outputs(tmp_path / "out", runs, report.summary(runs, {"seconds": {"base": 1.0}}))
    assert sorted(written) == ["results_base", "summary"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_summary.json", "results_base.json"]
    assert capsys.readouterr().err == ("warning: eval.png not written (ValueError: Axis limits cannot be NaN or Inf); "
                                       "the results are written without it\n")
