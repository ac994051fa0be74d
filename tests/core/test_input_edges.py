"""Inputs a field review of `oasst build` / `stats` / `show` found mishandled (2026-12-06), each through the CLI on
real fixture rows: splits of a save_to_disk DatasetDict, column types of parquet output, what a build that selects
nothing says, tree states, trees split over inputs, trailing gzip bytes, encodings, escape sequences, the folders
a failed build leaves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.core.conftest import FLAT, FLAT_FULL, NESTED, read_jsonl
from tests.hostile import assert_refused, assert_unchanged, snapshot


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(result_dir: Path) -> dict[str, int]:
    return json.loads((result_dir / "build_report.json").read_text())["rows"]


def test_a_save_to_disk_datasetdict_keeps_its_validation_split_as_test(run, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = read_jsonl(FLAT_FULL)
    trees = sorted({r["message_tree_id"] for r in rows})
    held = set(trees[:40])
    train = [r for r in rows if r["message_tree_id"] not in held]
    valid = [r for r in rows if r["message_tree_id"] in held]
    datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                         validation=datasets.Dataset.from_list(valid)).save_to_disk(str(tmp_path / "disk"))
    _write(tmp_path / "oasst-train.jsonl", train)
    _write(tmp_path / "oasst-validation.jsonl", valid)
    assert run("build", "--input", "disk", "--out", "from-disk", "-q").exit_code == 0
    assert run("build", "--input", "oasst-train.jsonl", "--input", "oasst-validation.jsonl", "--out", "from-files",
               "-q").exit_code == 0
    assert _rows(tmp_path / "from-disk") == _rows(tmp_path / "from-files")
    test_trees = {r["message_tree_id"] for r in read_jsonl(tmp_path / "from-disk" / "test.jsonl")}
    assert test_trees and test_trees <= held
    # A DatasetDict's own splits decide, whatever its folder's name says.
    datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                         validation=datasets.Dataset.from_list(valid)).save_to_disk(str(tmp_path / "oasst1-train"))
    assert run("build", "--input", "oasst1-train", "--out", "named", "-q").exit_code == 0
    assert _rows(tmp_path / "named") == _rows(tmp_path / "from-files")
    # One split saved alone, named by its folder: one split only, so everything is train (as for one file).
    datasets.Dataset.from_list(valid).save_to_disk(str(tmp_path / "validation"))
    assert run("build", "--input", "validation", "--out", "alone", "-q").exit_code == 0
    assert set(_rows(tmp_path / "alone")) == {"train"}


def test_parquet_output_types_each_column_from_every_row(run, tmp_path: Path) -> None:
    pl = pytest.importorskip("polars")
    trees = []
    for i in range(150):  # lang missing from the first 100 trees, text after: polars' default guess saw only nulls
        prompt = {"message_id": f"p{i}", "role": "prompter", "text": f"q{i}",
                  "replies": [{"message_id": f"a{i}", "role": "assistant", "text": f"r{i}"}]}
        if i >= 120:
            prompt["lang"] = "en"
        trees.append({"message_tree_id": f"T{i}", "tree_state": "ready_for_export", "prompt": prompt})
    _write(tmp_path / "mixed.trees.jsonl", trees)
    result = run("build", "--input", "mixed.trees.jsonl", "--file-format", "parquet", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(tmp_path / "out" / "train.parquet")
    assert frame.height == 150 and frame["lang"].null_count() == 120
    assert frame["lang"].drop_nulls().to_list() == ["en"] * 30


def test_a_build_that_selects_nothing_says_what_the_reader_dropped_first(run, tmp_path: Path) -> None:
    text = FLAT.read_text().replace('"parent_id": null', '"parent_id": ""')  # a CSV round trip's empty roots
    (tmp_path / "empty-parent.jsonl").write_text(text)
    before = snapshot(tmp_path)
    result = run("build", "--input", "empty-parent.jsonl", "--out", "out")
    error = assert_refused(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has an empty parent_id (a root's is null)" in warnings[0]
    assert error.startswith("error: no rows selected: no tree was read from the input (")
    assert "message(s) without their parent dropped: see the warnings" in error
    assert_unchanged(before, tmp_path)
    # Every record bad under --on-error skip: the skip count, not "filtered out".
    rows = read_jsonl(FLAT)
    for row in rows:
        row["rank"] = "first"
    _write(tmp_path / "bad.jsonl", rows)
    result = run("build", "--input", "bad.jsonl", "--on-error", "skip", "--out", "out2")
    error = assert_refused(result)
    assert "bad record(s) or tree(s) skipped: see the warnings" in error
    assert any("skipped" in line and "wrong_type" in line for line in result.stderr.splitlines())


def test_tree_states_are_checked_listed_with_commas_and_named_when_none_matches(run, tmp_path: Path) -> None:
    rows = read_jsonl(FLAT)
    first_tree = rows[0]["message_tree_id"]
    bad = [dict(r, tree_state=5) if r["message_tree_id"] == first_tree else r for r in rows]
    _write(tmp_path / "state-number.jsonl", bad)
    assert_refused(run("build", "--input", "state-number.jsonl", "--tree-state", "any", "--out", "a"),
                   names="state-number.jsonl:1: field 'tree_state' must be a string or null, got 5")
    members = [i for i, r in enumerate(rows) if r["message_tree_id"] == first_tree]
    split = [dict(r) for r in rows]
    split[members[1]]["tree_state"] = "growing"
    _write(tmp_path / "two-states.jsonl", split)
    assert_refused(run("build", "--input", "two-states.jsonl", "--out", "b"),
                   names=f"two-states.jsonl:{members[1] + 1}: tree {first_tree} has tree_state 'growing' here but "
                         "'ready_for_export' at line 1")
    mixed = [dict(r, tree_state="growing") if r["message_tree_id"] == first_tree else r for r in rows]
    _write(tmp_path / "mixed.jsonl", mixed)
    assert run("build", "--input", "mixed.jsonl", "--tree-state", "ready_for_export,growing", "--out", "c",
               "-q").exit_code == 0
    assert run("build", "--input", "mixed.jsonl", "--tree-state", "ready_for_export", "--tree-state", "growing",
               "--out", "d", "-q").exit_code == 0
    assert (tmp_path / "c" / "train.jsonl").read_bytes() == (tmp_path / "d" / "train.jsonl").read_bytes()
    assert first_tree in {r["message_tree_id"] for r in read_jsonl(tmp_path / "c" / "train.jsonl")}
    error = assert_refused(run("build", "--input", "mixed.jsonl", "--tree-state", "readyforexport", "--out", "e"))
    assert "no tree has tree_state readyforexport (seen: growing, ready_for_export)" in error


def _split_tree(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The fixture with one tree's deepest reply moved to a second file (per-language files of one export)."""
    rows = read_jsonl(FLAT)
    ids = {r["message_id"] for r in rows}
    parents = {r["parent_id"] for r in rows}
    leaf = next(r for r in rows if r["parent_id"] in ids and r["message_id"] not in parents
                and r["role"] == "prompter")
    _write(tmp_path / "part-en.jsonl", [r for r in rows if r is not leaf])
    _write(tmp_path / "part-es.jsonl", [leaf])
    return tmp_path / "part-en.jsonl", tmp_path / "part-es.jsonl", leaf


