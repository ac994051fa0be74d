"""Raw lines of a `.jsonl` or `.jsonl.gz` file, numbered from 1, with one-line errors for a cut or corrupt gzip.

Each input is opened once (`Source`): the bytes read to sniff it (gzip magic, the first records) are kept and
replayed to the line reader, so a pipe, a FIFO, `/dev/stdin` or `<(zcat x.jsonl.gz)` is read exactly once. Gzip is
recognized by its magic bytes (or a `.gz` name); zero padding after the last member is accepted, as `gzip -t` does.

A large gzip file is inflated ahead, in a background thread, at most `AHEAD_DEPTH` blocks ahead of the reader:
ISA-L (`isal`, optional) and zlib release the GIL while they inflate, so on two cores the inflating hides behind
the JSON parsing that the caller does with the lines (about 0.3 s of the 1.9 s an OASST1-sized export takes).
Standard library only, plus `isal` when it is installed.

    for number, line in iter_lines(Path("trees.jsonl.gz"), ahead=True): ...
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from itertools import chain, islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

try:  # ISA-L inflates gzip 2.4x faster than zlib (0.31 s vs 0.74 s for an OASST1-sized export); optional
    from isal import isal_zlib as _inflate

    _InflateErrors: tuple[type[Exception], ...] = (_inflate.error, zlib.error)
except ImportError:
    _inflate = zlib  # type: ignore[assignment]
    _InflateErrors = (zlib.error,)

from oasst_tools.errors import OasstInputError

Progress = Callable[[int], None]
T = TypeVar("T")

_CHUNK = 1 << 20
# Compressed bytes per read: a small first block, so parsing starts early, then 1 MiB (about 4 MiB of JSON).
READS = (_CHUNK // 4, _CHUNK)
# Smaller gzip files are inflated in the reading thread: they are one or two blocks, nothing to overlap.
AHEAD_MIN_BYTES = _CHUNK
# Inflated blocks waiting for the reader: bounds the memory the thread can run ahead by (about 12 MiB).
AHEAD_DEPTH = 3
GZIP_MAGIC = b"\x1f\x8b"
# Bytes per read while sniffing the start of an input, doubled per read (a nested tree's first line can be MBs).
_SNIFF = 1 << 16
# A first line longer than this is no JSON Lines file (a binary file, /dev/zero): refused before it fills memory.
MAX_FIRST_LINE = 64 << 20


class _BadGzip(Exception):
    """A gzip problem found while inflating; the line reader adds the path and the line it had reached."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.reason = reason


class Source:
    """An input file opened once. What is read to sniff it stays in `head`, and `read` hands it out again first,
    so a pipe is read once; `regular` is False for a pipe, a FIFO or a terminal (no size, no seeking)."""

    def __init__(self, name: str, fh: BinaryIO, regular: bool, size: int) -> None:
        self.name = name
        self.fh = fh
        self.regular = regular
        self.size = size
        self._head: list[bytes] = []
        self._eof = False

    @classmethod
    def open(cls, path: str | Path) -> Source:
        """Open `path` for reading (blocks on a FIFO until a writer opens it, as `cat` does)."""
        fh = open(path, "rb", buffering=_CHUNK)
        try:
            info = os.fstat(fh.fileno())
        except BaseException:
            fh.close()
            raise
        regular = stat.S_ISREG(info.st_mode)
        return cls(str(path), fh, regular, info.st_size if regular else 0)  # type: ignore[arg-type]

    def fill(self, size: int) -> bytes:
        """Read up to `size` more bytes into the head (one read: what a pipe has); b"" at the end of the input."""
        if self._eof:
            return b""
        chunk = self.fh.read1(size)  # type: ignore[attr-defined]
        if chunk:
            self._head.append(chunk)
        else:
            self._eof = True
        return chunk

    def head(self) -> bytes:
        """The bytes sniffed so far (kept for the reader)."""
        if len(self._head) > 1:
            self._head = [b"".join(self._head)]
        return self._head[0] if self._head else b""

    def take_head(self) -> bytes:
        """The sniffed bytes, handed over once: the reader goes on with the file after them."""
        data = self.head()
        self._head = []
        return data

    def read(self, size: int) -> bytes:
        """The head first (whole), then up to `size` bytes per call; b"" at the end."""
        if self._head:
            return self.take_head()
        return self.fh.read(size)

    def peek(self, size: int) -> bytes:
        """The first `size` bytes of the input (fewer at its end), read into the head if need be."""
        while len(self.head()) < size and self.fill(size):
            pass
        return self.head()[:size]

    def is_gzip(self) -> bool:
        """Gzip by its magic bytes, on any input; or by a `.gz` name (a damaged header is then reported as such)."""
        return self.peek(2) == GZIP_MAGIC or self.name.endswith(".gz")

    def close(self) -> None:
        """Close the file (idempotent)."""
        self.fh.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peek_lines(src: Source) -> Iterator[bytes]:
    """Complete lines from the start of `src`, inflated when it is gzip, read into its head (which the line
    reader replays): shape detection looks at the first records without consuming them. Stops quietly at a
    gzip error (the reader reports it, with its line) and at the end of the input; raises `OasstInputError` for a
    line longer than `MAX_FIRST_LINE`."""
    decomp = _inflate.decompressobj(31) if src.is_gzip() else None
    first = src.head()
    parts: list[bytes] = []
    partial = 0  # bytes of the line not yet ended
    size = _SNIFF
    while True:
        chunk, first = (first, b"") if first else (src.fill(size), b"")
        if not chunk:
            if parts and b"".join(parts).strip():
                yield b"".join(parts)
            return
        size = min(size * 2, 16 * _CHUNK)
        if decomp is not None:
            try:
                data = decomp.decompress(chunk)
                while decomp.eof and decomp.unused_data.strip(b"\0"):
                    rest = decomp.unused_data.lstrip(b"\0")
                    decomp = _inflate.decompressobj(31)
                    data += decomp.decompress(rest)
            except _InflateErrors:
                return
            chunk = data
        if b"\n" not in chunk:  # one partial line growing: join once it ends, not per read
            parts.append(chunk)
            partial += len(chunk)
            if partial > MAX_FIRST_LINE:
                raise OasstInputError(src.name, None, f"no line end in the first {MAX_FIRST_LINE >> 20} MiB: not a "
                                      "JSON Lines file", reason="invalid_json")
            continue
        lines = BytesIO(b"".join(parts) + chunk).readlines()
        parts = [] if lines[-1].endswith(b"\n") else [lines.pop()]
        partial = len(parts[0]) if parts else 0
        yield from lines


