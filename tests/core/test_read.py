"""Readers: every input shape gives the same validated trees; labels are normalized; streaming holds."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from oasst_tools.errors import NotContiguousError, OasstInputError
from oasst_tools.read import ReadReport, detect_shape, read_trees, split_of
from oasst_tools.walk import iter_messages
from tests.core.conftest import FLAT, FLAT_FULL, NESTED, NESTED_FULL, raw_records, read_jsonl


def test_flat_full_validation_file_has_188_complete_trees_and_3_orphans():
    report = ReadReport()
    trees = list(read_trees(FLAT_FULL, report=report))
    assert len(trees) == 188
    assert report.messages == 2022
    assert report.orphaned == 3
    assert report.orphaned_first == f"{FLAT_FULL}:153: message 9caf0013-9ca1-44d2-bbee-2ad6f5e3c23a's parent 3aeb9373-da93-4858-84f4-5e398fe9e131 is not in its tree there"
    assert {t.split for t in trees} == {"validation"}
    assert sum(1 for t in trees for _ in iter_messages(t.prompt)) == 2022 - 3


def test_nested_file_has_100_trees_and_1167_messages():
    report = ReadReport()
    trees = list(read_trees(NESTED_FULL, report=report))
    assert len(trees) == 100 and report.messages == 1167
    assert sum(1 for t in trees for m in iter_messages(t.prompt) if m.synthetic) == 22


def test_flat_message_fields_match_the_raw_record():
    raw = raw_records(FLAT)
    tree = next(iter(read_trees(FLAT)))
    for message in iter_messages(tree.prompt):
        record = raw[message.message_id]
        assert message.text == record["text"]
        assert message.rank == record["rank"]
        assert message.parent_id == record["parent_id"]
        assert message.deleted == record["deleted"]
        assert message.review_result == record["review_result"]
        # Columnar HF labels become {name: value}
        assert dict(message.labels) == dict(zip(record["labels"]["name"], record["labels"]["value"]))
        emojis = record["emojis"] or {"name": [], "count": []}
        assert dict(message.emojis) == dict(zip(emojis["name"], emojis["count"]))
        # Unknown-to-the-schema fields are kept, not interpreted
        assert message.extra["user_id"] == record["user_id"]
        assert message.extra["detoxify"] == record["detoxify"]
        assert sorted(c.message_id for c in message.replies) == sorted(
            r["message_id"] for r in raw.values() if r["parent_id"] == message.message_id)


def test_nested_labels_in_dict_form_are_normalized_and_unknown_fields_tolerated(tmp_path: Path):
    tree = {
        "message_tree_id": "t1", "tree_state": "ready_for_export", "origin": "oasst2", "events": {"x": 1},
        "prompt": {
            "message_id": "t1", "role": "prompter", "text": "hi", "lang": "de", "new_field": [1, 2],
            "labels": {"toxicity": {"value": 0.25, "count": 4}, "quality": {"value": 0.75, "count": 4}},
            "replies": [{"message_id": "a", "parent_id": "t1", "role": "assistant", "text": "hallo", "rank": 0}],
        },
    }
    path = tmp_path / "x.trees.jsonl"
    path.write_text(json.dumps(tree) + "\n")
    (got,) = read_trees(path)
    assert dict(got.prompt.labels) == {"toxicity": 0.25, "quality": 0.75}
    assert got.prompt.extra == {"new_field": [1, 2]}
    assert got.extra == {"origin": "oasst2", "events": {"x": 1}}
    assert got.lang == "de" and got.prompt.replies[0].parent_id == "t1"


def flat_from_trees(trees_path: Path, out: Path) -> None:
    """Write a nested export flat, HF style (columnar labels, tree fields on every message)."""
    with out.open("w") as fh:
        for line in gzip.open(trees_path, "rt") if trees_path.suffix == ".gz" else open(trees_path):
            tree = json.loads(line)
            stack = [(tree["prompt"], None)]
            while stack:
                node, parent = stack.pop(0)
                record = {k: v for k, v in node.items() if k != "replies"}
                record["parent_id"] = parent
                record["message_tree_id"] = tree["message_tree_id"]
                record["tree_state"] = tree["tree_state"]
                if "emojis" in record:
                    record["emojis"] = {"name": list(record["emojis"]), "count": list(record["emojis"].values())}
                fh.write(json.dumps(record) + "\n")
                stack.extend((r, node["message_id"]) for r in node.get("replies", []))


def test_flat_and_nested_readers_give_the_same_trees(tmp_path: Path):
    flat = tmp_path / "same.jsonl"
    flat_from_trees(NESTED, flat)
    assert list(read_trees(flat)) == list(read_trees(NESTED))


def test_parquet_and_save_to_disk_inputs_give_the_same_trees_as_jsonl(tmp_path: Path):
    import datasets
    import polars as pl

    rows = read_jsonl(FLAT)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    frame.write_parquet(tmp_path / "validation.parquet")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "disk")
    expected = list(read_trees(FLAT))
    assert detect_shape(tmp_path / "validation.parquet") == "parquet"
    assert list(read_trees(tmp_path / "validation.parquet")) == expected
    assert detect_shape(tmp_path / "disk") == "disk"
    from_disk = list(read_trees(tmp_path / "disk"))
    assert from_disk == expected
    assert {t.split for t in from_disk} == {"validation"}


def test_interleaved_flat_file_is_refused_when_streaming_and_read_when_buffered(tmp_path: Path):
    rows = read_jsonl(FLAT)
    random.Random(0).shuffle(rows)
    path = tmp_path / "shuffled-validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(NotContiguousError):
        list(read_trees(path))
    # Replies keep input order, so compare message by message with children as sets.
    assert as_messages(read_trees(path, buffered=True)) == as_messages(read_trees(FLAT))


def as_messages(trees) -> dict:
    """message_id -> (the message without replies, its reply ids as a set), for order-free comparison."""
    from dataclasses import replace

    return {m.message_id: (replace(m, replies=()), {r.message_id for r in m.replies})
            for t in trees for m in iter_messages(t.prompt)}


def test_gzipped_flat_file_reads_like_the_plain_one(tmp_path: Path):
    path = tmp_path / "validation.jsonl.gz"
    path.write_bytes(gzip.compress(FLAT.read_bytes()))
    assert list(read_trees(path)) == list(read_trees(FLAT))


def test_a_missing_path_and_a_hub_id_are_told_apart():
    with pytest.raises(OasstInputError, match="no such file or directory"):
        detect_shape("nope/missing.jsonl")
    assert detect_shape("OpenAssistant/oasst1") == "hub"


@pytest.mark.parametrize("name,split", [("validation-en.messages.jsonl", "validation"),
                                         ("2023-04-12_oasst_ready.trees.jsonl.gz", None),
                                         ("oasst1-train.jsonl.gz", "train"), ("x_valid.parquet", "validation"),
                                         ("contest.jsonl", None)])
def test_split_is_read_from_the_file_name(name: str, split: str | None):
    assert split_of(name) == split


def test_skip_mode_counts_bad_records_and_keeps_good_trees(tmp_path: Path):
    lines = FLAT.read_text().splitlines()
    lines[5] = "{not json"
    path = tmp_path / "bad-validation.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ReadReport()
    trees = list(read_trees(path, on_error="skip", report=report))
    assert report.skipped["invalid_json"] == 1
    assert report.skipped_first["invalid_json"].startswith(f"{path}:6: invalid JSON")
    assert len(trees) == len(list(read_trees(FLAT)))