@pytest.mark.parametrize("order", ["parent first", "reply first"])
def test_a_tree_split_over_inputs_is_an_error_not_a_silent_loss(run, tmp_path: Path, order: str) -> None:
    en, es, leaf = _split_tree(tmp_path)
    inputs = [en.name, es.name] if order == "parent first" else [es.name, en.name]
    before = snapshot(tmp_path)
    error = assert_refused(run("build", "--input", inputs[0], "--input", inputs[1], "--out", "out"))
    assert (f"part-es.jsonl:1: message {leaf['message_id']}'s parent {leaf['parent_id']} is in tree "
            f"{leaf['message_tree_id']} at part-en.jsonl:") in error
    assert "split over inputs" in error
    assert_unchanged(before, tmp_path)
    # --on-error skip builds what it can and says the same as a warning.
    result = run("build", "--input", inputs[0], "--input", inputs[1], "--on-error", "skip", "--out", "out", "-q")
    assert result.exit_code == 0
    assert any("split over inputs" in line for line in result.stderr.splitlines())
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["skipped"] == {"split_tree": 1}
    # Joined in one input the tree is whole, and its thread can reach the moved reply.
    (tmp_path / "whole.jsonl").write_text(en.read_text() + es.read_text())
    assert run("build", "--input", "whole.jsonl", "--out", "whole", "-q").exit_code == 0


