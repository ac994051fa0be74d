"""JSON lines -> (line number, object) pairs for the readers: orjson where it can (the standard library's json
without it), `deepjson` for lines nested past orjson's depth limit, and a malformed line raised or, with
on_error="skip", counted in the `ReadReport`. `_ParsedFile` parses a plain file's lines in C; `gc_paused` keeps the
cyclic garbage collector out of parsing.

Apart from `read.py` so the flat and nested readers (`assemble.py`, `nested.py`), which `read.py` imports, can use
it without importing `read.py`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain, count
from typing import Any

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSONError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # orjson is a core dependency, but the walker must work with the standard library alone
    import json

    _loads = json.loads
    _JSONError = json.JSONDecodeError

from oasst_tools.errors import OasstInputError, first_bytes_hint, kind, os_input_error
from oasst_tools.lines import FileLines, Progress, Source, iter_lines
from oasst_tools.rawtree import OnError, ReadReport


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
                    why = str(bad) if isinstance(bad, NotJSONLines) else f"invalid JSON ({_short(bad)})"
                    err = OasstInputError(spath, number, why, reason="invalid_json")
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
    hint = " (JSON Lines: one object per line; convert an array with jq -c '.[]')" if type(record) is list else ""
    err = OasstInputError(path, line, f"expected a JSON object, got {kind(record)}{hint}", reason="wrong_type")
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


BOM = b"\xef\xbb\xbf"


class NotJSONLines(ValueError):
    """A line that is no JSON Lines record for a reason the user fixes in the whole file (its encoding, an array):
    said as it is, not as a parser's message."""


def _loads_again(raw: bytes, exc: Exception) -> Any:
    """A line orjson refused: parsed without a depth limit when depth was the only problem, else the error to
    report (parsed again without the line end, so its position points into the line itself)."""
    if _is_depth_error(exc):
        from oasst_tools import deepjson  # late: only lines nested past orjson's limit need it

        return deepjson.loads(raw)
    if raw.startswith(BOM):  # a UTF-8 byte order mark (Windows editors write one): not part of the record
        return _loads(raw[len(BOM):])
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        column = len(raw[:bad.start].decode("utf-8", "replace")) + 1  # in characters, as an editor counts
        fix = first_bytes_hint(raw) or "convert the file, e.g. iconv -f latin1 -t utf-8"
        raise NotJSONLines(f"not UTF-8 text: byte 0x{raw[bad.start]:02x} at column {column} ({fix})") from None
    if raw.lstrip().startswith(b"["):
        raise NotJSONLines("a JSON array, not JSON Lines (one object per line; convert with jq -c '.[]')")
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