def iter_lines(source: Path | Source, progress: Progress | None = None,
               ahead: bool = False) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes with its b"\\n") for every line, gunzipping gzip input (in a thread when `ahead` and
    the input is a large regular file). A `Source` is read on from where sniffing left it, its head replayed."""
    src = source if isinstance(source, Source) else Source.open(source)
    try:
        gz = src.is_gzip()
    except BaseException:
        src.close()
        raise
    if gz:
        return _gzip_lines(src, progress, ahead and src.regular and src.size >= AHEAD_MIN_BYTES)
    if progress is None:
        return FileLines(src)
    return _plain_lines(src, progress)


class FileLines:
    """The lines of a plain file when no progress is reported: `enumerate` over the file, chained after the
    replayed head, so no Python frame runs per line (the generator's cost about 15 ms of an OASST1-sized flat
    export). `raw` is the same lines without numbers; `close` closes the file, as closing a generator does."""

    def __init__(self, src: Source) -> None:
        self.src = src
        try:
            lines = BytesIO(src.take_head()).readlines()
            if lines and not lines[-1].endswith(b"\n"):
                lines[-1] += src.fh.readline()  # the sniffed head ends inside a line: finish it from the file
        except BaseException:
            src.close()
            raise
        self.raw: Iterator[bytes] = chain(lines, src.fh)
        self._lines = enumerate(self.raw, 1)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return self._lines

    def __next__(self) -> tuple[int, bytes]:
        return next(self._lines)

    def reread(self, number: int) -> bytes:
        """Line `number` again, from the file (a regular file: the line a C-level consumer could not keep)."""
        with open(self.src.name, "rb") as fh:
            return next(islice(fh, number - 1, None), b"")

    def close(self) -> None:
        """Close the file."""
        self.src.close()


def _plain_lines(src: Source, progress: Progress | None) -> Iterator[tuple[int, bytes]]:
    fh = src.fh
    number = 0
    try:
        head = src.take_head()
        if head:  # sniffed already: replay it, then go on with the file
            lines = BytesIO(head).readlines()
            pending = b"" if lines[-1].endswith(b"\n") else lines.pop()
            for line in lines:
                number += 1
                yield number, line
            if pending:
                number += 1
                yield number, pending + fh.readline()
        if not src.regular:  # a pipe: no position to ask for, count the bytes instead
            count = 0
            for number, line in enumerate(fh, number + 1):
                if progress is not None:
                    count += len(line)
                    if not number & 4095:
                        progress(count)
                        count = 0
                yield number, line
            if progress is not None:
                progress(count)
            return
        reported = 0
        for number, line in enumerate(fh, number + 1):  # C-level line splitting over a large buffer
            if progress is not None and not number & 4095:
                position = fh.tell()
                progress(position - reported)
                reported = position
            yield number, line
        if progress is not None:
            progress(fh.tell() - reported)
    finally:
        src.close()


def _gzip_lines(src: Source, progress: Progress | None, ahead: bool) -> Iterator[tuple[int, bytes]]:
    # Own decompression loop rather than gzip.open: a cut stream must be reported at the line it cuts.
    blocks = _in_thread(_inflated_blocks(src, READS)) if ahead else _inflated_blocks(src, READS)
    pending = b""
    number = 0
    try:
        for size, data in blocks:
            if progress is not None:
                progress(size)
            if not data:
                continue
            # Lines keep their b"\n", as a plain file's do. readlines finds them with memchr; bytes.split
            # compares byte by byte (0.1 s of an OASST1-sized export).
            lines = BytesIO(data).readlines()
            lines[0] = pending + lines[0]
            pending = b"" if lines[-1].endswith(b"\n") else lines.pop()
            for line in lines:
                number += 1
                yield number, line
    except _BadGzip as exc:
        if exc.reason == "trailing_gzip" and pending.strip():
            # Every byte before the junk inflated: a last line without its newline is whole; it comes first.
            number += 1
            yield number, pending
        raise OasstInputError(src.name, number + 1, exc.msg, reason=exc.reason) from None
    finally:
        blocks.close()  # stops and joins the thread when the caller stops reading early
        src.close()
    if pending.strip():
        yield number + 1, pending


def _inflated_blocks(src: Source, reads: tuple[int, ...]) -> Iterator[tuple[int, bytes]]:
    """(compressed size, inflated bytes) per read of `reads[i]` bytes (the last size repeats); raises
    `_BadGzip` for corrupt or truncated data. Zero bytes after a member are padding (gzip and `gzip -t` skip
    them), not a new member."""
    decomp = _inflate.decompressobj(31)
    sizes = iter(reads)
    size = next(sizes)
    first = True
    produced = 0  # inflated bytes handed out so far: where a salvage after an error goes on from
    while block := src.read(size):
        size = next(sizes, size)
        if first and not block.startswith(GZIP_MAGIC[:len(block)]):  # a pipe may hand over one byte first
            # zlib's own complaint depends on the length (a short file reads as "truncated"): say what it is.
            raise _BadGzip("not a gzip file (read as gzip, but without gzip's first bytes)", "corrupt_gzip")
        first = False
        try:
            if decomp is None:  # after a complete member: padding, or the next member
                rest = block.lstrip(b"\0")
                if not rest:
                    yield len(block), b""
                    continue
                _check_member(rest)
                decomp = _inflate.decompressobj(31)
                data = decomp.decompress(rest)
            else:
                data = decomp.decompress(block)
            while decomp.eof:  # concatenated gzip members, or padding
                rest = decomp.unused_data.lstrip(b"\0")
                if not rest:
                    decomp = None
                    break
                if not rest.startswith(GZIP_MAGIC[:len(rest)]):
                    # Bytes that start no member after a complete one: the lines so far are read first, so the
                    # error names the line after the last whole one.
                    produced += len(data)
                    yield len(block), data
                    _check_member(rest)
                decomp = _inflate.decompressobj(31)
                data += decomp.decompress(rest)
        except _InflateErrors as exc:
            # A failing call returns none of what it inflated (up to 4 MiB of lines before the damage): a regular
            # file is inflated again in small steps, so the error names the line the damage is in.
            data, problem = _salvage(src, produced) if src.regular else (b"", f"gzip data is corrupt ({exc})")
            yield len(block), data
            raise _BadGzip(problem, "corrupt_gzip") from None
        produced += len(data)
        yield len(block), data
    if decomp is not None and not decomp.eof:
        raise _BadGzip("gzip file is truncated: the stream ends inside this line", "truncated_gzip")


def _salvage(src: Source, skip: int) -> tuple[bytes, str]:
    """(the inflated bytes after the first `skip` up to where the data goes bad, what is wrong), inflating the
    whole file again with zlib: raw deflate per member (its gzip header read here), so a wrong checksum or length
    in a member's trailer is found after every byte of it came out, and a damaged deflate stream is re-inflated
    one output byte at a time from the last good step, so at most one byte of the damaged line is lost."""
    kept: list[bytes] = []
    seen = 0

    def keep(piece: bytes) -> None:
        nonlocal seen
        if seen + len(piece) > skip:
            kept.append(piece[max(0, skip - seen):])
        seen += len(piece)

    with mmap.mmap(src.fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            problem = _reinflate(view, keep)
        finally:
            view.release()
    return b"".join(kept), problem


def _reinflate(data: memoryview, keep: Callable[[bytes], None]) -> str:
    """Hand every inflated piece of the gzip members in `data` to `keep`, up to the first problem; returns it."""
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:  # zero padding between or after members
            pos += 1
            continue
        start = _member_start(data, pos)
        if start is None:
            return "gzip data is corrupt (a damaged gzip member header)"
        pos = start
        decomp = zlib.decompressobj(-zlib.MAX_WBITS)
        crc = length = 0
        while not decomp.eof:
            if pos >= end:
                return "gzip file is truncated: the stream ends inside this line"
            chunk = data[pos:pos + _CHUNK]
            saved = decomp.copy()
            try:
                piece = decomp.decompress(chunk)
            except zlib.error:
                return _pinpoint(saved, chunk, keep)
            keep(piece)
            crc, length = zlib.crc32(piece, crc), length + len(piece)
            pos += len(chunk) - len(decomp.unused_data)
        trailer = bytes(data[pos:pos + 8])
        if len(trailer) < 8:
            return "gzip file is truncated: its last member ends without the CRC-32 and length of its data"
        if int.from_bytes(trailer[:4], "little") != crc or int.from_bytes(trailer[4:], "little") != length & 0xFFFFFFFF:
            return ("gzip data is corrupt: the CRC-32 or length at the end of a member does not match its data, "
                    "which inflated whole up to here (damaged data or trailer)")
        pos += 8
    return "gzip data is corrupt (zlib inflates it whole; the faster inflater in use refused it)"


def _pinpoint(decomp: Any, chunk: memoryview, keep: Callable[[bytes], None]) -> str:
    """Inflate `chunk`, on which `decomp` (a state before it) fails, handing `keep` every byte before the failing
    one: 4 KiB of input per step, then the failing step again one output byte per call; returns zlib's error."""
    for start in range(0, len(chunk), 4096):
        saved = decomp.copy()
        try:
            keep(decomp.decompress(chunk[start:start + 4096]))
            continue
        except zlib.error:
            decomp, tail = saved, bytes(chunk[start:start + 4096])
        while True:
            try:
                piece = decomp.decompress(tail, 1)
            except zlib.error as exc:
                return f"gzip data is corrupt ({exc})"
            keep(piece)
            tail = decomp.unconsumed_tail
            if decomp.eof or not (tail or piece):
                break
    return "gzip data is corrupt (inflating it again gave a different result)"