def test_stats_says_what_its_counts_leave_out(run, tmp_path: Path) -> None:
    result = run("stats", str(FLAT), "--json")
    assert result.exit_code == 0
    counts = json.loads(result.stdout)
    lines = sum(1 for line in FLAT.read_text().splitlines() if line.strip())
    assert counts["orphaned_messages"] == 1 and counts["messages"] + counts["orphaned_messages"] == lines
    assert counts["skipped"] == {} and counts["skipped_messages"] == 0
    assert result.stderr.startswith("warning: dropped 1 message(s) whose parent is missing")
    rows = read_jsonl(FLAT)
    rows[3]["rank"] = "0"
    _write(tmp_path / "one-bad.jsonl", rows)
    result = run("stats", "one-bad.jsonl", "--on-error", "skip", "--json")
    counts = json.loads(result.stdout)
    assert counts["skipped"] == {"wrong_type": 1} and counts["skipped_messages"] >= 1
    assert "skipped 1 bad wrong_type record(s)" in result.stderr


def test_escape_sequences_in_the_data_never_reach_the_terminal(run, tmp_path: Path) -> None:
    rows = read_jsonl(FLAT)
    tree = rows[0]["message_tree_id"]
    rows[0]["text"] = "hello \x1b[2J\x1b]0;pwned\x07 \u202eevil"
    rows[0]["lang"] = "en\x1b[31m"
    _write(tmp_path / "ansi.jsonl", rows)
    shown = run("show", "ansi.jsonl", tree, "--width", "200")
    assert shown.exit_code == 0
    assert "\x1b" not in shown.output and "\x07" not in shown.output and "\u202e" not in shown.output
    assert "hello \\x1b[2J\\x1b]0;pwned\\x07 \\u202eevil" in shown.stdout
    for argv in (["stats", "ansi.jsonl"], ["build", "--input", "ansi.jsonl", "--out", "out"]):
        result = run(*argv)
        assert result.exit_code == 0 and "\x1b" not in result.output, argv
    assert "en\\x1b[31m" in run("stats", "ansi.jsonl").stdout
    # Error lines too: a message id with an escape in a refused input.
    rows[1]["message_id"] = rows[2]["message_id"] = "dup\x1b[2J"
    _write(tmp_path / "dup.jsonl", rows)
    error = assert_refused(run("build", "--input", "dup.jsonl", "--out", "out2"))
    assert "dup\\x1b[2J" in error and "\x1b" not in error


def test_a_failed_build_leaves_no_folder_it_made(run, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    before = snapshot(tmp_path)
    assert_refused(run("build", "--input", "bad.jsonl", "--out", "new/a/b/out"), names="bad.jsonl:1")
    assert_unchanged(before, tmp_path)
    # A folder that was there stays, and a build that works keeps the folders it made.
    (tmp_path / "kept").mkdir()
    assert_refused(run("build", "--input", "bad.jsonl", "--out", "kept/x/out"))
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "x").exists()
    assert run("build", "--input", str(FLAT), "--out", "new/a/b/out", "-q").exit_code == 0
    assert (tmp_path / "new" / "a" / "b" / "out" / "train.jsonl").is_file()


@pytest.mark.parametrize("newline", [True, False])
@pytest.mark.parametrize("tail", [b"garbage!", b"this is trailing garbage after the gzip stream\n"])
def test_bytes_after_the_gzip_data_name_the_line_after_the_last_whole_one(run, tmp_path: Path, tail: bytes,
                                                                          newline: bool) -> None:
    data = FLAT.read_bytes() if newline else FLAT.read_bytes().rstrip(b"\n")  # a last line without its newline: whole
    lines = data.count(b"\n") + (0 if newline else 1)
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(data) + tail)
    error = assert_refused(run("build", "--input", "in.jsonl.gz", "--out", "out"))
    assert error == (f"error: in.jsonl.gz:{lines + 1}: bytes after the end of the gzip data start no gzip member "
                     "(trailing garbage); the lines before this one are whole")
    result = run("build", "--input", "in.jsonl.gz", "--on-error", "skip", "--out", "out", "-q")
    assert result.exit_code == 0
    assert result.stderr.endswith("the lines before this one are whole: ignored, every tree before it was built\n")
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 24  # every tree: the garbage cut none
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["messages_read"] == lines  # every message, the last one too


