"""The line reader: gzip inflated ahead in a thread gives exactly the lines, numbers and errors of the plain
reader, and the thread never outlives the reading (early stop, an error mid-file, a retry)."""

from __future__ import annotations

import gzip
import sys
import threading
import zlib
from pathlib import Path

import pytest

from oasst_tools import lines as lines_module
from oasst_tools.errors import OasstInputError
from oasst_tools.lines import iter_lines
from oasst_tools.read import iter_raw_trees, read_trees
from tests.core.conftest import BROKEN, FLAT, NESTED


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inflate ahead whatever the size, in 1 KiB reads: a fixture file then spans hundreds of blocks, and lines
    cross block boundaries everywhere."""
    monkeypatch.setattr(lines_module, "AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(lines_module, "READS", (300, 1024))


def _inflaters() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "oasst-inflate"]


def _plain_copy(gz: Path, tmp_path: Path) -> Path:
    plain = tmp_path / gz.name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    return plain


def _gzipped(path: Path, tmp_path: Path, data: bytes | None = None) -> Path:
    out = tmp_path / (path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes() if data is None else data))
    return out


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("ahead", [False, True])
def test_gzip_lines_are_the_plain_files_lines_with_the_same_numbers(tmp_path: Path, ahead: bool):
    for gz in (NESTED, _gzipped(FLAT, tmp_path)):
        plain = _plain_copy(gz, tmp_path)
        assert list(iter_lines(gz, ahead=ahead)) == list(iter_lines(plain))


@pytest.mark.usefixtures("tiny_blocks")
def test_the_threaded_reader_handles_members_blank_lines_and_a_last_line_without_newline(tmp_path: Path):
    text = FLAT.read_bytes()
    cut = text.index(b"\n", len(text) // 2) + 5  # the second member starts inside a line
    data = text[:cut] + b"\n\n" + text[cut:].rstrip(b"\n")
    path = tmp_path / "members.jsonl.gz"
    path.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]))
    plain = tmp_path / "members.jsonl"
    plain.write_bytes(data)
    got = list(iter_lines(path, ahead=True))
    assert got == list(iter_lines(plain))
    assert not got[-1][1].endswith(b"\n") and len(got) == data.count(b"\n") + 1


def test_a_large_file_is_inflated_in_a_thread_and_a_small_one_is_not(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    seen: list[bool] = []
    real = lines_module._in_thread

    def spy(items):  # type: ignore[no-untyped-def]
        seen.append(True)
        return real(items)

    monkeypatch.setattr(lines_module, "_in_thread", spy)
    path = _gzipped(FLAT, tmp_path)
    list(iter_lines(path, ahead=True))
    assert seen == []  # a few KiB: nothing to hide behind a thread
    monkeypatch.setattr(lines_module, "AHEAD_MIN_BYTES", path.stat().st_size)
    list(iter_lines(path, ahead=True))
    list(iter_lines(path))  # ahead=False (shape detection): never a thread
    assert seen == [True]


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("ahead", [False, True])
def test_a_truncated_gzip_fails_at_the_same_line_through_either_reader(ahead: bool):
    path = BROKEN / "truncated.jsonl.gz"
    with pytest.raises(OasstInputError) as err:
        list(iter_lines(path, ahead=ahead))
    assert str(err.value) == f"{path}:21: gzip file is truncated: the stream ends inside this line"
    assert err.value.reason == "truncated_gzip"
    assert _inflaters() == []


@pytest.mark.usefixtures("tiny_blocks")
def test_corrupt_gzip_fails_with_the_same_one_line_error_through_either_reader(tmp_path: Path):
    data = bytearray(gzip.compress(FLAT.read_bytes() * 4))
    data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16  # mid-file: some lines come out first
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    errors = []
    for ahead in (False, True):
        count = 0
        with pytest.raises(OasstInputError) as err:
            for count, _ in iter_lines(path, ahead=ahead):  # noqa: B007
                pass
        errors.append((str(err.value), count))
        assert str(err.value).count("\n") == 0 and err.value.reason == "corrupt_gzip"
    assert errors[0] == errors[1]
    assert errors[0][0].startswith(f"{path}:{errors[0][1] + 1}: gzip data is corrupt (")
    assert errors[0][1] > 0
    assert _inflaters() == []


@pytest.mark.usefixtures("tiny_blocks")
def test_bytes_after_the_last_member_fail_the_same_through_either_reader(tmp_path: Path):
    path = tmp_path / "garbage.jsonl.gz"
    path.write_bytes(gzip.compress(FLAT.read_bytes()) + b"this is not gzip data")
    errors = []
    for ahead in (False, True):
        with pytest.raises(OasstInputError) as err:
            list(iter_lines(path, ahead=ahead))
        errors.append(str(err.value))
        assert err.value.reason == "trailing_gzip" and "\n" not in str(err.value)
    assert errors[0] == errors[1]
    # Named at the line after the last whole one, whichever reader ran.
    after = FLAT.read_bytes().count(b"\n") + 1
    assert errors[0].startswith(f"{path}:{after}: bytes after the end of the gzip data")


@pytest.mark.usefixtures("tiny_blocks")
def test_stopping_early_stops_and_joins_the_thread():
    reader = iter_lines(NESTED, ahead=True)
    assert next(reader)[0] == 1
    assert len(_inflaters()) == 1
    reader.close()
    assert _inflaters() == []


@pytest.mark.usefixtures("tiny_blocks")
def test_an_error_mid_file_leaves_no_thread_behind_while_its_traceback_lives(tmp_path: Path):
    lines = FLAT.read_bytes().splitlines(keepends=True)
    path = _gzipped(FLAT, tmp_path, b"".join(lines[:5] + [b"{not json\n"] + lines[5:] * 3))
    with pytest.raises(OasstInputError, match=":6: invalid JSON") as err:
        list(read_trees(path))
    assert _inflaters() == []  # stopped when the error was raised, not when `err` goes
    assert err.value.line == 6


@pytest.mark.usefixtures("tiny_blocks")
def test_a_consumer_failing_between_trees_leaves_no_thread_once_the_reader_is_dropped():
    def consume() -> None:
        for raw in iter_raw_trees(NESTED):
            raise RuntimeError(f"writer failed at {raw.tree_id}")

    with pytest.raises(RuntimeError):
        consume()
    assert _inflaters() == []


@pytest.mark.usefixtures("tiny_blocks")
def test_trees_read_through_the_threaded_reader_are_the_plain_files_trees(tmp_path: Path):
    flat_gz = _gzipped(FLAT, tmp_path)
    assert list(read_trees(flat_gz)) == list(read_trees(FLAT))
    assert list(read_trees(NESTED)) == list(read_trees(_plain_copy(NESTED, tmp_path)))


def test_an_os_error_in_the_thread_is_raised_to_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing(path, reads):  # type: ignore[no-untyped-def]
        yield 1, b'{"a": 1}\n'
        raise OSError("disk went away")

    monkeypatch.setattr(lines_module, "AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(lines_module, "_inflated_blocks", failing)
    path = _gzipped(FLAT, tmp_path)
    reader = iter_lines(path, ahead=True)
    assert next(reader) == (1, b'{"a": 1}\n')
    with pytest.raises(OSError, match="disk went away"):
        next(reader)
    assert _inflaters() == []


def test_zlib_and_the_inflater_in_use_agree_on_the_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without `isal` the reader falls back to zlib; both must give the same lines and errors."""
    expected = list(iter_lines(NESTED, ahead=True))
    monkeypatch.setattr(lines_module, "_inflate", zlib)
    monkeypatch.setattr(lines_module, "_InflateErrors", (zlib.error,))
    monkeypatch.setattr(lines_module, "AHEAD_MIN_BYTES", 0)
    assert list(iter_lines(NESTED, ahead=True)) == expected
    with pytest.raises(OasstInputError, match=":21: gzip file is truncated"):
        list(iter_lines(BROKEN / "truncated.jsonl.gz", ahead=True))


