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
from oasst_tools.records import make_message, optional_str, required_str
from oasst_tools.schema import ROLES, Message, Tree
from oasst_tools.sources import Shape, input_size, open_input

__all__ = ["ReadReport", "RawTree", "Shape", "detect_shape", "input_size", "iter_raw_trees", "read_trees",
           "split_of", "subtree_ids"]

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
    """One validated tree as its raw records: what `read_trees` turns into `Message`s, and what the
    build's fast path selects from directly (constructing 90k frozen messages costs more than parsing them)."""

    tree_id: str
    state: str | None
    split: str | None
    source: str
    root: str
    # message_id -> (line, parent id, record), parents before children; only the root's subtree (orphans
    # removed). None for a nested tree until `linked()` builds it: the top-rank selection walks `prompt` instead.
    records: dict[str, tuple[int | None, str | None, dict[str, Any]]] | None
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

    def linked(self) -> tuple[dict[str, tuple[int | None, str | None, dict[str, Any]]], dict[str, list[str]]]:
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
            line, _, record = records[node]
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
        type(g("message_id")) is str and type(role := g("role")) is str and role in ROLES and type(g("text")) is str
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
    by_id: dict[str, tuple[int | None, str | None, dict[str, Any]]] = {}
    children: dict[str | None, list[str]] = {}
    # Exports are written parents first. While every reply follows its parent, the same loop builds what
    # the depth-first walk below would (flagged ids; `by_id` is then the records in a parents-first order) and
    # checks the role alternation.
    flagged: list[str] = []
    plain = ordered = alternates = True
    for item in group.records:
        line, parent, record = item
        g = record.get
        message_id = g("message_id")
        role = g("role")
        rank = g("rank")
        labels = g("labels")
        deleted = g("deleted")
        review = g("review_result")
        # `check_record` inlined, sharing its lookups with the linking below: this loop visits every message of a
        # flat input, and the call and the second lookups cost 2% of a flat build. Anything it does not pass goes
        # to `check_record`, which raises the precise error or passes an odd-but-valid record.
        if not (
            type(message_id) is str and message_id and type(role) is str and role in ROLES
            and type(g("text")) is str
            and ((value := g("lang")) is None or type(value) is str)
            and ((value := g("created_date")) is None or type(value) is str)
            and ((value := g("model_name")) is None or type(value) is str)
            and (rank is None or (type(rank) is int and rank >= 0))
            and ((value := g("review_count")) is None or type(value) is int)
            and (deleted is None or type(deleted) is bool) and (review is None or type(review) is bool)
            and ((value := g("synthetic")) is None or type(value) is bool)
            and ((value := g("emojis")) is None or type(value) is dict)
            and (labels is None or (type(labels) is dict and (
                (type(names := labels.get("name")) is list and type(values := labels.get("value")) is list
                 and len(names) == len(values))
                or ("name" not in labels and _DICT_ONLY.issuperset(map(type, labels.values()))))))
        ):
            if not check_record(record, path, line):
                plain = False
            # Valid after conversion: the fields the linking needs are a non-empty string and a known role.
            message_id, role = record["message_id"], record["role"]
        if message_id in by_id:
            raise OasstInputError(
                path, line, f"duplicate message_id {message_id} (first at line {by_id[message_id][0]})",
                reason="duplicate_id")
        if parent is None:
            if role != "prompter":
                alternates = False
        elif (up := by_id.get(parent)) is None:  # looked up before this record is added: a self-parent is caught
            ordered = False
        elif up[2]["role"] == role:
            alternates = False
        if deleted or review is False:
            flagged.append(message_id)
        by_id[message_id] = item
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
        if on_error == "fail":
            report.ids.add(group.tree_id, by_id, group.records[0][0])
        else:
            report.claim(group.tree_id, by_id, group.records[0][0], on_error)
        report.messages += len(by_id)
        return RawTree(group.tree_id, group.state, split, path, roots[0], by_id, children, plain=plain,
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
        item = records[node] = by_id[node]
        record = item[2]
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
    if not alternates:
        _check_roles(records, children, path)  # raises the error for the first break, in its own order
    if not roots:
        report.messages += len(by_id)
        return None  # orphans only: nothing of it is used, so nothing to claim
    report.claim(group.tree_id, by_id, group.records[0][0], on_error)
    report.messages += len(by_id)
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


def _check_roles(records: dict[str, tuple[int | None, str | None, dict[str, Any]]], children: dict[Any, list[str]],
                 path: str) -> None:
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
                kid_line, _, kid_record = records[kid]
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
    scanned = _scan_nested(prompt)
    if scanned is not None:
        ids, flagged = scanned
        if on_error == "fail":
            report.ids.add(tree_id, ids, line)
        else:
            report.claim(tree_id, ids, line, on_error)
        report.messages += len(ids)
        return RawTree(tree_id, state, split, path, prompt["message_id"], None, None, extra, True, flagged,
                       prompt, line)
    records, children, flagged_ids, plain = _nested_records(prompt, tree_id, path, line)
    report.claim(tree_id, records, line, on_error)
    report.messages += len(records)
    return RawTree(tree_id, state, split, path, prompt["message_id"], records, children, extra, plain, flagged_ids)


def _nested_records(prompt: dict[str, Any], tree_id: str, path: str, line: int) -> tuple[
        dict[str, tuple[int | None, str | None, dict[str, Any]]], dict[str, list[str]], list[str], bool]:
    """Validate one nested tree message by message, raising the first error in depth-first order; returns
    (records, children, flagged ids, plain) as `RawTree` holds them."""
    records: dict[str, tuple[int | None, str | None, dict[str, Any]]] = {}
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
        records[message_id] = (line, parent, node)
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


def _scan_nested(prompt: dict[str, Any]) -> tuple[set[str], list[dict[str, Any]]] | None:
    """The walk of `_nested_records` without building its index: (message ids, flagged records parents first)
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
    return seen, flagged


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
