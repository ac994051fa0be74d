"""Hostile input for `oasst build`, `stats` and `show`: each case ends in exactly one `error:` line naming the file
(exit 1; usage errors exit 2 with click's line), no traceback, inputs byte-identical, and no output or temp folder
left. Classes: unsafe --out, duplicates, malformed and deep data, OS errors, markup, pipes, signals and races.
Cases marked `proc` run `python -m oasst_tools` in a real subprocess, so no traceback can hide in CliRunner."""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.core.conftest import FLAT, NESTED, read_jsonl
from tests.hostile import Ran, assert_refused, assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[2]
TREE = "5c6a0593-e4ab-41e8-a23d-8244294fc12a"  # a tree of FLAT


def oasst(*args: object, cwd: Path, stdin: object = None, **kwargs: object) -> Ran:
    """`python -m oasst_tools ARGS` in a real process (offline), as a terminal user would run it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.update(kwargs.pop("env", {}))  # type: ignore[arg-type]
    done = subprocess.run([sys.executable, "-m", "oasst_tools", *map(str, args)], cwd=cwd, env=env, stdin=stdin,
                          capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]
    return Ran(done.returncode, done.stdout, done.stderr)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def deep_tree(depth: int, tree_id: str = "deep") -> dict:
    """A nested export line whose single thread is `depth` messages long (JSON nesting about 2 * depth)."""
    node: dict = {"message_id": f"m{depth - 1}", "role": "prompter" if (depth - 1) % 2 == 0 else "assistant",
                  "text": f"turn {depth - 1}", "lang": "en"}
    for i in range(depth - 2, -1, -1):
        node = {"message_id": f"m{i}", "role": "prompter" if i % 2 == 0 else "assistant", "text": f"turn {i}",
                "lang": "en", "replies": [node]}
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": node}


class _Raw(str):
    """Text dump_deep writes as it is."""


def dump_deep(value: Any) -> str:
    """`json.dumps(value)` without recursion: from Python 3.12 the C encoder stops near 10,000 levels whatever
    `sys.setrecursionlimit` says, and these test trees nest deeper."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Raw:
            out.append(item)
        elif isinstance(item, dict):
            seq: list[Any] = [_Raw("{")]
            for i, (key, inner) in enumerate(item.items()):
                seq += [_Raw((", " if i else "") + json.dumps(key) + ": "), inner]
            stack.extend(reversed([*seq, _Raw("}")]))
        elif isinstance(item, list):
            seq = [_Raw("[")]
            for i, inner in enumerate(item):
                seq += [_Raw(", ")] if i else []
                seq.append(inner)
            stack.extend(reversed([*seq, _Raw("]")]))
        else:
            out.append(json.dumps(item))
    return "".join(out)


# ------------------------------------------------------------------------------ refused: one error line, nothing left

# name -> set-up(tmp_path) returning (argv, what the error line must name, exit code)
Setup = Callable[[Path], tuple[list[object], str, int]]
CASES: dict[str, Setup] = {}


def case(name: str) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        CASES[name] = fn
        return fn
    return register


def _input(tmp: Path, name: str = "in.jsonl") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FLAT, path)
    return path


def _built(tmp: Path, name: str = "built") -> Path:
    """An earlier build's output (with its marker), made without the CLI so the case starts from it."""
    from oasst_tools.build import BuildConfig, build_dataset

    build_dataset(BuildConfig(inputs=(str(FLAT),), out=tmp / name))
    return tmp / name


@case("out is the input file")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "in.jsonl", "--overwrite"], "in.jsonl", 1


@case("out contains the input")
def _(tmp: Path):
    _input(tmp, "data/in.jsonl")
    (tmp / "data" / ".oasst-build").write_text("{}")  # even a folder that looks like an earlier build
    return ["build", "--input", "data/in.jsonl", "--out", "data", "--overwrite"], "data/in.jsonl", 1


@case("out inside a save_to_disk input folder")
def _(tmp: Path):
    (tmp / "ds").mkdir()
    (tmp / "ds" / "dataset_info.json").write_text("{}")
    return ["build", "--input", "ds", "--out", "ds/guanaco"], "ds", 1


@case("out under an input file")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "in.jsonl/out"], "in.jsonl", 1


@case("out reaches the input through a symlink")
def _(tmp: Path):
    _input(tmp, "data/in.jsonl")
    (tmp / "link.jsonl").symlink_to(tmp / "data" / "in.jsonl")
    return ["build", "--input", "link.jsonl", "--out", "data/../data", "--overwrite"], "link.jsonl", 1


@case("out is the current folder")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", ".", "--overwrite"], "--out .", 1


@case("out is empty")
def _(tmp: Path):
    _input(tmp)  # Path("") is "." : an unset shell variable once read as "the current folder"
    return ["build", "--input", "in.jsonl", "--out", "", "--overwrite"], "Invalid value for '--out': is empty", 2


@case("out is the current folder spelled from above")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", f"../{tmp.name}", "--overwrite"], tmp.name, 1


@case("out is the folder above")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "..", "--overwrite"], "--out ..", 1


@case("out is the root folder")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "/", "--overwrite"], "--out /", 1


@case("out is the home folder")
def _(tmp: Path):
    _input(tmp)
    assert os.environ["HOME"] == str(tmp / "home")  # set by the test
    return ["build", "--input", "in.jsonl", "--out", tmp / "home", "--overwrite"], str(tmp / "home"), 1


@case("out is an unexpanded tilde")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "~", "--overwrite"], "--out ~", 1


@case("overwrite refuses a folder no build wrote")
def _(tmp: Path):
    _input(tmp)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return ["build", "--input", "in.jsonl", "--out", "mine", "--overwrite"], "mine", 1


@case("overwrite refuses a file")
def _(tmp: Path):
    _input(tmp)
    (tmp / "notes.txt").write_text("keep me")
    return ["build", "--input", "in.jsonl", "--out", "notes.txt", "--overwrite"], "notes.txt", 1


@case("overwrite refuses a symlink to a build output")
def _(tmp: Path):
    _input(tmp)
    _built(tmp)
    (tmp / "link").symlink_to(tmp / "built")
    return ["build", "--input", "in.jsonl", "--out", "link", "--overwrite"], "link", 1


