"""Errors the user can act on: one line naming the file, the line (or row) and what is wrong."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


class OasstError(Exception):
    """An error the CLI prints as one line (`error: ...`) and exits 1, without a traceback."""


class OasstInputError(OasstError):
    """Bad input at a known place: `PATH:LINE: message` (LINE is a row number for parquet)."""

    def __init__(self, path: str | Path | None, line: int | None, msg: str, *, reason: str = "invalid") -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.msg = msg
        self.reason = reason  # short key used to count skipped records by cause in lenient mode
        super().__init__(self.location() + msg)

    def location(self) -> str:
        """`PATH:LINE: ` (or `PATH: `, or nothing) for the start of the error line."""
        if self.path is None:
            return ""
        return f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "


class NotContiguousError(OasstInputError):
    """A flat file whose trees are interleaved: the streaming reader cannot group them in one pass."""


# What the user can do about the common OS errors; anything else keeps the system's own words.
_OS_HINTS = {
    "ENOSPC": "no space left on device",
    "EDQUOT": "disk quota exceeded",
    "EFBIG": "file too large (the file-size limit, `ulimit -f`, was reached)",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "ENOTDIR": "a component of the path is not a folder",
    "EISDIR": "is a folder",
    "ENOENT": "no such file or directory",
    "ENAMETOOLONG": "file name too long",
    "ELOOP": "too many levels of symbolic links",
    "EIO": "input/output error",
}


def describe_os_error(exc: OSError) -> str:
    """A short lower-case reason for an `OSError` ("permission denied", "no space left on device", ...)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    return _OS_HINTS.get(name) or (exc.strerror or str(exc) or type(exc).__name__).lower()


def os_error_text(exc: OSError) -> str:
    """`PATH: reason` for an OSError (`PATH -> OTHER: reason` for a rename), or the reason alone without a path."""
    import os

    reason = describe_os_error(exc)
    if exc.filename is None:
        return reason
    where = str(os.fsdecode(exc.filename))
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


def os_input_error(exc: OSError, path: str | Path, line: int | None = None, doing: str = "") -> OasstInputError:
    """An `OasstInputError` for an OS error on `path` (as the user typed it), e.g. `x.jsonl: cannot read: ...`."""
    return OasstInputError(path, line, f"{doing}: {describe_os_error(exc)}" if doing else describe_os_error(exc),
                           reason="os_error")


# Control characters (C0 but tab, DEL, C1) and the bidirectional overrides: text from the data that would clear
# the screen, set the window title or reorder the line when printed as it is (`\x1b[2J`, U+202E).
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with control characters and bidi overrides shown as escapes (`\\x1b`, `\\n`, `\\u202e`): one line,
    and nothing in it that a terminal would act on."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in "\n\r":
        return "\\n" if char == "\n" else "\\r"
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def kind(value: Any) -> str:
    """How a JSON value is called in messages: `a number`, `null`, `an object`..."""
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


# What a file's first bytes say it is when it is not UTF-8 text: (first bytes, what to say), longest first.
OTHER_FORMATS = (
    (b"\xff\xfe\x00\x00", "UTF-32 text, by its byte-order mark: convert it, e.g. iconv -f utf-32 -t utf-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text, by its byte-order mark: convert it, e.g. iconv -f utf-32 -t utf-8"),
    (b"\xfd7zXZ\x00", "an xz-compressed file: decompress it first (unxz); of compressed files only gzip is read"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file: decompress it first (unzstd); of compressed files only gzip is "
                          "read"),
    (b"PK\x03\x04", "a zip archive: unpack it first; of compressed files only gzip is read"),
    (b"BZh", "a bzip2-compressed file: decompress it first (bunzip2); of compressed files only gzip is read"),
    (b"\xff\xfe", "UTF-16 text, by its byte-order mark: convert it, e.g. iconv -f utf-16 -t utf-8"),
    (b"\xfe\xff", "UTF-16 text, by its byte-order mark: convert it, e.g. iconv -f utf-16 -t utf-8"),
    # Met only after one gzip layer was taken off (a plain gzip file is read by its magic bytes): compressed twice.
    (b"\x1f\x8b", "gzip data inside the gzip data: it was compressed twice; decompress it once (zcat) and read that"),
    (b"PAR1", "a Parquet file: decompress it if compressed, and name it .parquet"),
)


def first_bytes_hint(data: bytes) -> str | None:
    """What a file that is not UTF-8 text is, by its first bytes (`data`), and how to read it; None if unknown."""
    return next((what for magic, what in OTHER_FORMATS if data.startswith(magic)), None)


_DIGITS = re.compile(r"[0-9]{1,18}")


def whole_number(text: str) -> int | None:
    """`text` as a whole number when it is 1-18 ASCII digits, else None. `str.isdigit` also takes "²" and "٣",
    which `int()` then refuses or reads, and `int()` alone takes " 1 " and "1_0"."""
    return int(text) if _DIGITS.fullmatch(text) else None


def shown(value: Any) -> str:
    """`repr(value)` cut to a readable length for an error line: a YAML list of 20,000 items (or one made of
    aliases, whose full repr never ends) shows its first items and `...`."""
    import reprlib

    short = reprlib.Repr()  # limits as attributes: Python 3.11's constructor takes none
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, 60, 60, 40
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 4
    return clipped(short.repr(value))


def clipped(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters, the last three `...`, for a value quoted in a message line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
