"""Read OASST exports into `Tree`s, one tree at a time.

Shapes, detected automatically:
- flat messages, one per line (`.jsonl`, `.jsonl.gz`), as parquet, as a `datasets.save_to_disk` folder, or as a
  hub id such as `OpenAssistant/oasst1` (online only);
- nested tree exports (`*.trees.jsonl[.gz]`, OASST1 and OASST2), one tree per line.

Nested files stream tree by tree, so memory does not grow with the number of trees. Flat exports are written
with each tree contiguous, so they stream too; an interleaved file raises `NotContiguousError`, and
`read_trees(..., buffered=True)` groups it in memory instead.
"""

from __future__ import annotations

import gc
import re
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Literal

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSONError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # orjson is a core dependency, but the walker must work with the standard library alone
    import json

    _loads = json.loads
    _JSONError = json.JSONDecodeError

from oasst_tools.errors import NotContiguousError, OasstError, OasstInputError
from oasst_tools.lines import Progress, iter_lines
from oasst_tools.records import make_message, optional_str, required_str
from oasst_tools.schema import ROLES, Message, Tree

OnError = Literal["fail", "skip"]
Shape = Literal["flat", "nested", "parquet", "disk", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_WORDS = (("validation", "validation"), ("valid", "validation"), ("test", "test"), ("train", "train"))


@dataclass
class ReadReport:
    """What the readers saw: counts of trees and messages, and what was dropped or skipped, by reason."""

    trees: int = 0
    messages: int = 0
    # Bad records or trees skipped with on_error="skip": one count per record or tree, by reason. A bad field
    # found while assembling a tree skips that whole tree; `skipped_messages` counts every message lost.
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_first: dict[str, str] = field(default_factory=dict)
    skipped_messages: int = 0
    # Messages whose parent is not in the input, dropped with their subtrees (not an error).
    orphaned: int = 0
    orphaned_first: str | None = None

    def skip(self, exc: OasstInputError, messages: int = 1) -> None:
        """Count one skipped record or tree (of `messages` messages) under the error's reason."""
        self.skipped[exc.reason] += 1
        self.skipped_messages += messages
        self.skipped_first.setdefault(exc.reason, str(exc))


def split_of(name: str) -> str | None:
    """The split a file name announces (`validation-en.messages.jsonl` -> validation), or None."""
    stem = Path(name).name.lower()
    for word, split in _SPLIT_WORDS:
        if re.search(rf"(^|[^a-z]){word}([^a-z]|$)", stem):
            return split
    return None


def detect_shape(source: str | Path) -> Shape:
    """Which reader handles `source`: a file's suffix and first record decide; a missing `owner/name` is a hub id."""
    path = Path(source)
    if not path.exists():
        if _HUB_ID.match(str(source)) and not str(source).endswith((".jsonl", ".gz", ".parquet", ".json")):
            return "hub"
        raise OasstInputError(source, None, "no such file or directory", reason="missing_path")
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "disk"
        raise OasstInputError(source, None, "is a folder but not a `datasets.save_to_disk` folder", reason="bad_path")
    if path.suffix == ".parquet":
        return "parquet"
    if ".trees." in path.name:
        return "nested"
    for _, raw in iter_lines(path):
        if raw.strip():
            return "nested" if b'"prompt"' in raw and b'"message_tree_id"' in raw[:200] + raw[-200:] else "flat"
    return "flat"


def read_trees(
    source: str | Path,
    *,
    on_error: OnError = "fail",
    report: ReadReport | None = None,
    progress: Progress | None = None,
    buffered: bool = False,
) -> Iterator[Tree]:
    """Every tree of one input (file, folder or hub id), validated; bad input raises `OasstInputError`."""
    raws = iter_raw_trees(source, on_error=on_error, report=report, progress=progress, buffered=buffered)
    return (raw.to_tree() for raw in raws)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsed records hold no cycles, and its scans dominate parse time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _json_records(
    path: Path, on_error: OnError, report: ReadReport, progress: Progress | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for every non-blank line; malformed JSON raises or is skipped and counted."""
    spath = str(path)
    lines = iter_lines(path, progress, ahead=True)
    with closing(lines):  # on an error here, stop the inflating thread now, not when the traceback goes
        for number, raw in lines:
            try:
                record = _loads(raw)
            except _JSONError as exc:
                if not raw.strip():
                    continue
                try:  # parse again without the line end, so the message points into the line itself
                    _loads(raw.rstrip(b"\r\n"))
                except _JSONError as bare:
                    exc = bare
                err = OasstInputError(spath, number, f"invalid JSON ({_short(exc)})", reason="invalid_json")
                if on_error == "fail":
                    raise err from None
                report.skip(err)
                continue
            if type(record) is not dict:
                err = OasstInputError(spath, number, f"expected a JSON object, got {type(record).__name__}",
                                      reason="wrong_type")
                if on_error == "fail":
                    raise err
                report.skip(err)
                continue
            yield number, record


def _short(exc: Exception) -> str:
    text = str(exc).split("\n")[0]
    return text if len(text) < 80 else text[:77] + "..."


def _parquet_records(path: Path, progress: Progress | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import polars as pl  # late: only parquet input needs it

    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several unrelated types for a bad file
        raise OasstInputError(path, None, f"cannot read parquet ({_short(exc)})", reason="bad_parquet") from None
    if progress is not None:
        progress(path.stat().st_size)
    for number, row in enumerate(frame.iter_rows(named=True), start=1):
        yield number, row


# ----------------------------------------------------------------------------------------- flat -> trees


@dataclass(slots=True)
class RawTree:
    """One validated tree as its raw records: what `read_trees` turns into `Message`s, and what the
    build's fast path selects from directly (constructing 90k frozen messages costs more than parsing them)."""

    tree_id: str
    state: str | None
    split: str | None
    source: str
    root: str
    # message_id -> (line, record), parents before children; only the root's subtree (orphans removed).
    # None for a nested tree until `linked()` builds it: the top-rank selection walks `prompt` instead.
    records: dict[str, tuple[int | None, dict[str, Any]]] | None
    # message_id -> reply ids in input order (messages without replies are absent); None with `records`.
    children: dict[str, list[str]] | None
    extra: dict[str, Any] = field(default_factory=dict)
    # True when every record has exactly the JSON types (no float ranks or datetime dates from a table),
    # so the raw records can be compared and selected as they are.
    plain: bool = True
    # Ids of the deleted and spam messages (rule 1 of the selection), parents before their replies, found while
    # the records were validated, so the top-rank selection need not visit every message again. None: not collected.
    # For a tree read lazily from a nested export (`prompt` set, `records` None): the flagged records themselves.
    flagged: list[Any] | None = None
    # The root record of a nested export with its `replies`, already validated, and the tree's line.
    prompt: dict[str, Any] | None = None
    line: int | None = None

    def linked(self) -> tuple[dict[str, tuple[int | None, dict[str, Any]]], dict[str, list[str]]]:
        """(records, children), built on first use for a tree read from a nested export."""
        if self.records is None or self.children is None:
            assert self.prompt is not None and self.line is not None
            self.records, self.children, _, _ = _nested_records(self.prompt, self.tree_id, self.source, self.line)
        return self.records, self.children

    def to_tree(self) -> Tree:
        """The frozen `Tree`, built children first."""
        (records, children), path = self.linked(), self.source
        built: dict[str, Message] = {}
        for node in reversed(records):
            line, record = records[node]
            kids = children.get(node)
            replies = tuple(built.pop(kid) for kid in kids) if kids else ()
            built[node] = make_message(record, path, line, replies)
        return Tree(message_tree_id=self.tree_id, prompt=built[self.root], tree_state=self.state, split=self.split,
                    source=path, extra=self.extra)


def check_record(record: dict[str, Any], path: str, line: int | None) -> bool:
    """Raise the `OasstInputError` that `make_message` would raise for `record`, cheaply when it is valid.

    Returns True for a record with plain JSON types, False for one that is valid only after conversion."""
    g = record.get
    rank = g("rank")
    labels = g("labels")
    # One boolean expression, no Python calls: this runs for every message and dominates the build otherwise
    # (a per-field tuple of types checked against a set of allowed tuples measured slower; so did
    # `type(x) in {T, NoneType}`, a set lookup per field). map(type, ...) on the label values stays in C; a
    # generator there cost 0.7 s per OASST1-sized nested export.
    if (
        type(g("message_id")) is str and g("role") in ROLES and type(g("text")) is str
        and ((value := g("lang")) is None or type(value) is str)
        and ((value := g("created_date")) is None or type(value) is str)
        and ((value := g("model_name")) is None or type(value) is str)
        and (rank is None or (type(rank) is int and rank >= 0))
        and ((value := g("review_count")) is None or type(value) is int)
        and ((value := g("deleted")) is None or type(value) is bool)
        and ((value := g("review_result")) is None or type(value) is bool)
        and ((value := g("synthetic")) is None or type(value) is bool)
        and ((value := g("emojis")) is None or type(value) is dict) and record["message_id"]
        and (labels is None or (type(labels) is dict and (
            (type(names := labels.get("name")) is list and type(values := labels.get("value")) is list
             and len(names) == len(values))
            or ("name" not in labels and _DICT_ONLY.issuperset(map(type, labels.values()))))))
    ):
        return True
    make_message(record, path, line)  # raises the precise error; returns for odd-but-valid values
    return False


_DICT_ONLY = frozenset((dict,))


def iter_raw_trees(
    source: str | Path,
    *,
    on_error: OnError = "fail",
    report: ReadReport | None = None,
    progress: Progress | None = None,
    buffered: bool = False,
) -> Iterator[RawTree]:
    """Like `read_trees`, but yields validated `RawTree`s (records, not `Message`s)."""
    report = report if report is not None else ReadReport()
    shape = detect_shape(source)
    if shape == "nested":
        return _read_nested(Path(source), on_error, report, progress)
    if shape == "flat":
        records = _json_records(Path(source), on_error, report, progress)
        return _group_flat(records, str(source), split_of(str(source)), on_error, report, buffered)
    if shape == "parquet":
        return _group_flat(_parquet_records(Path(source), progress), str(source), split_of(str(source)),
                           on_error, report, buffered)
    return _read_datasets(str(source), shape, on_error, report, buffered)


@dataclass(slots=True)
class _Pending:
    """The records of one tree while it is being read from a flat input."""

    tree_id: str
    state: str | None
    records: list[tuple[int | None, str | None, dict[str, Any]]] = field(default_factory=list)


def _group_flat(
    records: Generator[tuple[int, dict[str, Any]], None, None],
    path: str,
    split: str | None,
    on_error: OnError,
    report: ReadReport,
    buffered: bool,
) -> Iterator[RawTree]:
    """Group flat records by `message_tree_id` and assemble each group into a tree."""
    done: set[str] = set()
    pending: dict[str, _Pending] = {}
    current: _Pending | None = None
    seen_any = False
    # closing: a reader that stops early (an error, a retry) stops the thread inflating its input at once.
    with gc_paused(), closing(records):
        for line, record in records:
            seen_any = True
            tree_id = record.get("message_tree_id")
            parent = record.get("parent_id", 0)
            if type(tree_id) is not str or not tree_id or not (parent is None or type(parent) is str):
                try:
                    required_str(record, "message_tree_id", path, line)
                    if parent == 0:
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
                    state = record.get("tree_state")
                    current = pending[tree_id] = _Pending(tree_id, state if type(state) is str else None)
            current.records.append((line, parent, record))
        for group in pending.values():
            yield from _finish_flat(group, path, split, on_error, report)
    if not seen_any:
        raise OasstInputError(path, None, "input has no messages", reason="empty_input")


def _finish_flat(group: _Pending, path: str, split: str | None, on_error: OnError,
                 report: ReadReport) -> Iterator[RawTree]:
    try:
        tree = _assemble(group, path, split, report)
    except OasstInputError as err:
        if on_error == "fail":
            raise
        report.skip(err, len(group.records))
        return
    if tree is not None:
        report.trees += 1
        yield tree


def _assemble(group: _Pending, path: str, split: str | None, report: ReadReport) -> RawTree | None:
    """Link one tree's records parent to child; validate fields, ids, roots, cycles and role alternation."""
    by_id: dict[str, tuple[int | None, str | None, dict[str, Any]]] = {}
    children: dict[str | None, list[str]] = {}
    # Exports are written parents first. While every reply follows its parent, the same loop builds what
    # the depth-first walk below would (records, flagged ids) and checks the role alternation.
    records: dict[str, tuple[int | None, dict[str, Any]]] = {}
    flagged: list[str] = []
    plain = ordered = alternates = True
    for item in group.records:
        line, parent, record = item
        if not check_record(record, path, line):
            plain = False
        message_id = record["message_id"]
        if message_id in by_id:
            raise OasstInputError(
                path, line, f"duplicate message_id {message_id} (first at line {by_id[message_id][0]})",
                reason="duplicate_id")
        role = record["role"]
        if parent is None:
            if role != "prompter":
                alternates = False
        elif (up := by_id.get(parent)) is None:  # looked up before this record is added: a self-parent is caught
            ordered = False
        elif up[2]["role"] == role:
            alternates = False
        if record.get("deleted") or record.get("review_result") is False:
            flagged.append(message_id)
        by_id[message_id] = item
        records[message_id] = (line, record)
        kids = children.get(parent)
        if kids is None:
            children[parent] = [message_id]
        else:
            kids.append(message_id)
    roots = children.pop(None, [])
    if len(roots) > 1:
        line = by_id[roots[1]][0]
        raise OasstInputError(path, line, f"tree {group.tree_id} has a second root message {roots[1]} "
                              f"(first root: {roots[0]})", reason="multiple_roots")
    if ordered and alternates and roots:
        # Every message came after its parent and there is one root, so the root reaches every message (no
        # orphans, no cycles) and the input order is a parents-first order. Anything else takes the walk,
        # which also finds the first role break in its own order for the error.
        report.messages += len(by_id)
        return RawTree(group.tree_id, group.state, split, path, roots[0], records, children, plain=plain,
                       flagged=flagged)
    reached = 0
    # Messages whose parent is missing head orphaned subtrees: dropped and counted, not an error.
    orphan_heads = [kid for parent, kids in children.items() if parent not in by_id for kid in kids]
    if orphan_heads:
        size = len(subtree_ids(orphan_heads, children))
        reached += size
        report.orphaned += size
        if report.orphaned_first is None:
            report.orphaned_first = f"{path}:{by_id[orphan_heads[0]][0]}"
    # The root's subtree, depth first (as `subtree_ids` walks it), in the same pass: the expected role of each
    # message (alternating from a prompter root) and the messages that rule 1 drops.
    records = {}
    flagged = []
    alternates = True
    stack = [(roots[0], "prompter")] if roots else []
    while stack:
        node, role = stack.pop()
        line, _, record = by_id[node]
        records[node] = (line, record)
        if record["role"] != role:
            alternates = False
        if record.get("deleted") or record.get("review_result") is False:
            flagged.append(node)
        kids = children.get(node)
        if kids:
            stack.extend(zip(reversed(kids), repeat(_OTHER_ROLE[role])))
    reached += len(records)
    if reached < len(by_id):
        raise _cycle_error(by_id, children, roots + orphan_heads, path)
    report.messages += len(by_id)
    if not roots:
        return None
    if not alternates:
        _check_roles(records, children, path)  # raises the error for the first break, in its own order
    return RawTree(group.tree_id, group.state, split, path, roots[0], records, children, plain=plain,
                   flagged=flagged)


def subtree_ids(heads: list[str], children: Mapping[Any, list[str]]) -> list[str]:
    """Ids of the subtrees under `heads`, depth first, parents before children."""
    order: list[str] = []
    stack = list(reversed(heads))
    while stack:
        node = stack.pop()
        order.append(node)
        kids = children.get(node)
        if kids:
            stack.extend(reversed(kids))
    return order


_OTHER_ROLE = {"prompter": "assistant", "assistant": "prompter"}


def _check_roles(records: dict[str, tuple[int | None, dict[str, Any]]], children: dict[Any, list[str]],
                 path: str) -> None:
    """Roles alternate from a prompter root down: raise for the first message (in `records` order, then reply
    order) that breaks it. The readers call it only once their walk has seen a message off the alternation."""
    root_id = next(iter(records))
    line, root = records[root_id]
    if root["role"] != "prompter":
        raise OasstInputError(path, line, f"root message {root_id} has role '{root['role']}'; "
                              "a tree starts with a prompter message", reason="role_alternation")
    for node, (_, record) in records.items():
        kids = children.get(node)
        if kids:
            role = record["role"]
            for kid in kids:
                kid_line, kid_record = records[kid]
                if kid_record["role"] == role:
                    raise OasstInputError(
                        path, kid_line, f"message {kid} is {_a(role)} reply to {_a(role)} message {node}; "
                        "roles must alternate", reason="role_alternation")


def _cycle_error(by_id: dict, children: dict, heads: list[str], path: str) -> OasstInputError:
    """Name the cycle that kept some messages from being reached from a root or an orphan head."""
    reachable = set(subtree_ids(heads, children))
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


# -------------------------------------------------------------------------------------- nested -> trees


def _read_nested(path: Path, on_error: OnError, report: ReadReport,
                 progress: Progress | None) -> Iterator[RawTree]:
    spath = str(path)
    split = split_of(spath)
    seen_any = False
    records = _json_records(path, on_error, report, progress)
    with gc_paused(), closing(records):
        for line, record in records:
            seen_any = True
            try:
                tree = _nested_tree(record, spath, line, split, report)
            except OasstInputError as err:
                if on_error == "fail":
                    raise
                report.skip(err, messages=0)  # the messages of a broken nested tree cannot be counted reliably
                continue
            if tree is not None:
                report.trees += 1
                yield tree
    if not seen_any:
        raise OasstInputError(path, None, "input has no trees", reason="empty_input")


def _nested_tree(record: dict[str, Any], path: str, line: int, split: str | None,
                 report: ReadReport) -> RawTree | None:
    tree_id = required_str(record, "message_tree_id", path, line)
    state = optional_str(record, "tree_state", path, line)
    prompt = record.get("prompt")
    if prompt is None:
        if "prompt" not in record:
            raise OasstInputError(path, line, "missing required field 'prompt'", reason="missing_field")
        return None  # OASST2 exports trees whose prompt was deleted as `"prompt": null`
    if type(prompt) is not dict:
        raise OasstInputError(path, line, f"field 'prompt' must be an object, got {type(prompt).__name__}",
                              reason="wrong_type")
    extra = {k: v for k, v in record.items() if k not in ("message_tree_id", "tree_state", "prompt")}
    scanned = _scan_nested(prompt)
    if scanned is not None:
        count, flagged = scanned
        report.messages += count
        return RawTree(tree_id, state, split, path, prompt["message_id"], None, None, extra, True, flagged,
                       prompt, line)
    records, children, flagged_ids, plain = _nested_records(prompt, tree_id, path, line)
    report.messages += len(records)
    return RawTree(tree_id, state, split, path, prompt["message_id"], records, children, extra, plain, flagged_ids)


def _nested_records(prompt: dict[str, Any], tree_id: str, path: str, line: int) -> tuple[
        dict[str, tuple[int | None, dict[str, Any]]], dict[str, list[str]], list[str], bool]:
    """Validate one nested tree message by message, raising the first error in depth-first order; returns
    (records, children, flagged ids, plain) as `RawTree` holds them."""
    records: dict[str, tuple[int | None, dict[str, Any]]] = {}
    children: dict[str, list[str]] = {}
    flagged: list[str] = []
    # (message, its parent's id, the role alternation expects of it)
    stack: list[tuple[dict[str, Any], str | None, str]] = [(prompt, None, "prompter")]
    plain = alternates = True
    while stack:
        node, parent, role = stack.pop()
        if not check_record(node, path, line):
            plain = False
        message_id = node["message_id"]
        if message_id in records:
            raise OasstInputError(path, line, f"duplicate message_id {message_id} in tree {tree_id}",
                                  reason="duplicate_id")
        declared = node.get("parent_id")
        if declared != parent:
            if declared is not None or "parent_id" in node and parent is None:
                raise OasstInputError(path, line, f"message {message_id} has parent_id {declared} but is a "
                                      f"reply of {parent}", reason="parent_mismatch")
            node = {**node, "parent_id": parent}  # exports omit parent_id on the root only, but be lenient
        records[message_id] = (line, node)
        if node["role"] != role:
            alternates = False
        if node.get("deleted") or node.get("review_result") is False:
            flagged.append(message_id)
        replies = node.get("replies")
        if replies:
            # map(type, ...) and map(dict.get, ...) stay in C: this loop visits every message of the input.
            if type(replies) is not list or not _DICT_ONLY.issuperset(map(type, replies)):
                raise OasstInputError(path, line, f"field 'replies' of message {message_id} must be a list of "
                                      "objects", reason="wrong_type")
            children[message_id] = list(map(dict.get, replies, repeat("message_id")))
            stack.extend(zip(reversed(replies), repeat(message_id), repeat(_OTHER_ROLE[role])))
    if not alternates:
        _check_roles(records, children, path)  # raises the error for the first break, in its own order
    return records, children, flagged, plain


def _scan_nested(prompt: dict[str, Any]) -> tuple[int, list[dict[str, Any]]] | None:
    """The walk of `_nested_records` without building its index: (messages, flagged records parents first)
    when every message is plain and valid, else None, and `_nested_records` then raises the first error in its
    own order (or keeps the odd-but-valid values)."""
    seen: set[str] = set()
    flagged: list[dict[str, Any]] = []
    tables: list[dict[str, Any]] = []  # labels in the export's {name: {value, count}} form, checked at the end
    stack: list[tuple[dict[str, Any], str | None, str]] = [(prompt, None, "prompter")]
    while stack:
        node, parent, role = stack.pop()
        g = node.get
        message_id = g("message_id")
        rank = g("rank")
        labels = g("labels")
        deleted = g("deleted")
        review = g("review_result")
        # `check_record`'s test inlined, with the walk's own checks (unique id, parent_id, alternating role,
        # which also puts the role in ROLES) sharing its lookups: this loop visits every message of the input.
        # `x is None or type(x) is T` rather than `type(x) in {T, NoneType}`: no set lookup per field.
        if not (
            type(message_id) is str and message_id and message_id not in seen and g("parent_id") == parent
            and g("role") == role and type(g("text")) is str
            and ((value := g("lang")) is None or type(value) is str)
            and ((value := g("created_date")) is None or type(value) is str)
            and ((value := g("model_name")) is None or type(value) is str)
            and (rank is None or (type(rank) is int and rank >= 0))
            and ((value := g("review_count")) is None or type(value) is int)
            and (deleted is None or type(deleted) is bool) and (review is None or type(review) is bool)
            and ((value := g("synthetic")) is None or type(value) is bool)
            and ((value := g("emojis")) is None or type(value) is dict)
        ):
            return None
        if labels is not None:
            if type(labels) is not dict:
                return None
            if "name" in labels:  # the columnar form
                if not (type(names := labels["name"]) is list and type(values := labels.get("value")) is list
                        and len(names) == len(values)):
                    return None
            else:
                tables.append(labels)
        seen.add(message_id)
        if deleted or review is False:
            flagged.append(node)
        replies = g("replies")
        if replies:
            if type(replies) is not list or not _DICT_ONLY.issuperset(map(type, replies)):
                return None
            stack.extend(zip(reversed(replies), repeat(message_id), repeat(_OTHER_ROLE[role])))
    # One C-level pass over every label of the tree: a pass per message cost 0.3 us of set-up each.
    if tables and not _DICT_ONLY.issuperset(map(type, chain.from_iterable(map(dict.values, tables)))):
        return None
    return len(seen), flagged


# ---------------------------------------------------------------------------- datasets folders and hub ids


def _read_datasets(source: str, shape: Shape, on_error: OnError, report: ReadReport,
                   buffered: bool) -> Iterator[RawTree]:
    try:
        import datasets
    except ImportError:
        raise OasstError(f"reading {source} needs the `datasets` package: pip install 'oasst-tools[hf]'") from None
    try:
        if shape == "disk":
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except Exception as exc:  # network, auth and format errors all end here; the user needs one line
        if shape == "hub":
            raise OasstError(
                f"cannot load {source} from the Hugging Face Hub ({_short(exc)}); offline, pass --input PATH "
                "with a local export (.jsonl, .jsonl.gz, .parquet, .trees.jsonl.gz or a save_to_disk folder)"
            ) from None
        raise OasstInputError(source, None, f"cannot load dataset ({_short(exc)})", reason="bad_dataset") from None
    splits = loaded.items() if isinstance(loaded, dict) else [(None, loaded)]
    for split, table in splits:
        label = f"{source}[{split}]" if split else source
        rows = ((number, row) for number, row in enumerate(table, start=1))
        yield from _group_flat(rows, label, split, on_error, report, buffered)


def input_size(source: str | Path) -> int:
    """Bytes a progress bar should expect for `source` (0 when unknown)."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return 0



def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role