@case("overwrite refuses a dangling symlink")
def _(tmp: Path):
    _input(tmp)
    (tmp / "link").symlink_to(tmp / "nowhere")
    return ["build", "--input", "in.jsonl", "--out", "link", "--overwrite"], "link", 1


@case("the same file twice")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--input", "./in.jsonl", "--out", "out"], "./in.jsonl", 1


@case("the same file through a hard link")
def _(tmp: Path):
    os.link(_input(tmp), tmp / "other.jsonl")
    return ["build", "--input", "in.jsonl", "--input", "other.jsonl", "--out", "out"], "other.jsonl", 1


@case("two copies of one flat export")
def _(tmp: Path):
    _input(tmp)
    _input(tmp, "copy.jsonl")
    return ["build", "--input", "in.jsonl", "--input", "copy.jsonl", "--out", "out"], "copy.jsonl:1", 1


@case("two copies of one nested export")
def _(tmp: Path):
    shutil.copy(NESTED, tmp / "a.trees.jsonl.gz")
    shutil.copy(NESTED, tmp / "b.trees.jsonl.gz")
    return ["build", "--input", "a.trees.jsonl.gz", "--input", "b.trees.jsonl.gz", "--out", "out"], \
        "b.trees.jsonl.gz:1", 1


@case("a message in two trees")
def _(tmp: Path):
    rows = read_jsonl(FLAT)
    last = rows[-1]
    copy = {**rows[1], "message_tree_id": last["message_tree_id"], "parent_id": last["message_id"],
            "role": "assistant" if last["role"] == "prompter" else "prompter"}
    write_rows(tmp / "in.jsonl", rows + [copy])
    return ["build", "--input", "in.jsonl", "--out", "out"], f"in.jsonl:{len(rows) + 1}", 1


@case("a message in two trees, stats")
def _(tmp: Path):
    CASES["a message in two trees"](tmp)
    return ["stats", "in.jsonl"], "in.jsonl:", 1


@case("a tree deeper than orjson's limit with a bad role deep down")
def _(tmp: Path):
    tree = deep_tree(3000)
    node = tree["prompt"]
    for _ in range(2000):
        node = node["replies"][0]
    node["role"] = "system"
    (tmp / "deep.trees.jsonl").write_text(dump_deep(tree) + "\n")
    return ["build", "--input", "deep.trees.jsonl", "--out", "out"], "deep.trees.jsonl:1", 1


@case("a deep line that is not valid JSON")
def _(tmp: Path):
    (tmp / "deep.trees.jsonl").write_text(dump_deep(deep_tree(2000))[:-3] + "\n")
    return ["build", "--input", "deep.trees.jsonl", "--out", "out"], "deep.trees.jsonl:1: invalid JSON", 1


@case("a lone surrogate in a text")
def _(tmp: Path):
    lines = FLAT.read_text().splitlines()
    lines[3] = lines[3].replace('"text": "', '"text": "\\ud800', 1)
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    return ["build", "--input", "in.jsonl", "--out", "out"], "in.jsonl:4: invalid JSON", 1


@case("bytes that are not UTF-8")
def _(tmp: Path):
    data = FLAT.read_bytes().splitlines(keepends=True)
    data[2] = data[2].replace(b'"text": "', b'"text": "\xff\xfe', 1)
    (tmp / "in.jsonl").write_bytes(b"".join(data))
    column = len(data[2][:data[2].index(b"\xff")].decode()) + 1  # in characters
    return ["build", "--input", "in.jsonl", "--out", "out"], f"in.jsonl:3: not UTF-8 text: byte 0xff at column {column}", 1


def _other_format(encode: Any, expected: str) -> Setup:
    """The flat fixture in another encoding or compression: the first bytes name it, and what to do."""
    def setup(tmp: Path):
        (tmp / "in.jsonl").write_bytes(encode(FLAT.read_bytes()))
        return ["build", "--input", "in.jsonl", "--out", "out"], expected, 1
    return setup


CASES["UTF-16 with a byte-order mark"] = _other_format(
    lambda raw: raw.decode().encode("utf-16"),
    "in.jsonl:1: not UTF-8 text: byte 0xff at column 1 (UTF-16 text, by its byte-order mark: convert it, e.g. iconv "
    "-f utf-16 -t utf-8)")
CASES["a bzip2 file"] = _other_format(
    # The bad byte's column depends on the compressed bytes.
    lambda raw: __import__("bz2").compress(raw), "(a bzip2-compressed file: decompress it first (bunzip2); of "
                                                 "compressed files only gzip is read)")
CASES["an xz file"] = _other_format(
    lambda raw: __import__("lzma").compress(raw),
    "in.jsonl:1: not UTF-8 text: byte 0xfd at column 1 (an xz-compressed file: decompress it first (unxz); of "
    "compressed files only gzip is read)")


def _in_gzip(inner: Callable[[bytes], bytes], expected: str) -> Setup:
    """The flat fixture made into `inner`, then gzipped: what is inside once one gzip layer is off is named."""
    def setup(tmp: Path):
        (tmp / "in.jsonl.gz").write_bytes(gzip.compress(inner(FLAT.read_bytes())))
        return ["build", "--input", "in.jsonl.gz", "--out", "out"], expected, 1
    return setup


CASES["gzip inside gzip"] = _in_gzip(gzip.compress, "in.jsonl.gz:1: not UTF-8 text: byte 0x8b at column 2 (gzip "
                                     "data inside the gzip data: it was compressed twice; decompress it once (zcat)")
CASES["parquet inside gzip"] = _in_gzip(
    lambda raw: b"PAR1" + b"\x15\x04\xfe" + raw, "(a Parquet file: decompress it if compressed, and name it .parquet)")


def _bad_label(value: object, flag: str) -> Setup:
    def setup(tmp: Path):
        rows = read_jsonl(FLAT)
        rows[2]["labels"] = {"name": ["toxicity", "quality"], "value": [value, 0.5], "count": [1, 1]}
        write_rows(tmp / "in.jsonl", rows)
        return ["build", "--input", "in.jsonl", "--out", "out", flag, "toxicity=0.5"], "in.jsonl:3: field " \
            "'labels.toxicity' must be a number", 1
    return setup


