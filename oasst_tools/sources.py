"""Where each input comes from, decided before it is read, and opened exactly once.

- `check_input`: a local file or folder (stat'ed, never opened: a FIFO would block), or a plausible hub id
  (`owner/name`, no file suffix, see `hub.hub_candidate`); anything else is a missing path, at once. Two names for
  one file are caught by their (device, inode).
- `open_input`: opens a file once and sniffs its shape from the first records (parsed, not pattern-matched), from
  bytes the reader is then handed again (`lines.Source`): pipes, FIFOs, `/dev/stdin` and `<(zcat x.gz)` work.

Standard library only (orjson when installed).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal

try:
    import orjson

    _loads: Any = orjson.loads
except ImportError:  # pragma: no cover - orjson is a core dependency
    import json

    _loads = json.loads

from oasst_tools.errors import OasstInputError, os_input_error
from oasst_tools.lines import Source, peek_lines

Shape = Literal["flat", "nested", "parquet", "disk", "hub"]

# A `datasets.save_to_disk` folder holds at least one of these (files.saved_dataset_problem checks them).
DATASETS_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")
_SNIFF_RECORDS = 5  # lines tried for a parseable first record before the name decides
_PARQUET_MAGIC = b"PAR1"


class InputInfo:
    """What `check_input` found: kind, an identity to spot the same file named twice, and whether it can be read
    a second time (a pipe cannot: readers group it in memory from the start). A plain class: a dataclass costs
    a millisecond of start-up."""

    __slots__ = ("name", "kind", "identity", "rereadable", "real")

    def __init__(self, name: str, kind: Literal["file", "folder", "hub"], identity: tuple[Any, ...],
                 rereadable: bool, real: str | None) -> None:
        self.name = name
        self.kind = kind
        self.identity = identity
        self.rereadable = rereadable
        self.real = real  # resolved real path of a local input


def check_input(source: str | Path) -> InputInfo:
    """Classify one input without opening it; a missing path that is not a hub id, or an unusable one, raises."""
    name = str(source)
    if not name:  # os.stat("") says "no such file", and the error line would start with ": "
        raise OasstInputError(None, None, "an input path is empty ('')", reason="missing_path")
    try:
        info = os.stat(name)
    except FileNotFoundError:
        from oasst_tools.hub import hub_candidate  # late: only a missing path can be a hub id

        if hub_candidate(name):
            return InputInfo(name, "hub", ("hub", name), True, None)
        raise OasstInputError(name, None, "no such file or directory", reason="missing_path") from None
    except NotADirectoryError:
        raise OasstInputError(name, None, f"not a path to a file: {_file_in_path(name)} is a file, not a folder",
                              reason="bad_path") from None
    except OSError as exc:
        raise os_input_error(exc, name) from None
    real = os.path.realpath(name)
    if stat.S_ISDIR(info.st_mode):
        if not any(os.path.exists(os.path.join(name, f)) for f in DATASETS_FILES):
            raise OasstInputError(name, None, "is a folder but not a `datasets.save_to_disk` folder",
                                  reason="bad_path")
        return InputInfo(name, "folder", (info.st_dev, info.st_ino), True, real)
    return InputInfo(name, "file", (info.st_dev, info.st_ino), stat.S_ISREG(info.st_mode), real)


def _file_in_path(name: str) -> str:
    """The first component of `name` that is a file (what made it ENOTDIR)."""
    for parent in reversed(Path(name).parents):
        if str(parent) not in ("", ".") and parent.is_file():
            return str(parent)
    return "a component"


def open_input(source: str | Path) -> tuple[Shape, Source | None]:
    """(shape, opened source): a file is opened once and sniffed (the caller reads on from the `Source`, whose
    head replays what sniffing read); folders and hub ids give None. Raises `OasstInputError` for what is unusable."""
    info = check_input(source)
    if info.kind == "hub":
        return "hub", None
    if info.kind == "folder":
        return "disk", None
    try:
        src = Source.open(info.name)
    except OSError as exc:
        raise os_input_error(exc, info.name, doing="cannot open") from None
    try:
        return sniff_shape(src), src
    except OSError as exc:
        src.close()
        raise os_input_error(exc, info.name, doing="cannot read") from None
    except BaseException:
        src.close()
        raise


def sniff_shape(src: Source) -> Literal["flat", "nested", "parquet"]:
    """The shape of an opened file: parquet by name or magic bytes; else the first record that parses decides
    (a tree object has `prompt` and no `message_id`), whatever its length; else the name (`*.trees.*`)."""
    if src.name.endswith(".parquet") or src.peek(4) == _PARQUET_MAGIC:
        return "parquet"
    tried = 0
    for raw in peek_lines(src):
        if not raw.strip():
            continue
        record = _parse(raw)
        if type(record) is dict:
            return "nested" if "prompt" in record and "message_id" not in record else "flat"
        tried += 1
        if tried == _SNIFF_RECORDS:
            break
    return "nested" if ".trees." in Path(src.name).name else "flat"


def _parse(raw: bytes) -> Any:
    """The JSON value of a line, or None when it is not valid JSON (the reader reports that, at its line)."""
    try:
        return _loads(raw)
    except ValueError as exc:
        text = str(exc).lower()
        if "depth limit" not in text and "recursion" not in text:
            return None
    from oasst_tools import deepjson  # late: only lines nested past orjson's limit need it

    try:
        return deepjson.loads(raw)
    except ValueError:
        return None


def input_size(source: str | Path) -> int:
    """Bytes a progress bar should expect for `source` (0 when unknown: a pipe, a hub id, an unreadable path)."""
    try:
        info = os.stat(source)
        if stat.S_ISREG(info.st_mode):
            return info.st_size
        if stat.S_ISDIR(info.st_mode):
            return sum(f.stat().st_size for f in Path(source).rglob("*") if f.is_file())
    except OSError:
        pass
    return 0
