"""What every hostile-input test asserts, whatever the command: one `error:` line, exit 1, no traceback, inputs
byte-identical afterwards, nothing left behind.

    before = snapshot(tmp_path)                   # every file under the folder, with its bytes and mode
    result = run("build", "--input", bad, "--out", "out")
    assert_refused(result, names=bad)             # exit 1, one `error:` line that names the file, no traceback
    assert_unchanged(before, tmp_path)            # inputs untouched, no output and no temp folder left

Standard library only, so every test folder (core, train, eval) can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Snapshot = dict[str, tuple[int, bytes | str]]


@dataclass
class Ran:
    """A finished subprocess in the shape of click's Result, so `assert_refused` reads both."""

    exit_code: int
    stdout: str
    stderr: str
    exception: None = None

    @property
    def output(self) -> str:
        """stdout then stderr, as click's Result.output."""
        return self.stdout + self.stderr


def snapshot(root: Path) -> Snapshot:
    """Relative path -> (mode, bytes) of every file under `root` (a symlink's target path instead of bytes)."""
    found: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = (0, os.readlink(path))
            elif path.is_file():
                found[rel] = (path.stat().st_mode, path.read_bytes())
            elif path.is_dir():
                found[rel + "/"] = (path.stat().st_mode, b"")
    return found


def assert_unchanged(before: Snapshot, root: Path, *, allowed_new: tuple[str, ...] = ()) -> None:
    """Every file of `before` is still there with the same bytes and mode, and nothing new appeared except
    paths starting with one of `allowed_new` (e.g. the output of a command that succeeded)."""
    after = snapshot(root)
    changed = [p for p in before if p not in after or after[p] != before[p]]
    assert not changed, f"inputs changed or removed: {changed}"
    new = [p for p in after if p not in before and not p.startswith(allowed_new)]
    assert not new, f"left behind: {new}"


def assert_refused(result: Any, *, names: object | None = None, code: int = 1) -> str:
    """The single `error:` line of a refused command (exit `code`, no traceback; click's `Error:` line for usage
    errors, exit 2); when `names` is given, the line must mention it (a path: as typed on the command line)."""
    output = result.output
    assert result.exit_code == code, f"exit {result.exit_code}: {output}"
    assert "Traceback" not in output, output
    exc = getattr(result, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), f"{type(exc).__name__}: {exc}"
    # Usage errors (exit 2) keep click's own `Error: ...` line under its usage text.
    prefix = "Error: " if code == 2 else "error: "
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, result.stderr
    if names is not None:
        assert str(names) in errors[0], errors[0]
    return errors[0]