CASES["a string label under --label-max"] = _bad_label("high", "--label-max")
CASES["a list label under --label-min"] = _bad_label([0.1], "--label-min")
CASES["a true label under --label-max"] = _bad_label(True, "--label-max")


@case("a negative integer rank, flat")
def _(tmp: Path):
    rows = read_jsonl(FLAT)
    rows[1]["rank"] = -1
    write_rows(tmp / "in.jsonl", rows)
    return ["build", "--input", "in.jsonl", "--out", "out"], "in.jsonl:2: field 'rank' must be a non-negative", 1


@case("a negative integer rank, nested")
def _(tmp: Path):
    tree = json.loads(gzip.decompress(NESTED.read_bytes()).splitlines()[0])
    tree["prompt"]["replies"][0]["rank"] = -2
    (tmp / "in.trees.jsonl").write_text(json.dumps(tree) + "\n")
    return ["build", "--input", "in.trees.jsonl", "--out", "out"], "in.trees.jsonl:1: field 'rank'", 1


@case("a role that is a list")
def _(tmp: Path):
    rows = read_jsonl(FLAT)
    rows[1]["role"] = ["assistant"]
    write_rows(tmp / "in.jsonl", rows)
    return ["build", "--input", "in.jsonl", "--out", "out"], "in.jsonl:2: field 'role' must be a string", 1


@case("a role that is an object, nested")
def _(tmp: Path):
    tree = json.loads(gzip.decompress(NESTED.read_bytes()).splitlines()[0])
    tree["prompt"]["replies"][0]["role"] = {"name": "assistant"}
    (tmp / "in.trees.jsonl").write_text(json.dumps(tree) + "\n")
    return ["stats", "in.trees.jsonl"], "in.trees.jsonl:1: field 'role' must be a string", 1


@case("label names that are lists, under --label-max")
def _(tmp: Path):
    rows = read_jsonl(FLAT)
    rows[2]["labels"] = {"name": [["toxicity"]], "value": [0.9], "count": [1]}
    write_rows(tmp / "in.jsonl", rows)
    return ["build", "--input", "in.jsonl", "--out", "out", "--label-max", "toxicity=0.5"], \
        "in.jsonl:3: field 'labels.name' must be a list of strings", 1


@case("emoji names that are objects, show")
def _(tmp: Path):
    rows = read_jsonl(FLAT)
    rows[0]["emojis"] = {"name": [{"a": 1}], "count": [2]}
    write_rows(tmp / "in.jsonl", rows)
    return ["show", "in.jsonl", rows[0]["message_tree_id"]], "in.jsonl:1: field 'emojis.name'", 1


@case("garbage after zero padding in a gzip")
def _(tmp: Path):
    (tmp / "in.jsonl.gz").write_bytes(gzip.compress(FLAT.read_bytes()) + b"\0" * 64 + b"not gzip")
    return ["build", "--input", "in.jsonl.gz", "--out", "out"], "in.jsonl.gz:", 1


@case("an empty device")
def _(tmp: Path):
    return ["build", "--input", "/dev/null", "--out", "out"], "/dev/null", 1


