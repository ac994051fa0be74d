"""Errors the user can act on: one line naming the file, the line (or row) and what is wrong."""

from __future__ import annotations

from pathlib import Path


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
