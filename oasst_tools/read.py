"""Read OASST exports into `Tree`s, one tree at a time.

Shapes, detected automatically:
- flat messages, one per line (`.jsonl`, `.jsonl.gz`), as parquet, as a `datasets.save_to_disk` folder, or as a
  hub id such as `OpenAssistant/oasst1` (online only);
- nested tree exports (`*.trees.jsonl[.gz]`, OASST1 and OASST2), one tree per line.

Nested files stream tree by tree, so memory does not grow with the number of trees. Flat exports are written
with each tree contiguous, so they stream too; an interleaved file raises `NotContiguousError`, and
`read_trees(..., buffered=True)` groups it in memory instead (as it always does for a pipe, which cannot be read
twice). Each input is opened once and its shape sniffed from bytes the reader is handed again (`sources.py`).

Ids are unique across everything one `ReadReport` sees (all inputs of a build): a tree or message id read twice is
an error, or, with on_error="skip", the later tree is dropped and counted (`duplicate_tree`). Lines nested deeper
than orjson's limit are parsed by `deepjson`; a gzip cut or corrupt mid-stream ends the input with the trees before
the cut under on_error="skip", the cut counted.
"""

from __future__ import annotations

import gc
import re
from collections import Counter
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain, count, repeat
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

from oasst_tools.dedup import IdRegistry
from oasst_tools.errors import NotContiguousError, OasstError, OasstInputError, os_input_error
from oasst_tools.lines import FileLines, Progress, Source, iter_lines
from oasst_tools.records import DICT_ONLY, Item, index_tree, make_message, optional_str, required_str
from oasst_tools.schema import Message, Tree
from oasst_tools.sources import Shape, input_size, open_input

__all__ = ["ReadReport", "RawTree", "Shape", "detect_shape", "input_size", "iter_raw_trees", "read_trees",
           "split_of", "subtree_records"]

OnError = Literal["fail", "skip"]
# A gzip stream that breaks mid-file: with on_error="skip", the input ends there and the cut is counted.
_CUT = frozenset(("truncated_gzip", "corrupt_gzip"))
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
    # Tree and message ids read so far (every input of a build): one read twice is a duplicate.
    ids: IdRegistry = field(default_factory=IdRegistry, repr=False)

    def skip(self, exc: OasstInputError, messages: int = 1) -> None:
        """Count one skipped record or tree (of `messages` messages) under the error's reason."""
        self.skipped[exc.reason] += 1
        self.skipped_messages += messages
        self.skipped_first.setdefault(exc.reason, str(exc))

    def claim(self, tree_id: str, ids: Collection[str], line: int | None, on_error: OnError) -> None:
        """Register one tree's ids (`IdRegistry`); a repeat raises. Under on_error="skip" a repeated tree leaves no
        trace (it is skipped), and only the first one's error searches the inputs for the message's lines."""
        if on_error == "fail":
            self.ids.add(tree_id, ids, line)
        else:
            self.ids.claim(tree_id, ids, line, locate=not self.skipped.get("duplicate_tree"))


def split_of(name: str) -> str | None:
    """The split a file name announces (`validation-en.messages.jsonl` -> validation), or None."""
    stem = Path(name).name.lower()
    for word, split in _SPLIT_WORDS:
        if re.search(rf"(^|[^a-z]){word}([^a-z]|$)", stem):
            return split
    return None