@pytest.mark.usefixtures("tiny_blocks")
def test_a_corrupt_gzip_through_the_threaded_reader_is_one_error_line_and_no_output(run, tmp_path: Path):
    data = bytearray(gzip.compress(FLAT.read_bytes() * 4))
    data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    switch = sys.getswitchinterval()
    result = run("build", "--input", path, "--out", "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}:") and "gzip data is corrupt (" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert _inflaters() == [] and sys.getswitchinterval() == switch  # the build put the interval back


def _lines_before_damage(data: bytes) -> int:
    """Whole lines zlib inflates from `data` fed one byte at a time, up to the byte where it fails."""
    decomp, out = zlib.decompressobj(31), []
    for i in range(len(data)):
        try:
            out.append(decomp.decompress(data[i:i + 1]))
        except zlib.error:
            break
    return b"".join(out).count(b"\n")


@pytest.mark.parametrize("ahead", [False, True])
def test_damage_late_in_a_real_sized_block_is_named_at_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   ahead: bool):
    """Reads of real size (the fixture is one block): an inflater's failing call returns nothing it inflated, so
    the lines before the damage come from inflating again, and the error names the damaged line, not line 1."""
    monkeypatch.setattr(lines_module, "AHEAD_MIN_BYTES", 0 if ahead else lines_module.AHEAD_MIN_BYTES)
    data = bytearray(gzip.compress(FLAT.read_bytes()))
    at = len(data) * 9 // 10
    data[at:at + 16] = b"\xff" * 16
    path = tmp_path / "late.jsonl.gz"
    path.write_bytes(bytes(data))
    count = 0
    with pytest.raises(OasstInputError) as err:
        for count, _ in iter_lines(path, ahead=ahead):  # noqa: B007
            pass
    expected = _lines_before_damage(bytes(data))
    assert expected > 150 and count == expected
    assert str(err.value).startswith(f"{path}:{expected + 1}: gzip data is corrupt (")
    assert _inflaters() == []


