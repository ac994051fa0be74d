"""`oasst build`, `oasst stats`, `oasst show` through the CLI: outputs, splits, reports and every failure path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.core.conftest import BROKEN, FLAT, FLAT_FULL, NESTED, NESTED_FULL, read_jsonl


def test_full_english_validation_file_gives_188_top_rank_rows(run, tmp_path: Path):
    result = run("build", "--input", FLAT_FULL, "--lang", "en", "--top-rank", "--out", "out")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 188
    assert len({r["message_tree_id"] for r in rows}) == 188
    assert f"warning: dropped 3 message(s) whose parent is missing, with their subtrees (first: " \
           f"{FLAT_FULL}:153: message 9caf0013-9ca1-44d2-bbee-2ad6f5e3c23a's parent 3aeb9373-da93-4858-84f4-5e398fe9e131 is not in its tree there)" in result.stderr
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["trees_read"] == 188 and report["messages_read"] == 2022 and report["orphaned_messages"] == 3
    assert report["dropped"] == {"deleted": 40, "spam": 43}
    assert report["rows"] == {"train": 188}
    row = rows[0]
    assert set(row) == {"text", "messages", "message_tree_id", "lang", "num_turns"}
    assert row["text"].startswith("### Human: ") and "### Assistant: " in row["text"]
    assert row["num_turns"] == len(row["messages"])
    assert [m["role"] for m in row["messages"]][:2] == ["user", "assistant"]
    assert "188" in result.stdout and "rows train" in result.stdout


def test_nested_export_gives_100_rows(run, tmp_path: Path):
    result = run("build", "--input", NESTED_FULL, "--lang", "en", "--top-rank", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 100


def test_output_loads_with_datasets_both_ways_and_has_a_card(run, tmp_path: Path):
    import datasets

    result = run("build", "--input", FLAT, "--test-size", "0.3", "--seed", "1", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    by_json = datasets.load_dataset("json", data_dir=str(tmp_path / "out"))
    by_dir = datasets.load_dataset(str(tmp_path / "out"))
    assert set(by_json) == set(by_dir) == {"train", "test"}
    assert by_dir["train"]["text"] == by_json["train"]["text"]
    train_trees = set(by_dir["train"]["message_tree_id"])
    assert not train_trees & set(by_dir["test"]["message_tree_id"])  # split by tree, never by row
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: apache-2.0" in card and "| test | en |" in card and "test_size=0.3" in card


def test_all_threads_keep_every_thread_of_a_tree_in_one_split(run, tmp_path: Path):
    result = run("build", "--input", FLAT, "--all-threads", "--test-size", "0.5", "--out", "out", "-q")
    assert result.exit_code == 0
    splits: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for row in read_jsonl(tmp_path / "out" / f"{split}.jsonl"):
            splits.setdefault(row["message_tree_id"], set()).add(split)
    assert all(len(s) == 1 for s in splits.values())
    assert sum(1 for _ in splits) == 24


def test_a_validation_split_in_the_input_becomes_test(run, tmp_path: Path):
    shutil.copy(NESTED, tmp_path / "oasst-train.trees.jsonl.gz")
    result = run("build", "--input", "oasst-train.trees.jsonl.gz", "--input", FLAT, "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 20
    assert len(read_jsonl(tmp_path / "out" / "test.jsonl")) == 24


def test_parquet_output(run, tmp_path: Path):
    import datasets

    result = run("build", "--input", NESTED, "--file-format", "parquet", "--out", "out", "-q")
    assert result.exit_code == 0
    ds = datasets.load_dataset(str(tmp_path / "out"))
    assert ds["train"].num_rows == 20 and ds["train"][0]["messages"][0]["role"] == "user"


def test_label_and_turn_options_reach_the_selection(run, tmp_path: Path):
    result = run("build", "--input", FLAT, "--all-threads", "--label-max", "toxicity=0.3", "--min-turns", "3",
                 "--max-turns", "4", "--end-with-assistant", "--out", "out", "-q")
    assert result.exit_code == 0
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert rows and all(3 <= r["num_turns"] <= 4 and r["messages"][-1]["role"] == "assistant" for r in rows)
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["dropped"]["label_max:toxicity"] > 0


def test_bad_label_limit_is_one_clear_line(run, tmp_path: Path):
    result = run("build", "--input", FLAT, "--label-max", "toxicity", "--out", "out")
    assert result.exit_code == 1
    assert result.stderr == "error: --label-max 'toxicity': expected NAME=NUMBER, e.g. --label-max toxicity=0.5\n"
    assert not (tmp_path / "out").exists()


BROKEN_CASES = {
    "malformed.jsonl": "3: invalid JSON (unexpected end of data: line 1 column 42 (char 41))",
    "truncated.jsonl.gz": "21: gzip file is truncated: the stream ends inside this line",
    "missing-field.jsonl": "4: missing required field 'role'",
    "wrong-type.jsonl": "2: field 'rank' must be a non-negative integer below 2^63, or null, got 'first'",
    "duplicate-id.jsonl": "7: duplicate message_id 384ad8e0-8fc2-4dfd-bf48-0c417f6c5f0f (first at line 3)",
    "cycle.jsonl": "2: parent cycle: 7d05acb7-9360-458c-8a1d-c0b6492b8f8a -> 384ad8e0-8fc2-4dfd-bf48-0c417f6c5f0f "
                   "-> 7d05acb7-9360-458c-8a1d-c0b6492b8f8a",
    "alternation.jsonl": "3: message 384ad8e0-8fc2-4dfd-bf48-0c417f6c5f0f is an assistant reply to an assistant "
                         "message 7d05acb7-9360-458c-8a1d-c0b6492b8f8a; roles must alternate",
    "unknown-role.jsonl": "5: message 63b876e6-1fcf-4f9f-bf68-17a6b600936d has unknown role 'system' "
                          "(expected 'prompter' or 'assistant')",
    "empty.jsonl": " input has no messages",
}


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_bad_input_fails_with_one_line_and_writes_nothing(run, tmp_path: Path, name: str):
    path = BROKEN / name
    result = run("build", "--input", path, "--out", "out")
    assert result.exit_code == 1
    assert result.stderr == f"error: {path}:{BROKEN_CASES[name]}\n"
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no output folder, no temp folder left behind


def test_a_missing_path_fails_with_one_line(run, tmp_path: Path):
    result = run("build", "--input", "no/such/file.jsonl", "--out", "out")
    assert (result.exit_code, result.stderr) == (1, "error: no/such/file.jsonl: no such file or directory\n")


def test_no_input_means_the_hub_and_offline_that_fails_suggesting_input(run, tmp_path: Path):
    result = run("build", "--out", "out")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot load OpenAssistant/oasst1 from the Hugging Face Hub (")
    assert result.stderr.rstrip().endswith("offline, pass --input PATH with a local export (.jsonl, .jsonl.gz, "
                                           ".parquet, .trees.jsonl.gz or a save_to_disk folder)")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_without_overwrite_and_after_a_failed_build(run, tmp_path: Path):
    assert run("build", "--input", NESTED, "--out", "out", "-q").exit_code == 0
    before = (tmp_path / "out" / "train.jsonl").read_bytes()
    result = run("build", "--input", FLAT, "--out", "out")
    assert (result.exit_code, result.stderr) == (1, "error: out: output folder exists; pass --overwrite to "
                                                    "replace it\n")
    result = run("build", "--input", BROKEN / "cycle.jsonl", "--out", "out", "--overwrite")
    assert result.exit_code == 1
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == before
    assert run("build", "--input", FLAT, "--out", "out", "--overwrite", "-q").exit_code == 0
    assert (tmp_path / "out" / "train.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_skip_mode_builds_every_good_tree_and_counts_bad_ones_by_reason(run, tmp_path: Path):
    lines = FLAT.read_text().splitlines()
    good = len(run("build", "--input", FLAT, "--out", "ref", "-q").exit_code == 0 and
               read_jsonl(tmp_path / "ref" / "train.jsonl"))
    first_tree = [json.loads(x) for x in lines[:4]]
    bad_rank = {**first_tree[1], "rank": "best"}
    lines[1] = json.dumps(bad_rank)  # a bad field: its whole tree is skipped
    lines.insert(30, "{oops")
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    assert run("build", "--input", "mixed.jsonl", "--out", "out").exit_code == 1
    result = run("build", "--input", "mixed.jsonl", "--out", "out", "--on-error", "skip")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"invalid_json": 1, "wrong_type": 1}
    assert report["skipped_first"]["wrong_type"] == ("mixed.jsonl:2: field 'rank' must be a non-negative integer below "
                                                     "2^63, or null, got 'best'")
    assert report["skipped_messages"] == 1 + 12  # the bad line, and the 12 messages of the first tree
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == good - 1
    assert "skipped: invalid_json" in result.stdout


def test_skip_mode_drops_a_tree_with_a_cycle_and_keeps_the_rest(run, tmp_path: Path):
    (tmp_path / "two.jsonl").write_text((BROKEN / "cycle.jsonl").read_text() + "".join(
        line + "\n" for line in FLAT.read_text().splitlines()[6:]))
    result = run("build", "--input", "two.jsonl", "--out", "out", "--on-error", "skip", "-q")
    assert result.exit_code == 0
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {"parent_cycle": 1}
    assert report["skipped_messages"] == 4 + 6  # the cycle file, and the rest of that tree from the sample
    assert report["rows"]["train"] == 23


def test_stats_counts_trees_messages_and_shapes(run):
    result = run("stats", NESTED_FULL, "--json")
    assert result.exit_code == 0
    stats = json.loads(result.stdout)
    assert stats["trees"] == 100 and stats["messages"] == 1167
    assert stats["states"] == {"ready_for_export": 100}
    assert stats["flags"]["synthetic"] == 22
    assert sum(stats["depths"].values()) == 100
    table = run("stats", FLAT)
    assert table.exit_code == 0 and "ready_for_export" in table.stdout and "branching" in table.stdout


def test_show_draws_one_tree_with_ranks_and_flags(run):
    result = run("show", FLAT, "5c6a0593-e4ab-41e8-a23d-8244294fc12a", "--width", "30")
    assert result.exit_code == 0
    for expected in ("rank 0", "rank 2", "deleted", "Pretend to be a", "★ assistant · rank 0"):
        assert expected in result.stdout
    missing = run("show", FLAT, "nope")
    assert (missing.exit_code, missing.stderr) == (1, f"error: {FLAT}: no tree with message_tree_id nope\n")
    reply = next(r for r in read_jsonl(FLAT) if r["parent_id"] is not None)  # a message id given for a tree id
    wrong = run("show", FLAT, reply["message_id"])
    assert (wrong.exit_code, wrong.stderr) == (1, f"error: {FLAT}: no tree with message_tree_id {reply['message_id']} "
                                                  f"({reply['message_id']} is a message of tree "
                                                  f"{reply['message_tree_id']}: show that tree)\n")


def test_stats_and_show_take_the_input_as_build_does(run):
    """`--input PATH` (build's name) or INPUT; two different inputs, or none, are usage errors."""
    tree = "5c6a0593-e4ab-41e8-a23d-8244294fc12a"
    assert run("stats", "--input", FLAT, "--json").stdout == run("stats", FLAT, "--json").stdout != ""
    assert run("stats", FLAT, "--input", str(FLAT), "--json").exit_code == 0  # the same file twice: fine
    drawn = run("show", FLAT, tree).stdout
    assert tree in drawn
    assert run("show", "--input", FLAT, tree).stdout == run("show", tree, "--input", FLAT).stdout == drawn
    for args, said in ((("stats", "--input", FLAT, NESTED), "two inputs given"),
                       (("stats",), "Missing argument 'INPUT' (or --input PATH)"),
                       (("show", "--input", FLAT), "Missing argument 'TREE_ID'"),
                       (("show", FLAT, tree, "--input", NESTED), "two inputs given")):
        result = run(*args)
        assert result.exit_code == 2 and said in result.stderr, args


def test_corrupt_gzip_fails_with_one_line_whichever_inflater_runs(run, tmp_path: Path):
    """isal (when installed) and zlib word the cause differently; the line, file and exit code are ours."""
    import gzip

    data = bytearray(gzip.compress(FLAT.read_bytes()))
    data[2000:2010] = b"\xff" * 10  # inside the first deflate block, in line 4 (zlib fed byte by byte stops there)
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    result = run("build", "--input", path, "--out", "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}:4: gzip data is corrupt (") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    ("--all-threads", "--lang", "en", "--label-max", "toxicity=0.3", "--label-min", "quality=0.1", "--min-turns", "3",
     "--max-turns", "4", "--end-with-assistant", "--no-synthetic", "--test-size", "0.25", "--seed", "7",
     "--file-format", "parquet"),
    ("--top-k", "2", "--lang-exact", "--lang", "en,de", "--tree-state", "any", "--label-max", "toxicity=0.25"),
    ("--pairs", "adjacent", "--lang", "en", "--test-size", "0.3", "--on-error", "skip"),
])
def test_the_recorded_command_rebuilds_the_same_dataset(run, tmp_path: Path, flags: tuple[str, ...]):
    import shlex

    from oasst_tools.cli import build as build_cli

    assert run("build", "--input", FLAT, *flags, "--out", "a", "-q").exit_code == 0
    first = json.loads((tmp_path / "a" / "build_report.json").read_text())
    # Settings are named as the flags are: `--label-max` is label_max, never Selection's internal names.
    flag_names = {opt.lstrip("-").replace("-", "_") for param in build_cli.build.params for opt in param.opts}
    assert set(first["settings"]) <= flag_names
    assert f"Built with: `{first['command']}`" in (tmp_path / "a" / "README.md").read_text()
    args = shlex.split(first["command"])
    assert args[:2] == ["oasst", "build"] and args[args.index("--out") + 1] == "a"
    args[args.index("--out") + 1] = "b"
    again = run(*args[1:], "-q")
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "b" / "build_report.json").read_text())
    assert {**first["settings"], "out": "b"} == second["settings"]
    assert first["rows"] == second["rows"] and first["dropped"] == second["dropped"] and first["rows"]
    written = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".jsonl", ".parquet"))
    assert written == sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix in (".jsonl", ".parquet"))
    for name in written:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_format_is_the_old_name_of_file_format(run, tmp_path: Path):
    old = run("build", "--input", NESTED, "--format", "parquet", "--out", "old", "-q")
    assert old.exit_code == 0
    assert "warning: oasst build --format is now --file-format" in old.stderr
    assert (tmp_path / "old" / "train.parquet").is_file()
    assert json.loads((tmp_path / "old" / "build_report.json").read_text())["settings"]["file_format"] == "parquet"
    same = run("build", "--input", NESTED, "--format", "jsonl", "--file-format", "jsonl", "--out", "same", "-q")
    assert same.exit_code == 0 and (tmp_path / "same" / "train.jsonl").is_file()
    clash = run("build", "--input", NESTED, "--format", "parquet", "--file-format", "jsonl", "--out", "clash")
    assert clash.exit_code == 2 and "--file-format jsonl and --format parquet disagree" in clash.stderr
    assert not (tmp_path / "clash").exists()
    assert "--file-format" in run("build", "--help").stdout and "--format " not in run("build", "--help").stdout


# Core options with nothing to show as a default: where the help text itself says what happens without them (the
# input's hub default, every language, the thread mode that is the default) or there is no value (no label limit,
# no turn limit, no test split unless the inputs carry one).
CORE_NO_DEFAULT = {"inputs", "source_flag", "langs", "top_rank", "all_threads", "top_k", "pairs", "label_max", "label_min",
                   "max_turns", "test_size"}


def test_core_help_shows_the_default_of_every_option_that_has_one() -> None:
    """As train's and eval's --help do (tests/train/test_vocabulary.py): an on/off flag reads `[default: off]`."""
    import click

    from oasst_tools.cli.build import build
    from oasst_tools.cli.inspect import show, stats

    for name, command in (("build", build), ("stats", stats), ("show", show)):
        ctx = click.Context(command, info_name=name)
        missing = []
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden or param.name == "help":
                continue
            record = param.get_help_record(ctx)
            assert record is not None
            if "[default: " not in record[1] and "[required]" not in record[1] and param.name not in CORE_NO_DEFAULT:
                missing.append(record[0])
            assert "default: (" not in record[1], record  # click's parentheses around a word are dropped
        assert missing == [], f"oasst {name} --help shows no default for {missing}"