def test_encodings_and_shapes_that_are_not_json_lines(run, tmp_path: Path) -> None:
    # A UTF-8 byte order mark (Windows editors) is not part of the first record: flat and nested read as without.
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + FLAT.read_bytes())
    (tmp_path / "bom.trees.jsonl").write_bytes(b"\xef\xbb\xbf" + gzip.decompress(NESTED.read_bytes()))
    assert run("build", "--input", str(FLAT), "--out", "plain", "-q").exit_code == 0
    assert run("build", "--input", "bom.jsonl", "--out", "bom", "-q").exit_code == 0
    assert (tmp_path / "bom" / "train.jsonl").read_bytes() == (tmp_path / "plain" / "train.jsonl").read_bytes()
    assert run("build", "--input", "bom.trees.jsonl", "--out", "bom-nested", "-q").exit_code == 0
    rows = read_jsonl(FLAT)[:3]
    (tmp_path / "export.json").write_text(json.dumps(rows, indent=2))
    assert_refused(run("build", "--input", "export.json", "--out", "a"),
                   names="export.json:1: a JSON array, not JSON Lines (one object per line; convert with jq -c '.[]')")
    assert_refused(run("build", "--input", "", "--out", "b"), names="error: an input path is empty ('')")
    (tmp_path / "root.trees.jsonl").write_text(json.dumps({"message_tree_id": "T", "prompt": {
        "message_id": "a", "parent_id": "q", "role": "prompter", "text": "x"}}) + "\n")
    assert_refused(run("build", "--input", "root.trees.jsonl", "--out", "c"),
                   names="root.trees.jsonl:1: message a has parent_id q but is the root of tree T")


def test_numbers_and_labels_in_their_other_forms(run, tmp_path: Path) -> None:
    rows = read_jsonl(FLAT)
    assert run("build", "--input", str(FLAT), "--out", "plain", "-q").exit_code == 0
    # review_count as a float (pandas' nullable integers in parquet) and a null label in the {name: value} form.
    changed = [dict(r, review_count=float(r["review_count"])) if r.get("review_count") is not None else r
               for r in rows]
    changed[0] = dict(changed[0], labels={"toxicity": None})
    _write(tmp_path / "floats.jsonl", changed)
    assert run("build", "--input", "floats.jsonl", "--out", "floats", "-q").exit_code == 0
    assert (tmp_path / "floats" / "train.jsonl").read_bytes() == (tmp_path / "plain" / "train.jsonl").read_bytes()
    huge = [dict(r, rank=10**30) if r.get("rank") is not None else r for r in rows]
    _write(tmp_path / "huge.jsonl", huge)
    assert_refused(run("build", "--input", "huge.jsonl", "--pairs", "all", "--out", "a"),
                   names="field 'rank' must be a non-negative integer below 2^63, or null, got 1e+30")
    assert_refused(run("build", "--input", str(FLAT), "--label-max", "toxicity=0.1", "--label-max", "toxicity=0.9",
                       "--out", "b"), names="--label-max toxicity is given twice (0.1 and 0.9); give it once")


