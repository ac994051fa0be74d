"""The flat reader's parents-first shortcut: any file order gives the same trees, selections and errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from oasst_tools.errors import OasstInputError
from oasst_tools.filters import Selection, best_raw_thread, select_threads
from oasst_tools.read import iter_raw_trees, read_trees
from tests.core.conftest import FLAT, read_jsonl
from tests.core.test_read import as_messages


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _by_tree(rows: list[dict]) -> dict[str, list[dict]]:
    trees: dict[str, list[dict]] = {}
    for row in rows:
        trees.setdefault(row["message_tree_id"], []).append(row)
    return trees


def _selections(path: Path) -> tuple[list[list[str]], Counter[str]]:
    dropped: Counter[str] = Counter()
    threads = []
    for raw in iter_raw_trees(path):
        thread = best_raw_thread(raw, Selection(), dropped)
        threads.append([r["message_id"] for r in thread or ()])
        slow = list(select_threads(raw.to_tree(), Selection()))
        assert threads[-1] == [m.message_id for t in slow for m in t]
    return threads, dropped


@pytest.mark.parametrize("order", ["reversed", "breadth_first"])
def test_a_flat_tree_read_in_another_order_gives_the_same_trees_threads_and_drop_counts(tmp_path: Path, order: str):
    trees = _by_tree(read_jsonl(FLAT))
    rows = []
    for records in trees.values():
        if order == "reversed":  # every reply before its parent: the reader must walk the tree
            rows.extend(reversed(records))
        else:  # parents first, but not depth first
            depth = {}
            for r in records:
                depth[r["message_id"]] = 0 if r["parent_id"] is None else depth.get(r["parent_id"], 0) + 1
            rows.extend(sorted(records, key=lambda r: depth[r["message_id"]]))
    other = _write(tmp_path / f"{order}.jsonl", rows)
    same = _write(tmp_path / "same.jsonl", [r for records in trees.values() for r in records])
    assert as_messages(read_trees(other)) == as_messages(read_trees(same))
    assert _selections(other) == _selections(same)


def _message(mid: str, parent: str | None, role: str) -> dict:
    return {"message_id": mid, "parent_id": parent, "message_tree_id": "t", "role": role, "text": mid}


def test_the_first_role_break_is_reported_in_depth_first_order_of_parents_in_any_file_order(tmp_path: Path):
    # p -> a1 -> (p2 -> x, b): x breaks the alternation first in the file, but b is the first break found
    # looking at the replies of each message in depth-first order, which is the order errors are reported in.
    rows = [_message("p", None, "prompter"), _message("a1", "p", "assistant"), _message("p2", "a1", "prompter"),
            _message("x", "p2", "prompter"), _message("b", "a1", "assistant")]
    expected = "message b is an assistant reply to an assistant message a1; roles must alternate"
    for name, order in (("depth-first", rows), ("reversed", rows[::-1])):
        path = _write(tmp_path / f"{name}.jsonl", order)
        with pytest.raises(OasstInputError) as caught:
            list(read_trees(path))
        line = 1 + order.index(rows[4])
        assert str(caught.value) == f"{path}:{line}: {expected}"
    nested = {"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p", "role": "prompter", "text": "p", "replies": [
            {"message_id": "a1", "role": "assistant", "text": "a1", "replies": [
                {"message_id": "p2", "role": "prompter", "text": "p2", "replies": [
                    {"message_id": "x", "role": "prompter", "text": "x"}]},
                {"message_id": "b", "role": "assistant", "text": "b"}]}]}}
    path = tmp_path / "t.trees.jsonl"
    path.write_text(json.dumps(nested) + "\n")
    with pytest.raises(OasstInputError) as caught:
        list(read_trees(path))
    assert str(caught.value) == f"{path}:1: {expected}"


def test_a_root_that_is_not_a_prompter_is_reported_before_any_reply(tmp_path: Path):
    rows = [_message("a", None, "assistant"), _message("b", "a", "assistant")]
    path = _write(tmp_path / "root.jsonl", rows)
    with pytest.raises(OasstInputError) as caught:
        list(read_trees(path))
    assert str(caught.value) == (f"{path}:1: root message a has role 'assistant'; a tree starts with a prompter "
                                 "message")


def test_a_message_that_is_its_own_parent_is_a_parent_cycle(tmp_path: Path):
    rows = [_message("p", None, "prompter"), _message("m", "m", "assistant")]
    path = _write(tmp_path / "self.jsonl", rows)
    with pytest.raises(OasstInputError) as caught:
        list(read_trees(path))
    assert str(caught.value) == f"{path}:2: parent cycle: m -> m"