@case("an endless device without line ends")
def _(tmp: Path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    return ["build", "--input", "/dev/zero", "--out", "out"], "/dev/zero: no line end in the first 64 MiB", 1


@case("a gzip bomb without line ends, stats")
def _(tmp: Path):
    (tmp / "bomb.jsonl.gz").write_bytes(gzip.compress(bytes(80 << 20), compresslevel=1))
    return ["stats", "bomb.jsonl.gz"], "bomb.jsonl.gz: no line end", 1


@case("a folder that is not a datasets folder")
def _(tmp: Path):
    (tmp / "folder").mkdir()
    _input(tmp, "folder/in.jsonl")
    return ["build", "--input", "folder", "--out", "out"], "folder", 1


@case("a path through a file")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl/x.jsonl", "--out", "out"], "in.jsonl/x.jsonl", 1


@case("out's parent is a file")
def _(tmp: Path):
    _input(tmp)
    (tmp / "plain").write_text("a file")
    return ["build", "--input", "in.jsonl", "--out", "plain/sub/out"], "plain", 1


@pytest.mark.parametrize("missing", ["data/oasst.jsonl", "./x", "a/b/c", "x.parquet", "owner/name.jsonl.gz"])
def test_a_missing_path_that_is_no_hub_id_fails_at_once(run, tmp_path: Path, missing: str):
    started = time.perf_counter()
    result = run("build", "--input", missing, "--out", "out")
    assert assert_refused(result, names=missing) == f"error: {missing}: no such file or directory"
    assert time.perf_counter() - started < 1.0
    assert list(tmp_path.iterdir()) == []


@case("markup characters in a path")
def _(tmp: Path):
    path = tmp / "a[bold/]b[/red].jsonl"  # folders `a[bold` and `]b[`, file `red].jsonl`: `[/]` must print as is
    path.parent.mkdir(parents=True)
    path.write_text((FLAT.read_text().splitlines()[0])[:-5] + "\n")
    return ["build", "--input", "a[bold/]b[/red].jsonl", "--out", "o[red]"], "a[bold/]b[/red].jsonl:1", 1


@case("markup characters in a path, show")
def _(tmp: Path):
    CASES["markup characters in a path"](tmp)
    return ["show", "a[bold/]b[/red].jsonl", TREE], "a[bold/]b[/red].jsonl:1", 1


@case("malformed input, stats")
def _(tmp: Path):
    (tmp / "in.jsonl").write_text('{"message_id": "a"}\n{oops\n')
    return ["stats", "in.jsonl"], "in.jsonl:", 1


@case("an unknown tree, show")
def _(tmp: Path):
    _input(tmp)
    return ["show", "in.jsonl", "[bold]nope[/]"], "in.jsonl: no tree with message_tree_id [bold]nope[/]", 1


@case("empty --lang")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--lang", ""], "--lang", 2


@case("--lang of commas")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--lang", ","], "--lang", 2


@case("NaN --test-size")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--test-size", "nan"], "--test-size", 2


@case("infinite --test-size")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--test-size", "inf"], "--test-size", 2


@case("--top-k 0")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--top-k", "0"], "--top-k", 2


@case("--width 0")
def _(tmp: Path):
    _input(tmp)
    return ["show", "in.jsonl", TREE, "--width", "0"], "--width", 2


@case("--width below 0")
def _(tmp: Path):
    _input(tmp)
    return ["show", "in.jsonl", TREE, "--width", "-5"], "--width", 2


@case("a NaN --label-max limit")
def _(tmp: Path):
    _input(tmp)  # NaN compares false with every value: the filter would silently keep everything
    return ["build", "--input", "in.jsonl", "--out", "out", "--label-max", "toxicity=nan"], "--label-max", 1


@case("--min-turns above --max-turns")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--min-turns", "5", "--max-turns", "2"], "--min-turns", 2


def _flat_field(index: int, name: str, value: object, command: tuple[str, ...], expected: str) -> Callable:
    """A case: row `index` of the flat fixture with `name` set to `value`, refused by `command` as `expected`."""
    def make(tmp: Path):
        rows = read_jsonl(FLAT)
        rows[index][name] = value
        write_rows(tmp / "in.jsonl", rows)
        argv = [*command[:1], *(("--input",) if command[0] == "build" else ()), "in.jsonl", *command[1:]]
        return argv, expected, 1
    return make


# Every reader and every build mode takes or refuses the same records (the top-rank build once skipped the checks
# of fields it does not read), and says which field is wrong.
for _command in (("build", "--out", "out"), ("build", "--out", "out", "--all-threads"), ("stats",)):
    _label = " ".join(_command[:1] + _command[3:])
    CASES[f"emoji counts that are not a list, {_label}"] = _flat_field(
        1, "emojis", {"name": ["+1"], "count": 5}, _command,
        "in.jsonl:2: field 'emojis.count' must be a list of 1 whole number(s), one per name, got 5")
    CASES[f"emoji names that are lists, {_label}"] = _flat_field(
        1, "emojis", {"name": [["x"]], "count": [1]}, _command, "in.jsonl:2: field 'emojis.name' must be a list")
    CASES[f"labels that are a list, {_label}"] = _flat_field(
        1, "labels", [], _command, "in.jsonl:2: field 'labels' must be an object, got []")
    CASES[f"label names that are lists, {_label}"] = _flat_field(
        1, "labels", {"name": [["x"]], "value": [1.0]}, _command, "in.jsonl:2: field 'labels.name' must be a list")
    CASES[f"a parent_id of 0, {_label}"] = _flat_field(
        1, "parent_id", 0, _command, "in.jsonl:2: field 'parent_id' must be a string or null, got 0")
CASES["emojis that are false"] = _flat_field(1, "emojis", False, ("build", "--out", "out"),
                                             "in.jsonl:2: field 'emojis' must be an object, got False")
CASES["an export-form emoji count that is text"] = _flat_field(
    1, "emojis", {"+1": "x"}, ("build", "--out", "out"), "in.jsonl:2: field 'emojis.+1' must be a whole number")


def _nested_reply(name: str, value: object) -> Callable:
    """A case: the first reply of the first nested fixture tree with `name` set to `value`."""
    def make(tmp: Path):
        tree = json.loads(gzip.decompress(NESTED.read_bytes()).splitlines()[0])
        tree["prompt"]["replies"][0][name] = value
        (tmp / "in.trees.jsonl").write_text(json.dumps(tree) + "\n")
        return ["build", "--input", "in.trees.jsonl", "--out", "out"], "in.trees.jsonl:1: ", 1
    return make


CASES["a reply of another tree, nested"] = _nested_reply("message_tree_id", "another-tree")
CASES["a message_tree_id that is a number, nested"] = _nested_reply("message_tree_id", 5)
CASES["replies that are false, nested"] = _nested_reply("replies", False)
CASES["replies that are an object, nested"] = _nested_reply("replies", {})


@case("two thread selections")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--top-rank", "--all-threads"], "--top-rank and " \
        "--all-threads are mutually exclusive", 2


@case("--all-threads with --top-k")
def _(tmp: Path):
    _input(tmp)
    return ["build", "--input", "in.jsonl", "--out", "out", "--all-threads", "--top-k", "2"], "--all-threads and " \
        "--top-k are mutually exclusive", 2


@case("a short .gz that is not gzip")
def _(tmp: Path):
    (tmp / "in.jsonl.gz").write_bytes(b"garbage")  # zlib alone calls this "truncated"
    return ["stats", "in.jsonl.gz"], "in.jsonl.gz:1: not a gzip file (read as gzip, but without gzip's first bytes)", 1


@case("a line that is null")
def _(tmp: Path):
    (tmp / "in.jsonl").write_text(FLAT.read_text().splitlines()[0] + "\nnull\n")
    return ["build", "--input", "in.jsonl", "--out", "out"], "in.jsonl:2: expected a JSON object, got null", 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_with_one_line_and_nothing_changes(run, tmp_path: Path, name: str,
                                                                    monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    argv, names, code = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    result = run(*argv)
    assert_refused(result, names=names, code=code)
    assert_unchanged(before, tmp_path)


# Cases run again as a real process: what a terminal shows, no traceback anywhere.
PROCESS_CASES = ["out is the input file", "two copies of one nested export", "a lone surrogate in a text",
                 "markup characters in a path", "a tree deeper than orjson's limit with a bad role deep down",
                 "a string label under --label-max", "empty --lang", "a path through a file"]


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_hostile_input_in_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path, name: str):
    argv, names, code = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    assert_refused(oasst(*argv, cwd=tmp_path), names=names, code=code)
    assert_unchanged(before, tmp_path)


# ------------------------------------------------------------------------------------------------- OS errors


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import oasst_tools.build as build_module

    _input(tmp_path)
    monkeypatch.setattr(build_module, "open", _FullDisk, raising=False)
    before = snapshot(tmp_path)
    line = assert_refused(run("build", "--input", "in.jsonl", "--out", "out"), names="out")
    assert line == "error: out: cannot write the output: no space left on device; nothing written"
    assert_unchanged(before, tmp_path)


def test_a_read_only_file_system_is_one_line(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_mkdir = os.mkdir

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        if ".tmp-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    _input(tmp_path)
    monkeypatch.setattr(os, "mkdir", read_only)
    before = snapshot(tmp_path)
    line = assert_refused(run("build", "--input", "in.jsonl", "--out", "out"), names="out")
    assert "read-only file system" in line
    assert_unchanged(before, tmp_path)


def test_a_read_error_mid_input_is_one_line_naming_the_input(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from oasst_tools import lines

    def failing(self: object, size: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    _input(tmp_path)
    monkeypatch.setattr(lines.Source, "fill", failing)
    before = snapshot(tmp_path)
    line = assert_refused(run("build", "--input", "in.jsonl", "--out", "out"), names="in.jsonl")
    assert line == "error: in.jsonl: cannot read: input/output error"
    assert_unchanged(before, tmp_path)


def test_the_file_size_limit_is_one_line_in_a_real_process(tmp_path: Path):
    _input(tmp_path)
    before = snapshot(tmp_path)

    def limit() -> None:  # train.jsonl is 87 KB: the write past 20 KB fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = oasst("build", "--input", "in.jsonl", "--out", "out", cwd=tmp_path, preexec_fn=limit)
    line = assert_refused(result, names="out")
    assert "file too large" in line
    assert_unchanged(before, tmp_path)


@pytest.fixture
def unprivileged() -> tuple[Path, Callable[..., Ran]]:
    """A world-writable folder and a runner that runs `oasst` there as a user that chmod restricts: nobody when the
    tests run as root (root ignores permission bits), else the current user."""
    folder = Path(tempfile.mkdtemp(prefix="oasst-perm-"))
    folder.chmod(0o777)
    prefix: list[str] = []
    if os.geteuid() == 0:
        # setpriv rather than subprocess's user=: the latter cannot exec a venv interpreter under a 0700 /root
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else []
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "import oasst_tools.cli"], cwd=folder,
                                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            usable = bool(prefix) and probe.returncode == 0
        except OSError:
            usable = False
        if not usable:
            shutil.rmtree(folder)
            pytest.skip("running as root, and user nobody cannot run this interpreter here")

    def run_there(*args: object) -> Ran:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run([*prefix, sys.executable, "-m", "oasst_tools", *map(str, args)], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=120)
        return Ran(done.returncode, done.stdout, done.stderr)

    yield folder, run_there
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


def test_an_unreadable_input_is_one_line(unprivileged: tuple[Path, Callable[..., Ran]]):
    folder, run_there = unprivileged
    shutil.copy(FLAT, folder / "in.jsonl")
    (folder / "in.jsonl").chmod(0)
    before = snapshot(folder)
    line = assert_refused(run_there("build", "--input", "in.jsonl", "--out", "out"), names="in.jsonl")
    assert line == "error: in.jsonl: cannot open: permission denied"
    assert_unchanged(before, folder)
    assert_refused(run_there("stats", "in.jsonl"), names="in.jsonl")


def test_an_out_in_a_read_only_folder_is_one_line(unprivileged: tuple[Path, Callable[..., Ran]]):
    folder, run_there = unprivileged
    shutil.copy(FLAT, folder / "in.jsonl")
    (folder / "locked").mkdir()
    (folder / "locked").chmod(0o555)
    before = snapshot(folder)
    line = assert_refused(run_there("build", "--input", "in.jsonl", "--out", "locked/out"), names="locked/out")
    assert "permission denied" in line
    assert_unchanged(before, folder)


# ------------------------------------------------------------------------------------------ the Hub, offline


def test_a_hub_id_offline_fails_fast_with_the_advice(run, tmp_path: Path):
    started = time.perf_counter()
    line = assert_refused(run("build", "--input", "someone/some-data", "--out", "out"), names="someone/some-data")
    assert line.endswith("offline, pass --input PATH with a local export (.jsonl, .jsonl.gz, .parquet, "
                         ".trees.jsonl.gz or a save_to_disk folder)")
    assert time.perf_counter() - started < 5  # datasets answers from its cache at once when told it is offline
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_a_hub_id_without_network_fails_within_two_seconds(tmp_path: Path, server: str):
    """No offline variable: the Hub is probed once (1.5 s at most), not retried for 25 s by datasets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "refused":
        listener.close()
    else:
        listener.listen(8)  # accepts connections and never answers
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", PYTHONPATH=str(ROOT))
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "from oasst_tools.cli import main; main()", "build", "--input",
                               "someone/some-data", "--out", "out"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        elapsed = time.perf_counter() - started
    finally:
        listener.close()
    line = assert_refused(Ran(done.returncode, done.stdout, done.stderr), names="someone/some-data")
    assert "offline, pass --input PATH" in line
    assert elapsed < 2.5 + 1.0  # the probe's 1.5 s, plus start-up on a busy machine
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- pipes


def _feed(path: Path, data: bytes, hold: threading.Event | None = None) -> threading.Thread:
    """Write `data` into the FIFO at `path` from a thread (opening blocks until the reader opens it); with `hold`,
    keep the FIFO open until it is set."""
    def writer() -> None:
        with open(path, "wb") as fh:
            try:
                fh.write(data)
                fh.flush()
                if hold is not None:
                    hold.wait(30)
            except BrokenPipeError:
                pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def _reference(tmp_path: Path, source: Path = FLAT) -> bytes:
    from oasst_tools.build import BuildConfig, build_dataset

    build_dataset(BuildConfig(inputs=(str(source),), out=tmp_path / "ref"))
    data = (tmp_path / "ref" / "train.jsonl").read_bytes()
    shutil.rmtree(tmp_path / "ref")
    return data


@pytest.mark.parametrize("source", [FLAT, NESTED], ids=["flat", "nested-gzip"])
def test_a_fifo_is_read_once_whole_and_gzip_is_known_by_its_magic(tmp_path: Path, source: Path):
    expected = _reference(tmp_path, source)
    os.mkfifo(tmp_path / "fifo")
    writer = _feed(tmp_path / "fifo", source.read_bytes())
    result = oasst("build", "--input", "fifo", "--out", "out", "-q", cwd=tmp_path)
    writer.join(10)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == expected


def test_stdin_and_process_substitution_give_the_file_s_rows(tmp_path: Path):
    expected = _reference(tmp_path, NESTED)
    with open(NESTED, "rb") as fh:
        result = oasst("build", "--input", "/dev/stdin", "--out", "a", "-q", cwd=tmp_path, stdin=fh)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == expected
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash for <(zcat ...)")
    done = subprocess.run([bash, "-c", f"{sys.executable} -m oasst_tools build --input <(zcat {NESTED}) --out b -q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "train.jsonl").read_bytes() == expected


def test_malformed_data_through_a_pipe_names_the_pipe_and_line(tmp_path: Path):
    data = FLAT.read_bytes().splitlines(keepends=True)
    data.insert(5, b"{not json\n")
    done = subprocess.run([sys.executable, "-m", "oasst_tools", "build", "--input", "/dev/stdin", "--out", "out"],
                          input=b"".join(data), cwd=tmp_path, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = Ran(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert assert_refused(result).startswith("error: /dev/stdin:6: invalid JSON")
    assert list(tmp_path.iterdir()) == []


def test_stats_and_show_read_a_pipe(tmp_path: Path):
    with open(FLAT, "rb") as fh:
        stats = oasst("stats", "/dev/stdin", "--json", cwd=tmp_path, stdin=fh)
    assert stats.exit_code == 0 and json.loads(stats.stdout)["trees"] == 24
    with open(FLAT, "rb") as fh:
        show = oasst("show", "/dev/stdin", TREE, "--width", "20", cwd=tmp_path, stdin=fh)
    assert show.exit_code == 0 and "★ assistant · rank 0" in show.stdout


# ----------------------------------------------------------------------------------- signals, kills and races


def _blocked_build(tmp_path: Path, out: str = "out") -> tuple[subprocess.Popen, threading.Event]:
    """A build reading a FIFO that stays open after its first records (whole lines: once the FIFO closes, the build
    finishes): it blocks with its temp folder made."""
    os.mkfifo(tmp_path / "fifo")
    hold = threading.Event()
    data = FLAT.read_bytes()
    _feed(tmp_path / "fifo", data[:data.index(b"\n", 5000) + 1], hold)
    proc = subprocess.Popen([sys.executable, "-m", "oasst_tools", "build", "--input", "fifo", "--out", out],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 30
    while not any(p.name.startswith(f".{out}.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    time.sleep(0.2)  # into the blocking read
    return proc, hold


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_build_removes_the_temp_folder_and_says_so(tmp_path: Path, signum: int):
    proc, hold = _blocked_build(tmp_path)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    hold.set()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum
    assert stderr == f"error: interrupted by {name}; nothing written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


@pytest.mark.parametrize("command", ["stats", "show"])
def test_sigterm_to_any_other_command_ends_it_with_one_line(tmp_path: Path, command: str):
    """Commands without their own signal handling (stats, show; train and eval while loading) end on SIGTERM with
    one line and 128 + 15, not killed silently by the default action."""
    os.mkfifo(tmp_path / "fifo")
    hold = threading.Event()
    data = FLAT.read_bytes()
    _feed(tmp_path / "fifo", data[:data.index(b"\n", 5000) + 1], hold)
    args = ["fifo", "--json"] if command == "stats" else ["fifo", TREE]
    proc = subprocess.Popen([sys.executable, "-m", "oasst_tools", command, *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 30
        while _state(proc.pid) != "S" or _cpu_ticks(proc.pid) != _cpu_ticks(proc.pid, after=0.3):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        hold.set()
        proc.kill()
        proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr == "error: stopped by SIGTERM\n" and stdout == ""


def _state(pid: int) -> str:
    """The process's scheduler state letter (R running, S sleeping: here, blocked on the FIFO)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _cpu_ticks(pid: int, after: float = 0.0) -> int:
    """User + system CPU ticks the process has used, read `after` seconds from now."""
    time.sleep(after)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_killed_build_s_temp_folder_is_removed_by_the_next_build(tmp_path: Path):
    proc, hold = _blocked_build(tmp_path)
    proc.kill()
    proc.wait(30)
    hold.set()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1  # kill -9 runs no clean-up
    _input(tmp_path)
    result = oasst("build", "--input", "in.jsonl", "--out", "out", "-q", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "in.jsonl", "out"]


def test_a_live_build_s_temp_folder_is_left_alone(tmp_path: Path):
    proc, hold = _blocked_build(tmp_path, out="shared")
    try:
        _input(tmp_path)
        result = oasst("build", "--input", "in.jsonl", "--out", "other", "-q", cwd=tmp_path)
        assert result.exit_code == 0
        result = oasst("build", "--input", "in.jsonl", "--out", "shared", "-q", cwd=tmp_path)
        assert result.exit_code == 0  # cleans stale folders of `shared` only: the running build's is still there
        assert proc.poll() is None
        assert any(p.name.startswith(".shared.tmp-") for p in tmp_path.iterdir())
    finally:
        proc.terminate()
        proc.wait(30)
        hold.set()


def test_of_two_racing_builds_the_one_finishing_second_fails_and_replaces_nothing(tmp_path: Path):
    proc, hold = _blocked_build(tmp_path)
    shutil.copy(NESTED, tmp_path / "other.trees.jsonl.gz")
    first = oasst("build", "--input", "other.trees.jsonl.gz", "--out", "out", "-q", cwd=tmp_path)
    assert first.exit_code == 0, first.stderr
    written = (tmp_path / "out" / "train.jsonl").read_bytes()
    hold.set()  # the second build reads the rest of its input (the FIFO closes) and finishes
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr.splitlines()[-1] == ("error: out: written by another build (or program) while this one ran; "
                                       "nothing replaced (pass --overwrite to replace it)")
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ------------------------------------------------------------------------------ what must still work, and how


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_output_follows_the_umask(run, tmp_path: Path, mask: int):
    before = os.umask(mask)
    try:
        assert run("build", "--input", FLAT, "--out", "out", "-q").exit_code == 0
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_overwrite_replaces_an_earlier_build_and_marks_every_output(run, tmp_path: Path):
    assert run("build", "--input", FLAT, "--out", "out", "-q").exit_code == 0
    marker = json.loads((tmp_path / "out" / ".oasst-build").read_text())
    assert marker["tool"] == "oasst-tools" and {"version", "created"} <= set(marker)
    assert run("build", "--input", NESTED, "--out", "out", "-q", "--overwrite").exit_code == 0
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_skip_mode_reads_a_repeated_input_once_and_drops_repeated_trees_counting_both(run, tmp_path: Path):
    _input(tmp_path)
    _input(tmp_path, "copy-validation.jsonl")  # the same trees again, as a test split: never in both splits
    result = run("build", "--input", "in.jsonl", "--input", "./in.jsonl", "--input", "copy-validation.jsonl",
                 "--out", "out", "--on-error", "skip", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"duplicate_input": 1, "duplicate_tree": 24}
    assert report["skipped_first"]["duplicate_tree"].startswith("copy-validation.jsonl:1: tree ")
    assert not (tmp_path / "out" / "test.jsonl").exists()
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 24
    assert "warning: dropped 24 tree(s) already read" in result.stderr


def test_a_tree_5000_messages_deep_is_read_built_counted_and_drawn(run, tmp_path: Path):
    (tmp_path / "deep.trees.jsonl").write_text(dump_deep(deep_tree(5000)) + "\n")
    assert run("build", "--input", "deep.trees.jsonl", "--out", "out", "-q").exit_code == 0
    (row,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert row["num_turns"] == 5000 and row["messages"][-1]["content"] == "turn 4999"
    stats = run("stats", "deep.trees.jsonl", "--json")
    assert json.loads(stats.stdout)["depths"] == {"5000": 1}
    show = run("show", "deep.trees.jsonl", "deep", "--width", "10")
    assert show.exit_code == 0 and "… 4,984 more" in show.stdout  # 16 levels drawn on 80 columns


def test_a_gzip_with_zero_padding_reads_like_the_plain_file(run, tmp_path: Path):
    data = FLAT.read_bytes()
    (tmp_path / "padded.jsonl.gz").write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]) + bytes(4096))
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", str(tmp_path / "padded.jsonl.gz")]).returncode == 0
    # Zeros between members too, read on as Python's gzip module does (GNU gzip stops there with a warning).
    (tmp_path / "inner.jsonl.gz").write_bytes(gzip.compress(data[:5000]) + bytes(100) + gzip.compress(data[5000:]))
    assert gzip.decompress((tmp_path / "inner.jsonl.gz").read_bytes()) == data
    assert run("build", "--input", FLAT, "--out", "ref", "-q").exit_code == 0
    for name in ("padded", "inner"):
        assert run("build", "--input", f"{name}.jsonl.gz", "--out", name, "-q").exit_code == 0
        assert (tmp_path / name / "train.jsonl").read_bytes() == (tmp_path / "ref" / "train.jsonl").read_bytes()
        assert json.loads(run("stats", f"{name}.jsonl.gz", "--json").stdout)["trees"] == 24


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_skip_mode_on_a_cut_gzip_builds_the_trees_before_the_cut(run, tmp_path: Path, shape: str):
    data = gzip.compress(FLAT.read_bytes()) if shape == "flat" else NESTED.read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    assert run("build", "--input", "cut.jsonl.gz", "--out", "out").exit_code == 1
    result = run("build", "--input", "cut.jsonl.gz", "--out", "out", "--on-error", "skip", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"truncated_gzip": 1}
    assert 0 < report["rows"]["train"] < (24 if shape == "flat" else 20)
    assert "the trees before that line were built" in result.stderr


def test_a_label_filter_no_message_carries_is_warned_about(run, tmp_path: Path):
    result = run("build", "--input", FLAT, "--out", "out", "--label-max", "toxcity=0.5", "-q")
    assert result.exit_code == 0
    assert "warning: --label-max toxcity: no message of the input has this label" in result.stderr
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["labels_not_found"] == ["toxcity"]
    quiet = run("build", "--input", FLAT, "--out", "out2", "--label-max", "toxicity=0.5", "-q")
    assert "no message of the input has this label" not in quiet.stderr


def test_markup_in_data_and_paths_prints_literally(run, tmp_path: Path):
    rows = read_jsonl(FLAT)
    for row in rows:
        row["lang"], row["tree_state"] = "[bold]en[/]", "[/]ready"
        row["text"] = "[red]:smile: [/]" + row["text"]
    write_rows(tmp_path / "a[red]b.jsonl", rows)
    build = run("build", "--input", "a[red]b.jsonl", "--out", "o[/]x", "--tree-state", "any")
    assert build.exit_code == 0, build.output
    assert "oasst build -> o[/]x" in build.stdout and "[bold]en[/] 24" in build.stdout
    stats = run("stats", "a[red]b.jsonl")
    assert "[/]ready" in stats.stdout and "[bold]en[/]" in stats.stdout
    show = run("show", "a[red]b.jsonl", TREE, "--width", "14")
    assert "[/]ready · [bold]en[/]" in show.stdout and "[red]:smile: …" in show.stdout  # no emoji either


def test_stats_and_show_read_an_interleaved_flat_file_as_build_does(run, tmp_path: Path):
    rows = read_jsonl(FLAT)
    write_rows(tmp_path / "mixed.jsonl", rows[::2] + rows[1::2])  # every tree split in two
    plain = json.loads(run("stats", FLAT, "--json").stdout)
    mixed = run("stats", "mixed.jsonl", "--json")
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.stdout) == plain
    show = run("show", "mixed.jsonl", TREE, "--width", "30")
    assert show.exit_code == 0 and "★ assistant · rank 0" in show.stdout


