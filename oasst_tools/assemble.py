"""Flat message records -> `RawTree`s: records grouped by `message_tree_id` (streamed while each tree's records are
contiguous, else held until the input ends with buffered=True), then each tree linked parent to child and checked:
one root, no parent cycles, roles alternating; subtrees whose parent is missing are dropped and counted.

`read.py` hands it the records of flat JSONL files, parquet files and `datasets` tables; `_check_roles` and
`subtree_records` also serve the nested reader (`nested.py`) and `filters.py`. Apart from `read.py`, which only
detects the shape and dispatches, because this is the larger half of the reading code. Hot: every message of a flat
input passes through `_group_flat`'s loop and `_assemble`'s walk.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from oasst_tools.errors import NotContiguousError, OasstInputError, os_input_error
from oasst_tools.jsonrecords import _JSONError, _not_an_object, _ParsedFile, gc_paused
from oasst_tools.rawtree import _CUT, OnError, RawTree, ReadReport
from oasst_tools.records import Item, index_tree, make_message, optional_str, required_str


@dataclass(slots=True)
class _Pending:
    """The records of one tree while it is being read from a flat input."""

    tree_id: str
    state: str | None
    records: list[tuple[int | None, str | None, dict[str, Any]]] = field(default_factory=list)
    state_line: int | None = None  # where the state was first given


def _tree_state(group: _Pending, state: Any, path: str, line: int | None) -> str:
    """The tree state a record gives its tree (the first given, a string); another one on a later record is an
    error, as a state that is no string is."""
    if type(state) is not str:
        optional_str({"tree_state": state}, "tree_state", path, line)  # raises: the usual message for a bad type
    if group.state is not None:
        raise OasstInputError(path, line, f"tree {group.tree_id} has tree_state {state!r} here but "
                              f"{group.state!r} at line {group.state_line}", reason="wrong_type")
    group.state_line = line
    return state


def _group_flat(
    records: Generator[tuple[int, dict[str, Any]], None, None] | _ParsedFile,
    path: str,
    split: str | None,
    on_error: OnError,
    report: ReadReport,
    buffered: bool,
) -> Iterator[RawTree]:
    """Group flat records by `message_tree_id` and assemble each group into a tree. `records` is a generator of
    validated objects, or a `_ParsedFile` whose C-level iteration stops at a line orjson refuses (then resumed)."""
    done: set[str] = set()
    pending: dict[str, _Pending] = {}
    current: _Pending | None = None
    seen_any = False
    rows = iter(records)
    # closing: a reader that stops early (an error, a retry) stops the thread inflating its input at once.
    with gc_paused(), closing(records):
        while True:
            try:
                for line, record in rows:
                    seen_any = True
                    tree_id = record.get("message_tree_id")
                    parent = record.get("parent_id", 0)
                    if type(tree_id) is not str or not tree_id or not (parent is None or type(parent) is str):
                        try:
                            required_str(record, "message_tree_id", path, line)
                            if "parent_id" not in record:  # the 0 above: 0, 0.0 and false are wrong types
                                raise OasstInputError(path, line, "missing required field 'parent_id'",
                                                      reason="missing_field")
                            optional_str(record, "parent_id", path, line)
                        except OasstInputError as err:
                            if on_error == "fail":
                                raise
                            report.skip(err)
                            continue
                    if current is None or current.tree_id != tree_id:
                        if tree_id in done:
                            raise NotContiguousError(
                                path, line, f"tree {tree_id} continues here after other trees; "
                                "this flat input is not grouped by tree (read it with buffered=True)",
                                reason="not_contiguous")
                        if not buffered and current is not None:
                            done.add(current.tree_id)
                            yield from _finish_flat(current, path, split, on_error, report)
                            del pending[current.tree_id]
                        current = pending.get(tree_id)
                        if current is None:
                            current = pending[tree_id] = _Pending(tree_id, None)
                    if (state := record.get("tree_state")) != current.state and state is not None:
                        try:
                            current.state = _tree_state(current, state, path, line)
                        except OasstInputError as err:
                            if on_error == "fail":
                                raise
                            report.skip(err)
                            continue
                    current.records.append((line, parent, record))
                break
            except _JSONError:  # a `_ParsedFile` stopped at a line orjson refused: that line, then line by line
                rows = records.resume()  # type: ignore[union-attr]
            except AttributeError:  # `.get` on a JSON value that is no object, from a `_ParsedFile`
                if type(record) is dict:
                    raise
                _not_an_object(record, path, line, on_error, report)  # raises, or counts it; the rows go on
            except OSError as exc:  # the disk or a network file system failed mid-read (a `_ParsedFile`)
                raise os_input_error(exc, path, None, "cannot read") from None
            except OasstInputError as err:
                if on_error == "fail" or err.reason not in _CUT:
                    raise
                # The stream ends at the cut: the tree being read may lack messages; it goes, counted with the cut.
                whole = err.reason == "trailing_gzip"
                lost = (pending.pop(current.tree_id) if current is not None and current.tree_id in pending and not whole
                        else None)
                report.skip(err, len(lost.records) if lost is not None else 0)
                seen_any = True
                break
        for group in pending.values():
            yield from _finish_flat(group, path, split, on_error, report)
    if not seen_any:
        skipped = f" ({sum(report.skipped.values())} bad record(s) skipped)" if report.skipped else ""
        raise OasstInputError(path, None, f"input has no messages{skipped}", reason="empty_input")


def _finish_flat(group: _Pending, path: str, split: str | None, on_error: OnError,
                 report: ReadReport) -> Iterator[RawTree]:
    try:
        tree = _assemble(group, path, split, report, on_error)
    except OasstInputError as err:
        if on_error == "fail":
            raise
        report.skip(err, len(group.records))
        return
    if tree is not None:
        report.trees += 1
        yield tree


def _assemble(group: _Pending, path: str, split: str | None, report: ReadReport,
              on_error: OnError = "fail") -> RawTree | None:
    """Link one tree's records parent to child; validate fields, ids, roots, cycles and role alternation."""
    index = index_tree(group.records)
    if index is None:
        _check_flat(group.records, path)  # raises the first bad field or repeated id; else some record is not plain
        index = index_tree(group.records, strict=False)
        assert index is not None
    by_id, children, flagged, plain, ordered, alternates = index
    roots = children.pop(None, [])
    if len(roots) > 1:
        second = roots[1]["message_id"]
        raise OasstInputError(path, by_id[second][0], f"tree {group.tree_id} has a second root message {second} "
                              f"(first root: {roots[0]['message_id']})", reason="multiple_roots")
    if ordered and alternates and roots:
        # Every message came after its parent and there is one root, so the root reaches every message (no
        # orphans, no cycles) and the input order is a parents-first order. Anything else takes the walk,
        # which also finds the first role break in its own order for the error.
        if on_error == "fail":
            report.ids.add(group.tree_id, by_id, group.records[0][0])
        else:
            report.claim(group.tree_id, by_id, group.records[0][0], on_error)
        report.messages += len(by_id)
        return RawTree(group.tree_id, group.state, split, path, roots[0]["message_id"], by_id, children, flagged,
                       plain)
    reached = 0
    # Messages whose parent is missing head orphaned subtrees: dropped and counted, not an error.
    orphan_heads = [kid for parent, kids in children.items() if parent not in by_id for kid in kids]
    for head in orphan_heads:
        size = len(subtree_records([head], children))
        reached += size
        line, parent, _ = by_id[head["message_id"]]
        report.orphan(parent, path, line, head["message_id"], size)
    # The root's subtree, depth first (as `subtree_records` walks it), in the same pass: the expected role of each
    # message (alternating from a prompter root) and, of the flagged records, those it keeps.
    records = {}
    dead = {record["message_id"] for record in flagged}
    kept: list[dict[str, Any]] = []
    alternates = True
    stack = [(roots[0], "prompter")] if roots else []
    while stack:
        record, role = stack.pop()
        node = record["message_id"]
        records[node] = by_id[node]
        if record["role"] != role:
            alternates = False
        if node in dead:
            kept.append(record)
        kids = children.get(node)
        if kids:
            stack.extend(zip(reversed(kids), repeat(_OTHER_ROLE[role])))
    reached += len(records)
    if reached < len(by_id):
        raise _cycle_error(by_id, children, roots + orphan_heads, path)
    if not alternates:
        _check_roles(records, children, path)  # raises the error for the first break, in its own order
    if not roots:
        report.messages += len(by_id)
        return None  # orphans only: nothing of it is used, so nothing to claim
    report.claim(group.tree_id, by_id, group.records[0][0], on_error)
    report.messages += len(by_id)
    return RawTree(group.tree_id, group.state, split, path, roots[0]["message_id"], records, children, kept, plain)


