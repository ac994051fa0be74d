"""Nested tree exports (`*.trees.jsonl[.gz]`, OASST1 and OASST2, one tree per line) -> `RawTree`s, tree by tree.

Each tree's messages are flattened depth first (`_nested_items`) and indexed by `records.index_tree`, as flat
records are; only when that refuses a tree does `_nested_records` walk it again message by message, to raise the
first error in order or mend a reply without `parent_id`. Apart from `read.py`, which detects the shape and calls
`_read_nested`, as the flat reader (`assemble.py`) is: the two share only the role check (`assemble._check_roles`),
`RawTree` and `ReadReport` (`rawtree.py`) and the JSON parsing (`jsonrecords.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from itertools import repeat
from typing import Any

from oasst_tools.assemble import _check_roles
from oasst_tools.errors import OasstInputError, kind, shown
from oasst_tools.jsonrecords import _json_records, gc_paused
from oasst_tools.lines import Progress, Source
from oasst_tools.rawtree import _CUT, OnError, RawTree, ReadReport, split_of
from oasst_tools.records import DICT_ONLY, Item, index_tree, make_message, optional_str, required_str


def _read_nested(src: Source, on_error: OnError, report: ReadReport,
                 progress: Progress | None) -> Iterator[RawTree]:
    spath = src.name
    split = split_of(spath)
    seen_any = False
    records = _json_records(src, on_error, report, progress)
    with gc_paused(), closing(records):
        try:
            for line, record in records:
                seen_any = True
                try:
                    tree = _nested_tree(record, spath, line, split, report, on_error)
                except OasstInputError as err:
                    if on_error == "fail":
                        raise
                    report.skip(err, messages=0)  # the messages of a broken nested tree cannot be counted reliably
                    continue
                if tree is not None:
                    report.trees += 1
                    yield tree
        except OasstInputError as err:
            if on_error == "fail" or err.reason not in _CUT:
                raise
            report.skip(err, messages=0)  # one tree per line: the trees before the cut are whole
            seen_any = True
    if not seen_any:
        raise OasstInputError(spath, None, "input has no trees", reason="empty_input")


_TREE_FIELDS = frozenset(("message_tree_id", "tree_state", "prompt"))


def _nested_tree(record: dict[str, Any], path: str, line: int, split: str | None,
                 report: ReadReport, on_error: OnError = "fail") -> RawTree | None:
    tree_id = record.get("message_tree_id")
    state = record.get("tree_state")
    # The checks' usual outcome without a call each (one tree per line: these run for every tree).
    if type(tree_id) is not str or not tree_id:
        tree_id = required_str(record, "message_tree_id", path, line)
    if state is not None and type(state) is not str:
        state = optional_str(record, "tree_state", path, line)
    prompt = record.get("prompt")
    if prompt is None:
        if "prompt" not in record:
            raise OasstInputError(path, line, "missing required field 'prompt'", reason="missing_field")
        # OASST2 exports trees whose prompt was deleted as `"prompt": null`: counted, said once, not an error.
        report.without_prompt += 1
        if report.without_prompt_first is None:
            report.without_prompt_first = f"{path}:{line}: tree {tree_id}"
        return None
    if type(prompt) is not dict:
        raise OasstInputError(path, line, f"field 'prompt' must be an object, got {kind(prompt)}",
                              reason="wrong_type")
    extra = {k: v for k, v in record.items() if k not in _TREE_FIELDS} if len(record) > 3 else {}
    items = _nested_items(prompt, tree_id, line)
    index = index_tree(items) if items is not None else None
    if index is None:
        index = index_tree(_nested_records(prompt, tree_id, path, line), strict=False)
        assert index is not None
    records, children, flagged, plain, _, alternates = index
    del children[None]  # the root (every item but the root has its parent before it: ordered)
    if not alternates:
        _check_roles(records, children, path)  # raises the error for the first break, in its own order
    if on_error == "fail":
        report.ids.add(tree_id, records, line)
    else:
        report.claim(tree_id, records, line, on_error)
    report.messages += len(records)
    return RawTree(tree_id, state, split, path, prompt["message_id"], records, children, flagged, plain, extra)


def _nested_items(prompt: dict[str, Any], tree_id: str, line: int) -> list[Item] | None:
    """One nested tree's messages as (line, parent id, record), depth first, for `index_tree`; None when a reply
    names another parent in `parent_id` (or none) or another tree in `message_tree_id`, or `replies` is not a list
    of objects: `_nested_records` then raises the first error in its order, or mends a missing `parent_id`."""
    items: list[Item] = []
    stack: list[Item] = [(line, None, prompt)]
    while stack:
        item = stack.pop()
        items.append(item)
        node = item[2]
        g = node.get
        if g("parent_id") != item[1] or ((tree := g("message_tree_id")) is not None and tree != tree_id):
            return None
        replies = g("replies")
        if replies:
            # map(type, ...) stays in C: this loop visits every message of the input.
            if type(replies) is not list or not DICT_ONLY.issuperset(map(type, replies)):
                return None
            stack.extend(zip(repeat(line), repeat(g("message_id")), reversed(replies)))
        elif replies is not None and type(replies) is not list:  # false, 0, "" or {}: not "no replies"
            return None
    return items


def _nested_records(prompt: dict[str, Any], tree_id: str, path: str, line: int) -> list[Item]:
    """`_nested_items` message by message: each record validated (`make_message`), its id unique, its `parent_id`
    its parent's, raising the first error in depth-first order. Exports omit `parent_id` on the root only, but a
    reply without one is read as its parent's (a copy of the record says so)."""
    items: list[Item] = []
    seen: set[str] = set()
    stack: list[tuple[dict[str, Any], str | None]] = [(prompt, None)]
    while stack:
        node, parent = stack.pop()
        make_message(node, path, line)
        message_id = node["message_id"]
        if message_id in seen:
            raise OasstInputError(path, line, f"duplicate message_id {message_id} in tree {tree_id}",
                                  reason="duplicate_id")
        seen.add(message_id)
        tree = node.get("message_tree_id")
        if tree is not None and tree != tree_id:  # a message of another tree pasted into this one
            raise OasstInputError(path, line, f"message {message_id} has message_tree_id {shown(tree)} but is in "
                                  f"tree {tree_id}", reason="tree_mismatch")
        declared = node.get("parent_id")
        if declared != parent:
            if declared is not None or "parent_id" in node and parent is None:
                where = f"a reply of {parent}" if parent is not None else f"the root of tree {tree_id}"
                raise OasstInputError(path, line, f"message {message_id} has parent_id {declared} but is {where}",
                                      reason="parent_mismatch")
            node = {**node, "parent_id": parent}
        items.append((line, parent, node))
        replies = node.get("replies")
        if replies is not None:
            if type(replies) is not list or not DICT_ONLY.issuperset(map(type, replies)):
                raise OasstInputError(path, line, f"field 'replies' of message {message_id} must be a list of "
                                      "objects", reason="wrong_type")
            stack.extend(zip(reversed(replies), repeat(message_id)))
    return items