def test_a_deep_tree_gzipped_through_a_pipe_is_sniffed_from_its_first_line_and_read(tmp_path: Path):
    """The first line is far longer than the first read, gzip is told by its magic bytes (no name), and the bytes
    sniffed are read again: all on a pipe, which can be read only once."""
    lines = [dump_deep(deep_tree(3000)), *gzip.decompress(NESTED.read_bytes()).decode().splitlines()]
    data = gzip.compress("\n".join(lines).encode() + b"\n")
    done = subprocess.run([sys.executable, "-m", "oasst_tools", "build", "--input", "/dev/stdin", "--out", "out",
                           "-q"], input=data, cwd=tmp_path, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 21 and rows[0]["num_turns"] == 3000


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_plain_file_parsed_in_c_fails_and_skips_as_the_line_by_line_reader_does(tmp_path: Path, on_error: str):
    """A plain .jsonl is parsed by `map(orjson.loads, ...)`; blank lines, bad JSON, values that are no objects and
    lines too deep for orjson then take the line-by-line path. Gzip input always takes it: the two must agree."""
    from oasst_tools.errors import OasstInputError
    from oasst_tools.read import ReadReport, iter_raw_trees

    lines = FLAT.read_text().splitlines()
    lines[4:4] = ["", "[1, 2]", "   "]
    lines[20:20] = ["{not json", '"a string"', "null"]
    lines.append(dump_deep(deep_tree(700, tree_id="deep")).replace('"prompt"', '"x"'))  # deep: no message_id
    text = "\n".join(lines) + "\n"
    (tmp_path / "in.jsonl").write_text(text)
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    results = []
    for name in ("in.jsonl", "in.jsonl.gz"):
        report = ReadReport()
        try:
            trees = [(raw.tree_id, sorted(raw.records)) for raw in iter_raw_trees(tmp_path / name, on_error=on_error,
                                                                                  report=report)]
            results.append((trees, dict(report.skipped), report.messages))
        except OasstInputError as err:
            results.append((str(err).replace(str(tmp_path / name), "FILE"), err.line))
    assert results[0] == results[1]
    if on_error == "fail":
        assert results[0] == ("FILE:6: expected a JSON object, got a list (JSON Lines: one object per line; convert an "
                              "array with jq -c '.[]')", 6)
    else:
        assert results[0][1] == {"wrong_type": 3, "invalid_json": 1, "missing_field": 1}


def test_a_flat_file_whose_first_record_is_short_and_mentions_a_prompt_is_read_as_flat(run, tmp_path: Path):
    """Shape detection parses the first record: a tree object has `prompt` and no `message_id` (the byte sniff
    it replaces took a short flat record with a `prompt` field and `message_tree_id` for a tree)."""
    from oasst_tools.read import detect_shape

    rows = read_jsonl(FLAT)
    first = {"message_id": rows[0]["message_id"], "message_tree_id": rows[0]["message_tree_id"], "prompt": 1,
             "parent_id": None, "role": "prompter", "text": "hi", "tree_state": "ready_for_export"}
    write_rows(tmp_path / "short.jsonl", [first] + [r for r in rows if r["message_tree_id"] != first[
        "message_tree_id"]])
    assert detect_shape(tmp_path / "short.jsonl") == "flat"
    assert run("build", "--input", "short.jsonl", "--out", "out", "-q").exit_code == 0
    (tmp_path / "t.trees.jsonl").write_text(json.dumps({"prompt": {"message_id": "m", "role": "prompter",
                                                                   "text": "x"}, "message_tree_id": "t"}) + "\n")
    (tmp_path / "t.jsonl").write_bytes((tmp_path / "t.trees.jsonl").read_bytes())  # the name says nothing
    assert detect_shape(tmp_path / "t.jsonl") == detect_shape(tmp_path / "t.trees.jsonl") == "nested"


def test_a_signal_once_the_output_is_in_place_goes_to_the_previous_handler_and_keeps_the_output():
    from oasst_tools.output import Interrupted, signals_as_errors

    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(Interrupted) as err:
            with signals_as_errors():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler raises at the next bytecode; never reached
        assert str(err.value) == "interrupted by SIGTERM; nothing written" and received == []
        with signals_as_errors() as disarm:
            disarm()  # what `publish` calls once the renames are done
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []  # held while the build finishes
        assert received == [signal.SIGTERM]  # then the previous handler has it
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_signal_during_the_renames_waits_for_them_with_other_threads_running():
    """A signal mask held SIGINT off the main thread only: the kernel gave it to another thread, and Python raised
    KeyboardInterrupt in the main thread mid-renames anyway."""
    from oasst_tools.output import signals_held

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # as torch's or a reader's thread would be
    other.start()
    done: list[int] = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                for step in range(3):
                    if step == 1:
                        os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)  # where the handler would have raised
                    done.append(step)
        assert done == [0, 1, 2]
    finally:
        stop.set()
        other.join()