def _member_start(data: memoryview, pos: int) -> int | None:
    """Where the deflate data of the gzip member whose header starts at `pos` begins, or None for a bad header."""
    header = bytes(data[pos:pos + 10])
    if len(header) < 10 or header[:3] != b"\x1f\x8b\x08":
        return None
    flags, pos = header[3], pos + 10
    if flags & 4:  # FEXTRA: a two-byte length, then that many bytes
        pos += 2 + int.from_bytes(bytes(data[pos:pos + 2]), "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            zero = bytes(data[pos:pos + (1 << 16)]).find(b"\0")
            if zero < 0:
                return None
            pos += zero + 1
    if flags & 2:  # FHCRC
        pos += 2
    return pos if pos <= len(data) else None


def _check_member(data: bytes) -> None:
    """Raise `_BadGzip` when `data`, found after a complete gzip member, starts no new member."""
    if not data.startswith(GZIP_MAGIC[:len(data)]):
        raise _BadGzip("bytes after the end of the gzip data start no gzip member (trailing garbage); the lines "
                       "before this one are whole", "trailing_gzip")


_END = object()


def _in_thread(items: Iterator[T], depth: int = AHEAD_DEPTH) -> Iterator[T]:
    """`items`, produced by a background thread at most `depth` items ahead; an exception it raises is raised
    here, after the items before it. Closing this generator (or dropping it) stops the thread and joins it."""
    import queue  # late: only large gzip files need it

    handoff: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.05)  # wakes as soon as the reader takes an item
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed over to the reader, which raises it
            put((_END, exc))
        finally:
            items.close()

    worker = threading.Thread(target=produce, name="oasst-inflate", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item, exc = handoff.get(timeout=1.0)
            except queue.Empty:
                if not worker.is_alive() and handoff.empty():
                    raise RuntimeError("the inflating thread stopped without a result") from None
                continue
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while worker.is_alive():
            try:  # free a slot: a producer blocked on a full queue sees `stop` within its put timeout
                handoff.get_nowait()
            except queue.Empty:
                pass
            worker.join(0.01)