def _check_flat(items: list[Item], path: str) -> None:
    """Raise what `index_tree` refused in one flat tree: the first bad field (`make_message`) or repeated message id,
    in input order. Returns when every record is valid: then some record is valid only after conversion."""
    first: dict[str, int | None] = {}
    for line, _, record in items:
        make_message(record, path, line)
        message_id = record["message_id"]
        if message_id in first:
            raise OasstInputError(path, line, f"duplicate message_id {message_id} (first at line {first[message_id]})",
                                  reason="duplicate_id")
        first[message_id] = line


def subtree_records(heads: list[dict[str, Any]], children: Mapping[Any, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records of the subtrees under `heads`, depth first, parents before children."""
    order: list[dict[str, Any]] = []
    stack = list(reversed(heads))
    while stack:
        record = stack.pop()
        order.append(record)
        kids = children.get(record["message_id"])
        if kids:
            stack.extend(reversed(kids))
    return order


_OTHER_ROLE = {"prompter": "assistant", "assistant": "prompter"}


def _check_roles(records: dict[str, Item], children: Mapping[Any, list[dict[str, Any]]], path: str) -> None:
    """Roles alternate from a prompter root down: raise for the first message (in `records` order, then reply
    order) that breaks it. The readers call it only once their walk has seen a message off the alternation."""
    root_id = next(iter(records))
    line, _, root = records[root_id]
    if root["role"] != "prompter":
        raise OasstInputError(path, line, f"root message {root_id} has role '{root['role']}'; "
                              "a tree starts with a prompter message", reason="role_alternation")
    for node, (_, _, record) in records.items():
        kids = children.get(node)
        if kids:
            role = record["role"]
            for kid in kids:
                if kid["role"] == role:
                    kid_id = kid["message_id"]
                    raise OasstInputError(
                        path, records[kid_id][0], f"message {kid_id} is {_a(role)} reply to {_a(role)} message "
                        f"{node}; roles must alternate", reason="role_alternation")


def _cycle_error(by_id: dict[str, Item], children: Mapping[Any, list[dict[str, Any]]], heads: list[dict[str, Any]],
                 path: str) -> OasstInputError:
    """Name the cycle that kept some messages from being reached from a root or an orphan head."""
    reachable = {record["message_id"] for record in subtree_records(heads, children)}
    start = next(m for m in by_id if m not in reachable)
    chain = [start]
    while True:
        parent = by_id[chain[-1]][1]
        if parent in chain:
            chain = chain[chain.index(parent):] + [parent]
            break
        chain.append(parent)
    line = by_id[start][0]
    return OasstInputError(path, line, "parent cycle: " + " -> ".join(chain), reason="parent_cycle")


def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role