def test_trees_with_a_null_prompt_are_counted_and_said_not_lost_silently(run, tmp_path: Path):
    lines = gzip.decompress(NESTED.read_bytes()).splitlines()
    deleted = [json.dumps({"message_tree_id": f"gone-{i}", "tree_state": "ready_for_export", "prompt": None}).encode()
               for i in range(2)]
    (tmp_path / "in.trees.jsonl").write_bytes(b"\n".join([lines[0], deleted[0], lines[1], deleted[1]]) + b"\n")
    result = run("build", "--input", "in.trees.jsonl", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: dropped 2 tree(s) whose prompt is null (deleted in the export; first: in.trees.jsonl:2: tree " \
           "gone-0)" in result.stderr
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert (report["trees_read"], report["trees_without_prompt"]) == (2, 2)
    stats = run("stats", "in.trees.jsonl", "--json")
    assert json.loads(stats.stdout)["trees_without_prompt"] == 2
    # Only such trees: the error says so instead of blaming the filters.
    (tmp_path / "only.trees.jsonl").write_bytes(deleted[0] + b"\n")
    line = assert_refused(run("build", "--input", "only.trees.jsonl", "--out", "out2"))
    assert line == ("error: no rows selected: no tree was read from the input (1 tree(s) with a null prompt dropped: "
                    "see the warnings); nothing written")


def test_skip_mode_skips_a_tree_with_bad_emojis_in_stats_as_in_build(run, tmp_path: Path):
    rows = read_jsonl(FLAT)
    rows[1]["emojis"] = {"name": ["+1"], "count": 5}
    write_rows(tmp_path / "in.jsonl", rows)
    stats = run("stats", "in.jsonl", "--on-error", "skip", "--json")
    assert stats.exit_code == 0, stats.output
    assert "in.jsonl:2: field 'emojis.count'" in stats.stderr
    build = run("build", "--input", "in.jsonl", "--out", "out", "--on-error", "skip", "-q")
    assert build.exit_code == 0, build.output
    skipped = json.loads((tmp_path / "out" / "build_report.json").read_text())["skipped"]
    assert json.loads(stats.stdout)["skipped"] == skipped and sum(skipped.values()) == 1