def test_an_output_name_near_the_file_system_limit_builds(run, tmp_path: Path) -> None:
    name = "o" * 250
    result = run("build", "--input", str(FLAT), "--out", name, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / name / "train.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp folder left beside it


@pytest.mark.parametrize(("damage", "expected"), [
    ("state-not-json", "{folder}/validation/state.json:2: not valid JSON (Expecting value)"),
    ("state-no-files", '{folder}/validation/state.json: its "_data_files" is not a list of data files'),
    ("arrow-missing", "{folder}/validation/state.json: lists data file data-00000-of-00001.arrow, which is missing"),
    ("split-missing", "{folder}: split folder validation is missing"),
    ("arrow-truncated", "{folder}/validation/data-00000-of-00001.arrow: not a complete Arrow file (Expected to be "
                        "able to read"),
    ("index-not-json", "{folder}/dataset_dict.json:1: not valid JSON (Expecting ',' delimiter)"),
    # Past the parser's recursion limit: the split-name probe read it before the reader did (a RecursionError).
    ("index-too-deep", "{folder}/dataset_dict.json: JSON nested too deeply"),
    ("state-too-deep", "{folder}/validation/state.json: JSON nested too deeply"),
])
def test_a_damaged_save_to_disk_folder_names_the_file_that_is_wrong(run, tmp_path: Path, damage: str,
                                                                     expected: str) -> None:
    # datasets says "Expecting value: line 2 column 1" or "'_data_files'" and names no file.
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "disk"
    datasets.DatasetDict(validation=datasets.Dataset.from_list(read_jsonl(FLAT)[:50])).save_to_disk(str(folder))
    split = folder / "validation"
    if damage == "state-not-json":
        (split / "state.json").write_text('{"_data_files": [\n')
    elif damage == "state-no-files":
        (split / "state.json").write_text('{"_split": "validation"}')
    elif damage == "arrow-missing":
        (split / "data-00000-of-00001.arrow").unlink()
    elif damage == "arrow-truncated":
        data = (split / "data-00000-of-00001.arrow").read_bytes()
        (split / "data-00000-of-00001.arrow").write_bytes(data[:len(data) // 2])
    elif damage == "split-missing":
        for path in split.iterdir():
            path.unlink()
        split.rmdir()
    elif damage.endswith("too-deep"):
        deep = '{"splits": ' * 100_000 + "1" + "}" * 100_000
        (folder / "dataset_dict.json" if damage.startswith("index") else split / "state.json").write_text(deep)
    else:
        (folder / "dataset_dict.json").write_text('{"splits": ["validation"]')
    before = snapshot(folder)
    result = run("build", "--input", str(folder), "--out", "out")
    assert assert_refused(result, names=str(folder)).startswith("error: " + expected.format(folder=folder))
    assert_unchanged(before, folder)
    assert not (tmp_path / "out").exists()


def test_a_dataset_saved_alone_with_a_too_deep_state_json_names_it(run, tmp_path: Path) -> None:
    """A lone `Dataset.save_to_disk` folder: the split it was loaded as is probed from state.json first."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "disk"
    datasets.Dataset.from_list(read_jsonl(FLAT)[:50]).save_to_disk(str(folder))
    (folder / "state.json").write_text('{"_split": ' * 100_000 + "1" + "}" * 100_000)
    before = snapshot(folder)
    result = run("build", "--input", str(folder), "--out", "out")
    assert assert_refused(result, names=str(folder)).startswith(f"error: {folder}/state.json: JSON nested too deeply")
    assert_unchanged(before, folder)
    assert not (tmp_path / "out").exists()


def test_an_empty_split_of_a_saved_dataset_dict_is_read_as_empty_and_the_missing_test_split_is_a_warning(
        run, tmp_path: Path) -> None:
    """datasets 5.2 saves a split with no rows but cannot load it back (an IndexError: 'cannot load dataset (list
    index out of range)'); the train split is built, and the test split the input promised is said to be empty."""
    datasets = pytest.importorskip("datasets")
    from oasst_tools.files import load_saved_dataset

    rows = datasets.Dataset.from_list(read_jsonl(FLAT))
    folder = tmp_path / "disk"
    datasets.DatasetDict(train=rows, validation=rows.select([])).save_to_disk(str(folder))
    loaded = load_saved_dataset(folder)
    assert (len(loaded["train"]), len(loaded["validation"])) == (len(rows), 0)
    assert loaded["validation"].features == rows.features
    before = snapshot(folder)
    result = run("build", "--input", str(folder), "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == ("warning: the input's validation and test split(s) gave no rows: no "
                                              "test split is written (test.jsonl; --test-size makes one)")
    assert {"train.jsonl", "test.jsonl"} & {p.name for p in (tmp_path / "out").iterdir()} == {"train.jsonl"}
    assert_unchanged(before, folder)
    # A dataset with no rows at all is an empty input, saved alone or as a dict of empty splits.
    rows.select([]).save_to_disk(str(tmp_path / "empty"))
    datasets.DatasetDict(train=rows.select([])).save_to_disk(str(tmp_path / "empty-dict"))
    for name, label in (("empty", "empty"), ("empty-dict", "empty-dict[train]")):
        result = run("build", "--input", str(tmp_path / name), "--out", "out2")
        assert assert_refused(result, names=name) == f"error: {tmp_path / label}: input has no messages"


@pytest.mark.parametrize(("test_size", "expected"), [
    ("0.9999999999", "--test-size 0.9999999999 put every selected tree in test: no train split is written "
                     "(train.jsonl; oasst train needs it)"),
    ("1e-9", "--test-size 1e-09 put none of the selected trees in test: no test split is written (test.jsonl; a "
             "larger --test-size makes one)"),
])
def test_a_test_size_that_empties_a_split_says_so(run, tmp_path: Path, test_size: str, expected: str) -> None:
    """Both splits were asked for; the build still writes what it selected (exit 0), and says which is missing."""
    result = run("build", "--input", str(FLAT), "--out", "out", "--test-size", test_size, "-q")
    assert result.exit_code == 0, result.output
    assert f"warning: {expected}" in result.stderr.splitlines()
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert ("train.jsonl" in files, "test.jsonl" in files) == ((False, True) if test_size.startswith("0.9") else
                                                               (True, False))