@pytest.mark.parametrize("offset", [-8, -2])  # the CRC-32, the length
def test_a_wrong_gzip_trailer_is_found_after_every_line(tmp_path: Path, offset: int):
    """Only the trailer is wrong: every line inflated comes out, and the error is after the last one."""
    data = bytearray(gzip.compress(FLAT.read_bytes()))
    data[offset] ^= 1
    path = tmp_path / "trailer.jsonl.gz"
    path.write_bytes(bytes(data))
    got = []
    with pytest.raises(OasstInputError) as err:
        got.extend(line for _, line in iter_lines(path))
    assert b"".join(got) == FLAT.read_bytes()
    lines = FLAT.read_bytes().count(b"\n")
    assert str(err.value).startswith(f"{path}:{lines + 1}: gzip data is corrupt: the CRC-32 or length")
    assert err.value.reason == "corrupt_gzip"


def test_skipping_a_damaged_gzip_trailer_keeps_every_tree_but_the_last(run, tmp_path: Path):
    whole = run("build", "--input", FLAT, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    data = bytearray(gzip.compress(FLAT.read_bytes()))
    data[-8] ^= 1
    path = tmp_path / "trailer.jsonl.gz"
    path.write_bytes(bytes(data))
    result = run("build", "--input", path, "--out", tmp_path / "out", "--on-error", "skip")
    assert result.exit_code == 0, result.output
    lines = FLAT.read_bytes().count(b"\n")
    assert f"{path}:{lines + 1}: gzip data is corrupt: the CRC-32" in result.stderr
    rows = [sum(f.read_text().count("\n") for f in (tmp_path / name).glob("*.jsonl")) for name in ("whole", "out")]
    assert rows[0] - 1 <= rows[1] < rows[0]
