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
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from oasst_tools.records import make_message, optional_str, required_str
from oasst_tools.schema import Message, Tree

OnError = Literal["fail", "skip"]
Shape = Literal["flat", "nested", "parquet", "disk", "hub"]
Progress = Callable[[int], None]

_CHUNK = 1 << 23
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
    for _, raw in _lines(path):
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


# ---------------------------------------------------------------------------------------------- raw lines


def _lines(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for every line, gunzipping `.gz` files; a cut gzip raises at its last line."""
    gz = path.suffix == ".gz"
    decomp = zlib.decompressobj(31) if gz else None
    pending = b""
    number = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if progress is not None and block:
                progress(len(block))
            if decomp is not None:
                if not block:
                    if not decomp.eof:
                        raise OasstInputError(
                            path, number + 1, "gzip file is truncated: the stream ends inside this line",
                            reason="truncated_gzip")
                    data = b""
                else:
                    try:
                        data = decomp.decompress(block)
                        while decomp.eof and decomp.unused_data:  # concatenated gzip members
                            rest = decomp.unused_data
                            decomp = zlib.decompressobj(31)
                            data += decomp.decompress(rest)
                    except zlib.error as exc:
                        raise OasstInputError(path, number + 1, f"gzip data is corrupt ({exc})",
                                              reason="corrupt_gzip") from None
            else:
                data = block
            if not data and not block:
                break
            parts = (pending + data).split(b"\n")
            pending = parts.pop()
            for raw in parts:
                number += 1
                yield number, raw
    if pending.strip():
        yield number + 1, pending


def _json_records(
    path: Path, on_error: OnError, report: ReadReport, progress: Progress | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for every non-blank line; malformed JSON raises or is skipped and counted."""
    spath = str(path)
    for number, raw in _lines(path, progress):
        try:
            record = _loads(raw)
        except _JSONError as exc:
            if not raw.strip():
                continue
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
class _Pending:
    """The records of one tree while it is being read from a flat input."""

    tree_id: str
    state: str | None
    records: list[tuple[int | None, str | None, dict[str, Any]]] = field(default_factory=list)
    broken: OasstInputError | None = None


def _group_flat(
    records: Iterable[tuple[int, dict[str, Any]]],
    path: str,
    split: str | None,
    on_error: OnError,
    report: ReadReport,
    buffered: bool,
) -> Iterator[Tree]:
    """Group flat records by `message_tree_id` and assemble each group into a tree."""
    done: set[str] = set()
    pending: dict[str, _Pending] = {}
    current: _Pending | None = None
    seen_any = False
    with gc_paused():
        for line, record in records:
            seen_any = True
            try:
                tree_id = required_str(record, "message_tree_id", path, line)
                if "parent_id" not in record:
                    raise OasstInputError(path, line, "missing required field 'parent_id'", reason="missing_field")
                parent = optional_str(record, "parent_id", path, line)
                state = optional_str(record, "tree_state", path, line)
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
                    current = pending[tree_id] = _Pending(tree_id, state)
            current.records.append((line, parent, record))
        for group in pending.values():
            yield from _finish_flat(group, path, split, on_error, report)
    if not seen_any:
        raise OasstInputError(path, None, "input has no messages", reason="empty_input")


def _finish_flat(group: _Pending, path: str, split: str | None, on_error: OnError,
                 report: ReadReport) -> Iterator[Tree]:
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


def _assemble(group: _Pending, path: str, split: str | None, report: ReadReport) -> Tree | None:
    """Link one tree's records parent to child; validate ids, roots, cycles and role alternation."""
    by_id: dict[str, tuple[int | None, str | None, dict[str, Any]]] = {}
    children: dict[str | None, list[str]] = {}
    for item in group.records:
        line, parent, record = item
        message_id = required_str(record, "message_id", path, line)
        if message_id in by_id:
            raise OasstInputError(
                path, line, f"duplicate message_id {message_id} (first at line {by_id[message_id][0]})",
                reason="duplicate_id")
        by_id[message_id] = item
        children.setdefault(parent, []).append(message_id)
    roots = children.get(None, [])
    if len(roots) > 1:
        line = by_id[roots[1]][0]
        raise OasstInputError(path, line, f"tree {group.tree_id} has a second root message {roots[1]} "
                              f"(first root: {roots[0]})", reason="multiple_roots")
    reached = 0
    # Messages whose parent is missing head orphaned subtrees: dropped and counted, not an error.
    for parent, kids in children.items():
        if parent is not None and parent not in by_id:
            size = _subtree_size(kids, children)
            reached += size
            report.orphaned += size
            if report.orphaned_first is None:
                report.orphaned_first = f"{path}:{by_id[kids[0]][0]}"
    root = None
    if roots:
        root, size = _build(roots[0], by_id, children, path)
        reached += size
    if reached < len(by_id):
        raise _cycle_error(by_id, children, roots, path)
    report.messages += len(by_id)
    if root is None:
        return None
    return Tree(message_tree_id=group.tree_id, prompt=root, tree_state=group.state, split=split, source=path)


def _subtree_size(heads: list[str], children: dict[str | None, list[str]]) -> int:
    stack = list(heads)
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(children.get(node, ()))
    return count


def _build(root_id: str, by_id: dict, children: dict, path: str) -> tuple[Message, int]:
    """Construct the frozen messages bottom-up (children first), checking role alternation."""
    order: list[str] = []
    stack = [root_id]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(children.get(node, ()))
    built: dict[str, Message] = {}
    for node in reversed(order):
        line, parent, record = by_id[node]
        replies = tuple(built.pop(kid) for kid in children.get(node, ()))
        message = make_message(record, path, line, replies)
        for reply in replies:
            if reply.role == message.role:
                raise _alternation_error(path, reply, message)
        built[node] = message
    root = built[root_id]
    if root.role != "prompter":
        raise OasstInputError(path, root.line, f"root message {root.message_id} has role '{root.role}'; "
                              "a tree starts with a prompter message", reason="role_alternation")
    return root, len(order)


def _alternation_error(path: str, reply: Message, parent: Message) -> OasstInputError:
    return OasstInputError(
        path, reply.line, f"message {reply.message_id} is {_a(reply.role)} reply to {_a(parent.role)} message "
        f"{parent.message_id}; roles must alternate", reason="role_alternation")


def _cycle_error(by_id: dict, children: dict, roots: list[str], path: str) -> OasstInputError:
    """Name the cycle that kept some messages from being reached from a root or an orphan head."""
    reachable = set()
    heads = [r for r in roots] + [k for p, ks in children.items() if p is not None and p not in by_id for k in ks]
    stack = list(heads)
    while stack:
        node = stack.pop()
        reachable.add(node)
        stack.extend(children.get(node, ()))
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


def _read_nested(path: Path, on_error: OnError, report: ReadReport, progress: Progress | None) -> Iterator[Tree]:
    spath = str(path)
    split = split_of(spath)
    seen_any = False
    with gc_paused():
        for line, record in _json_records(path, on_error, report, progress):
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
                 report: ReadReport) -> Tree | None:
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
    # Depth-first order with parents first; messages are then built children first.
    order: list[tuple[dict[str, Any], str | None]] = []
    stack: list[tuple[dict[str, Any], str | None]] = [(prompt, None)]
    seen: set[str] = set()
    while stack:
        item = stack.pop()
        node, parent = item
        order.append(item)
        message_id = required_str(node, "message_id", path, line)
        if message_id in seen:
            raise OasstInputError(path, line, f"duplicate message_id {message_id} in tree {tree_id}",
                                  reason="duplicate_id")
        seen.add(message_id)
        declared = node.get("parent_id")
        if declared is not None and declared != parent:
            raise OasstInputError(path, line, f"message {message_id} has parent_id {declared} but is a reply "
                                  f"of {parent}", reason="parent_mismatch")
        replies = node.get("replies")
        if replies:
            if type(replies) is not list or any(type(r) is not dict for r in replies):
                raise OasstInputError(path, line, f"field 'replies' of message {message_id} must be a list of "
                                      "objects", reason="wrong_type")
            stack.extend((reply, message_id) for reply in reversed(replies))
    built: dict[str, Message] = {}
    for node, parent in reversed(order):
        kids = tuple(built.pop(r["message_id"]) for r in node.get("replies") or ())
        message = make_message(node, path, line, kids, parent_id=parent)
        for reply in kids:
            if reply.role == message.role:
                raise _alternation_error(path, reply, message)
        built[message.message_id] = message
    root = built[prompt["message_id"]]
    if root.role != "prompter":
        raise OasstInputError(path, line, f"root message {root.message_id} has role '{root.role}'; "
                              "a tree starts with a prompter message", reason="role_alternation")
    report.messages += len(order)
    extra = {k: v for k, v in record.items() if k not in ("message_tree_id", "tree_state", "prompt")}
    return Tree(message_tree_id=tree_id, prompt=root, tree_state=state, split=split, source=path, extra=extra)


# ---------------------------------------------------------------------------- datasets folders and hub ids


def _read_datasets(source: str, shape: Shape, on_error: OnError, report: ReadReport,
                   buffered: bool) -> Iterator[Tree]:
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