def detect_shape(source: str | Path) -> Shape:
    """Which reader handles `source`: a file's first record (or its name, for parquet); a folder is a
    `save_to_disk` folder; a missing `owner/name` is a hub id. Opens and closes a file: readers sniff their own."""
    shape, src = open_input(source)
    if src is not None:
        src.close()
    return shape


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
    src: Source, on_error: OnError, report: ReadReport, progress: Progress | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for every non-blank line; malformed JSON raises or is skipped and counted."""
    return _parsed(iter_lines(src, progress, ahead=True), src.name, on_error, report)


def _parsed(lines: Iterator[tuple[int, bytes]], spath: str, on_error: OnError,
            report: ReadReport) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    # closing `lines` on an error here stops the inflating thread now, not when the traceback goes
    close = getattr(lines, "close", None)
    try:
        for number, raw in lines:
            try:
                record = _loads(raw)
            except _JSONError as exc:
                if not raw.strip():
                    continue
                try:
                    record = _loads_again(raw, exc)
                except ValueError as bad:
                    err = OasstInputError(spath, number, f"invalid JSON ({_short(bad)})", reason="invalid_json")
                    if on_error == "fail":
                        raise err from None
                    report.skip(err)
                    continue
            if type(record) is not dict:
                _not_an_object(record, spath, number, on_error, report)
                continue
            yield number, record
    except OSError as exc:  # the disk, a network file system or a pipe failed mid-read
        raise os_input_error(exc, spath, number + 1, "cannot read") from None
    finally:
        if close is not None:
            close()


def _not_an_object(record: Any, path: str, line: int, on_error: OnError, report: ReadReport) -> None:
    err = OasstInputError(path, line, f"expected a JSON object, got {type(record).__name__}", reason="wrong_type")
    if on_error == "fail":
        raise err
    report.skip(err)


class _ParsedFile:
    """The records of a plain JSONL file parsed in C, `zip(count(1), map(orjson.loads, lines))`, so no Python
    frame runs per line (about 10 ms of an OASST1-sized flat export). A line orjson refuses stops the iteration
    with its error (a blank line, a tree too deep, bad JSON); `resume` deals with that line as `_json_records`
    does and returns the records after it, parsed line by line. Other values than objects come through as they
    are: the consumer checks them (`_not_an_object`)."""

    def __init__(self, lines: FileLines, on_error: OnError, report: ReadReport) -> None:
        self._lines = lines
        self._numbers = count(1)
        self._on_error = on_error
        self._report = report
        self._records = zip(self._numbers, map(_loads, lines.raw))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self._records

    def resume(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """After the iteration stopped at a line orjson refused: that line handled, then the rest of the file."""
        number = next(self._numbers) - 1  # zip took the refused line's number before map raised
        raw = self._lines.reread(number)  # map did not keep it; once per file at most (the rest is read slowly)
        rest = enumerate(self._lines.raw, number + 1)
        return _parsed(chain([(number, raw)], rest), self._lines.src.name, self._on_error, self._report)

    def close(self) -> None:
        """Close the file."""
        self._lines.close()


def _loads_again(raw: bytes, exc: Exception) -> Any:
    """A line orjson refused: parsed without a depth limit when depth was the only problem, else the error to
    report (parsed again without the line end, so its position points into the line itself)."""
    if _is_depth_error(exc):
        from oasst_tools import deepjson  # late: only lines nested past orjson's limit need it

        return deepjson.loads(raw)
    try:
        _loads(raw.rstrip(b"\r\n"))
    except _JSONError as bare:
        raise bare from None
    raise exc


def _is_depth_error(exc: Exception) -> bool:
    """True when a parser gave up on nesting depth (orjson: "depth limit exceeded"; older: "recursion limit")."""
    text = str(exc).lower()
    return "depth limit" in text or "recursion" in text


def _short(exc: Exception) -> str:
    text = str(exc).split("\n")[0]
    return text if len(text) < 80 else text[:77] + "..."


def _parquet_records(src: Source, progress: Progress | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import io

    import polars as pl  # late: only parquet input needs it

    with src:
        try:
            # A pipe cannot seek, and parquet keeps its index at the end: read it whole.
            data: Any = src.name if src.regular else io.BytesIO(src.take_head() + src.fh.read())
            frame = pl.read_parquet(data)
        except OSError as exc:
            raise os_input_error(exc, src.name, doing="cannot read") from None
        except Exception as exc:  # polars raises several unrelated types for a bad file
            raise OasstInputError(src.name, None, f"cannot read parquet ({_short(exc)})",
                                  reason="bad_parquet") from None
    if progress is not None:
        progress(src.size)
    for number, row in enumerate(frame.iter_rows(named=True), start=1):
        yield number, row


# ----------------------------------------------------------------------------------------- flat -> trees


@dataclass(slots=True)
class RawTree:
    """One validated tree as its raw records, the same from every reader: what `read_trees` turns into `Message`s,
    and what the build's fast path selects from directly (constructing 90k frozen messages costs more than parsing
    them)."""

    tree_id: str
    state: str | None
    split: str | None
    source: str
    root: str
    # message_id -> (line, parent id, record), parents before their replies; only the root's subtree (orphans
    # removed). The line is the tree's for a nested export.
    records: dict[str, Item]
    # message_id -> its reply records in input order (messages without replies are absent; entries under the
    # parents of orphans may remain, out of reach from the root).
    children: dict[str | None, list[dict[str, Any]]]
    # The records that rule 1 drops (`records.FLAG_REASON`), parents before their replies, found while the records
    # were checked, so the top-rank selection need not visit every message again.
    flagged: list[dict[str, Any]] = field(default_factory=list)
    # True when every record has exactly the JSON types (no float ranks or datetime dates from a table),
    # so the raw records can be compared and selected as they are.
    plain: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_tree(self) -> Tree:
        """The frozen `Tree`, built children first."""
        records, children, path = self.records, self.children, self.source
        built: dict[str, Message] = {}
        for node in reversed(records):
            line, _, record = records[node]
            kids = children.get(node)
            replies = tuple(built.pop(kid["message_id"]) for kid in kids) if kids else ()
            built[node] = make_message(record, path, line, replies)
        return Tree(message_tree_id=self.tree_id, prompt=built[self.root], tree_state=self.state, split=self.split,
                    source=path, extra=self.extra)


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
    shape, src = open_input(source)
    if src is None:
        return _read_datasets(str(source), shape, on_error, report, buffered)
    # A pipe cannot be read again after a NotContiguousError: group it in memory from the start.
    buffered = buffered or not src.regular
    report.ids.add_source(src.name, src.regular)
    if shape == "nested":
        return _read_nested(src, on_error, report, progress)
    if shape == "flat":
        records: Any = None
        if progress is None and src.regular and not src.is_gzip():
            lines = iter_lines(src)
            if isinstance(lines, FileLines):
                records = _ParsedFile(lines, on_error, report)
        if records is None:
            records = _json_records(src, on_error, report, progress)
        return _group_flat(records, src.name, split_of(src.name), on_error, report, buffered)
    return _group_flat(_parquet_records(src, progress), src.name, split_of(src.name), on_error, report, buffered)


@dataclass(slots=True)
class _Pending:
    """The records of one tree while it is being read from a flat input."""

    tree_id: str
    state: str | None
    records: list[tuple[int | None, str | None, dict[str, Any]]] = field(default_factory=list)


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
                lost = pending.pop(current.tree_id) if current is not None and current.tree_id in pending else None
                report.skip(err, len(lost.records) if lost is not None else 0)
                seen_any = True
                break
        for group in pending.values():
            yield from _finish_flat(group, path, split, on_error, report)
    if not seen_any:
        raise OasstInputError(path, None, "input has no messages", reason="empty_input")


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
    if orphan_heads:
        size = len(subtree_records(orphan_heads, children))
        reached += size
        report.orphaned += size
        if report.orphaned_first is None:
            report.orphaned_first = f"{path}:{by_id[orphan_heads[0]['message_id']][0]}"
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


# -------------------------------------------------------------------------------------- nested -> trees


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
        return None  # OASST2 exports trees whose prompt was deleted as `"prompt": null`
    if type(prompt) is not dict:
        raise OasstInputError(path, line, f"field 'prompt' must be an object, got {type(prompt).__name__}",
                              reason="wrong_type")
    extra = {k: v for k, v in record.items() if k not in _TREE_FIELDS} if len(record) > 3 else {}
    items = _nested_items(prompt, line)
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


def _nested_items(prompt: dict[str, Any], line: int) -> list[Item] | None:
    """One nested tree's messages as (line, parent id, record), depth first, for `index_tree`; None when a reply
    names another parent in `parent_id` (or none), or `replies` is not a list of objects: `_nested_records` then
    raises the first error in its order, or mends a missing `parent_id`."""
    items: list[Item] = []
    stack: list[Item] = [(line, None, prompt)]
    while stack:
        item = stack.pop()
        items.append(item)
        node = item[2]
        g = node.get
        if g("parent_id") != item[1]:
            return None
        replies = g("replies")
        if replies:
            # map(type, ...) stays in C: this loop visits every message of the input.
            if type(replies) is not list or not DICT_ONLY.issuperset(map(type, replies)):
                return None
            stack.extend(zip(repeat(line), repeat(g("message_id")), reversed(replies)))
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
        declared = node.get("parent_id")
        if declared != parent:
            if declared is not None or "parent_id" in node and parent is None:
                raise OasstInputError(path, line, f"message {message_id} has parent_id {declared} but is a "
                                      f"reply of {parent}", reason="parent_mismatch")
            node = {**node, "parent_id": parent}
        items.append((line, parent, node))
        replies = node.get("replies")
        if replies:
            if type(replies) is not list or not DICT_ONLY.issuperset(map(type, replies)):
                raise OasstInputError(path, line, f"field 'replies' of message {message_id} must be a list of "
                                      "objects", reason="wrong_type")
            stack.extend(zip(reversed(replies), repeat(message_id)))
    return items


# ---------------------------------------------------------------------------- datasets folders and hub ids


def _read_datasets(source: str, shape: Shape, on_error: OnError, report: ReadReport,
                   buffered: bool) -> Iterator[RawTree]:
    if shape == "hub":
        from oasst_tools import hub  # late: hub ids only

        # One probe (1.5 s at most) rather than datasets' 25 s of retries; offline, only a cached copy can load.
        if not hub.hub_reachable():
            if not hub.in_hub_cache(source, "dataset"):
                raise OasstError(_hub_advice(source, hub.offline_reason()))
            hub.assume_offline()
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
            raise OasstError(_hub_advice(source, _short(exc))) from None
        raise OasstInputError(source, None, f"cannot load dataset ({_short(exc)})", reason="bad_dataset") from None
    splits = loaded.items() if isinstance(loaded, dict) else [(None, loaded)]
    for split, table in splits:
        label = f"{source}[{split}]" if split else source
        report.ids.add_source(label, False)
        rows = ((number, row) for number, row in enumerate(table, start=1))
        yield from _group_flat(rows, label, split, on_error, report, buffered)


def _hub_advice(source: str, why: str) -> str:
    return (f"cannot load {source} from the Hugging Face Hub ({why}); offline, pass --input PATH with a local "
            "export (.jsonl, .jsonl.gz, .parquet, .trees.jsonl.gz or a save_to_disk folder)")


def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role
