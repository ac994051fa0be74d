"""The output folder of `oasst build`: never lose or corrupt what is already on disk.

- `check_out`, before anything is read: refuses an --out that is an input, contains one, lies inside an input
  folder, is a symlink, is `/`, the home folder, the current folder or one above it; an existing --out is replaced
  only with --overwrite and only when it carries the marker every build writes (`.oasst-build`).
- `temp_folder`: the build writes into `.{out}.tmp-{pid}-{random}` beside --out (made with the umask, like any
  tool's output), marker first; `clean_stale` removes such folders left by a build that was killed (its process
  is gone).
- `publish`: renames the finished folder into place. Without --overwrite the rename fails if --out appeared
  meanwhile (a non-empty folder is never replaced by `rename(2)`), so of two racing builds the second fails; with
  --overwrite the old folder is moved aside only once the new one is complete, and removed after.
- `signals_as_errors`: SIGINT and SIGTERM raise `Interrupted` in the build, so its `finally` removes the temp folder.
- `run_lock`: what `oasst train` holds on its --out while it writes there in place (checkpoints, a --resume), so
  that a second run into the same folder fails at once instead of both writing it.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from oasst_tools.errors import OasstError, describe_os_error, whole_number
from oasst_tools.files import optional_json
from oasst_tools.sources import InputInfo

MARKER = ".oasst-build"
LOCK = ".oasst-lock"
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)  # what flock(LOCK_NB) says for a lock another one holds
_TMP, _OLD = ".tmp-", ".old-"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what a user (Ctrl-C) or a scheduler (kill) stops a run with
# What rename(2) of a folder says when its target is there and not an empty folder: the output another program made.
RENAME_BLOCKED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
_STEM_BYTES = 200  # of 255: a dot, the kind, a pid and 8 hex digits follow


class Interrupted(OasstError):
    """The build got SIGINT or SIGTERM; what it had written is removed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing written")


def check_out(out: Path, inputs: Iterable[InputInfo], overwrite: bool) -> None:
    """Raise `OasstError` for an --out that a build could not write without losing data; compares resolved real
    paths, so symlinks and `..` spellings are caught. Reads no input."""
    name = str(out)
    if name.startswith("~"):
        raise OasstError(f"--out {name}: starts with '~', which the shell did not expand; write the folder's path")
    real = os.path.realpath(out)
    home = os.path.realpath(os.path.expanduser("~"))
    cwd = os.path.realpath(os.getcwd())
    for place, what in ((os.path.realpath(os.sep), "the root folder"), (home, "your home folder"),
                        (cwd, "the current folder")):
        if real == place:
            raise OasstError(f"--out {name} is {what}; the build replaces its --out as a whole: choose a new folder")
    if _under(cwd, real):
        raise OasstError(f"--out {name} contains the current folder; choose a new folder")
    if out.name in ("", ".", ".."):
        raise OasstError(f"--out {name}: name the output folder itself (not '.' or '..')")
    try:
        out_id = os.stat(out)
        identity = (out_id.st_dev, out_id.st_ino)
    except OSError:
        identity = None
    for info in inputs:
        if info.real is None:
            continue  # a hub id
        if info.real == real or (identity is not None and info.identity == identity):
            raise OasstError(f"--out {name} is the input {info.name}; choose another --out")
        if _under(info.real, real):
            raise OasstError(f"--out {name} contains the input {info.name}; choose another --out")
        if _under(real, info.real):
            what = "folder" if info.kind == "folder" else "file (not a folder)"
            raise OasstError(f"--out {name} lies inside the input {what} {info.name}; choose another --out")
    if not os.path.lexists(out):
        return
    if os.path.islink(out):
        raise OasstError(f"--out {name} is a symbolic link; pass the folder itself or another --out")
    if not os.path.isdir(out):
        raise OasstError(f"{name}: exists and is not a folder; choose another --out")
    if not overwrite:
        raise OasstError(f"{name}: output folder exists; pass --overwrite to replace it")
    if not is_build_output(out):
        raise OasstError(f"{name}: exists but was not written by oasst build (no {MARKER} marker), so --overwrite "
                         "will not replace it; remove it yourself or choose another --out")


def check_apart(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]], flag: str = "--out") -> None:
    """Refuse an output path that is, contains or lies inside one of `inputs` ((flag, path) pairs; empty values,
    hub ids and paths that do not exist are skipped): `oasst train`, `merge` and `eval` would otherwise mix their
    files into what they read, or put them where a later `oasst build --overwrite` of that input deletes them."""
    real = os.path.realpath(out)
    for what, given in inputs:
        if not given or not os.path.exists(given):
            continue
        place = os.path.realpath(given)
        if place == real:
            raise OasstError(f"{flag} {out} is the input {what} {given}; choose another {flag}")
        if _under(place, real):
            raise OasstError(f"{flag} {out} contains the input {what} {given}; choose another {flag}")
        if _under(real, place):
            raise OasstError(f"{flag} {out} lies inside the input {what} {given}; choose another {flag}")


def _under(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def is_build_output(folder: Path) -> bool:
    """True for a real folder (not a symlink) that holds the marker a build writes."""
    return not os.path.islink(folder) and os.path.isdir(folder) and os.path.isfile(folder / MARKER)


def _version() -> str:
    # The installed distribution's folder name, as importlib.metadata would find it (which costs 35 ms to import).
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for dist in names:
            if dist.startswith("oasst_tools-") and dist.endswith(".dist-info"):
                return dist[len("oasst_tools-"):-len(".dist-info")]
    return "unknown"


@contextmanager
def parents_made(out: Path) -> Iterator[None]:
    """The missing folders above `out` made for the block, and removed again (when still empty) if it fails: a
    build that writes nothing leaves nothing, not even `new/a/b`."""
    made = [parent for parent in out.parents if not parent.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, out) from None
    try:
        yield
    except BaseException:
        _remove_made(made)
        raise


def _stem(out: Path) -> str:
    """`out`'s name in the names of its temp and set-aside folders: long names shortened (with a hash of the whole
    name) so that the suffix still fits the file system's 255 bytes."""
    name = out.name
    if len(name.encode("utf-8", "surrogateescape")) <= _STEM_BYTES:
        return name
    import hashlib

    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return name.encode("utf-8", "surrogateescape")[:_STEM_BYTES - 13].decode("utf-8", "ignore") + "~" + digest


def temp_folder(out: Path) -> Path:
    """A new folder beside `out` for the build to write into (mode from the umask), the marker already in it."""
    tmp = out.parent / f".{_stem(out)}{_TMP}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp)  # 0o777 minus the umask, where tempfile.mkdtemp would make it 0o700
    marker = {"tool": "oasst-tools", "version": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "pid": os.getpid(), "host": _host()}
    (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return tmp


def clean_stale(out: Path) -> list[Path]:
    """Remove the temp and set-aside folders of `out` left by builds that were killed (their process is gone, on
    this host); returns them. A set-aside old output with no --out in its place, whose build was killed between
    its two renames (its temp folder is still there), is put back instead."""
    parent = out.parent
    try:
        names = os.listdir(parent)
    except OSError:
        return []

    def kind_and_pid(entry: str) -> tuple[str | None, str]:
        kind = next((k for k in (_TMP, _OLD) if entry.startswith(f".{_stem(out)}{k}")), None)
        return kind, entry[len(_stem(out)) + 1 + len(kind or ""):].partition("-")[0]

    # A build killed while it removed the set-aside old output (after its new one was in place) has no temp folder
    # left: that half-removed old output must not come back if --out was deleted since.
    unpublished = {pid for kind, pid in map(kind_and_pid, names) if kind == _TMP}
    cleaned = []
    for entry in sorted(names):
        kind, pid = kind_and_pid(entry)
        if kind is None:
            continue
        path = parent / entry
        number = whole_number(pid)
        if number is None or _alive(number) or not (is_build_output(path) or _empty(path)):
            continue
        if not _this_host(path):
            continue
        if kind == _OLD and pid in unpublished and not os.path.lexists(out):
            try:
                os.rename(path, out)  # killed between its two renames: the old output comes back
                cleaned.append(path)
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)
        cleaned.append(path)
    return cleaned


def _empty(folder: Path) -> bool:
    """An empty real folder (a build killed before it wrote its marker)."""
    try:
        return not os.path.islink(folder) and not os.listdir(folder)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return _alive_on_windows(pid)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id reaches
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _alive_on_windows(pid: int) -> bool:
    """Whether process `pid` runs; os.kill(pid, 0) is no probe on Windows (signal 0 is CTRL_C_EVENT)."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # type: ignore[attr-defined]  # ERROR_ACCESS_DENIED: it exists
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _this_host(folder: Path) -> bool:
    """False when the marker names another host (a shared file system): its pid means nothing here."""
    marker = optional_json(folder / MARKER)
    host = marker.get("host") if isinstance(marker, dict) else None
    return not host or not _host() or host == _host()


def publish(tmp: Path, out: Path, overwrite: bool, done: Callable[[], None] | None = None) -> None:
    """Move the finished `tmp` to `out`; an old `out` (a build output: checked again now) is removed only once the
    new one is in place. Fails, replacing nothing, when --out appeared or changed since the build began. `done` is
    called once the output is in place, before SIGINT and SIGTERM are let through again."""
    with signals_held():
        try:
            if not os.path.lexists(out):
                os.rename(tmp, out)  # rename(2) never replaces a non-empty folder: a racing build's output stays
                if done is not None:
                    done()
                return
        except OSError as exc:
            if exc.errno not in RENAME_BLOCKED:
                raise
        if not overwrite:
            raise OasstError(f"{out}: written by another build (or program) while this one ran; nothing replaced "
                             "(pass --overwrite to replace it)")
        if not is_build_output(out):
            raise OasstError(f"{out}: replaced by something that is not an oasst build output while this build "
                             "ran; nothing replaced")
        old = out.parent / f".{_stem(out)}{_OLD}{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            try:
                os.rename(old, out)
            except OSError:
                pass
            raise OasstError(f"{out}: written by another build while this one ran; nothing replaced") from None
        if done is not None:
            done()
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _handled(handler: Callable[[int, list[int]], None]) -> Iterator[list[int]]:
    """SIGINT and SIGTERM go to `handler(signum, later)` during the block (main thread only: Python runs handlers
    there); the first signal it put in `later` is delivered to the previous handler at the end."""
    later: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield later
        return
    previous = {number: signal.signal(number, lambda signum, frame: handler(signum, later)) for number in _SIGNALS}
    try:
        yield later
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)
        if later:
            signal.raise_signal(later[0])


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (recorded, not lost) while the block's renames run, so all or none happen; the first
    is delivered to the previous handler at the end.

    Python-level handlers, not a signal mask: a mask holds the signal off the main thread only, and the kernel then
    hands it to any other thread (torch's, a reader's), whose delivery raised KeyboardInterrupt mid-block."""
    with _handled(lambda signum, later: later.append(signum)):
        yield


@contextmanager
def signals_as_errors() -> Iterator[Callable[[], None]]:
    """While the build runs, SIGINT and SIGTERM raise `Interrupted` (so `finally` blocks remove the temp folder);
    a second signal during that clean-up is ignored. Yields `disarm`, called once the output is in place: a signal
    after it is held and delivered to the previous handler at the end (the output stays: it is complete)."""
    armed = [True]

    def interrupt(signum: int, later: list[int]) -> None:
        if not armed[0]:
            later.append(signum)
            return
        for number in _SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    with _handled(interrupt):
        yield lambda: armed.__setitem__(0, False)


@contextmanager
def run_lock(folder: Path, tool: str, flag: str = "--out",
             warn: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold `folder`'s lock file (`LOCK`; the folder is made when missing) for the block, which gets whether this
    lock made the folder; a second holder fails at once with one line naming the first (pid, host, since when).
    The lock file is removed at the end, and the folder too when this lock made it and the block left it empty.

    An flock(2): the kernel lets go of it when the process ends, however it ends, so a killed run leaves no stale
    lock to take over (on NFS, Linux turns it into a lock the server keeps); a child forked meanwhile closes its
    copy, so it cannot keep the lock past its parent. Where fcntl is missing (Windows), a file made with O_EXCL holds
    it, taken over when its pid is gone on this host. A file system that cannot lock (an NFS mount whose lock
    service is down) gets one warning (`warn`, else on stderr) and the block runs unlocked: refusing every run there
    would be worse."""
    made = [parent for parent in (folder, *folder.parents) if not os.path.lexists(parent)]
    try:
        fd, flocked = _lock_fd(folder, tool, flag, warn)
    except BaseException:
        _remove_made(made)
        raise
    path = folder / LOCK
    try:
        holder = {"tool": tool, "pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # a read-only lock file (another user's, left by a killed run): unsaid
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
        yield bool(made)
    finally:
        _HELD.discard(fd)
        if flocked:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still held: a run that locks after this makes a new file
            os.close(fd)
        else:
            os.close(fd)  # Windows removes no open file
            with contextlib.suppress(OSError):
                os.unlink(path)
        _remove_made(made)


# The descriptors run_lock holds: a forked child (a DataLoader worker, say) closes its copies, or the lock, which
# belongs to the open file both share, would outlive a parent killed before the child.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def lock_holder(folder: Path, tool: str, flag: str = "--out") -> OasstError | None:
    """The error `run_lock` would raise because another process holds `folder`'s lock, or None: a check that
    fails on what a running run has written so far should name the run instead."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _BUSY:
            return None  # a file system that cannot lock: nobody holds it
        text = os.read(fd, 4096).decode("utf-8", "replace")
        # This process's own lock (another descriptor) blocks a shared one too: only another process is named.
        holder = _holder(text)
        mine = holder.get("pid") == os.getpid() and holder.get("host") == _host()
        return None if mine else _held(text, tool, flag, folder)
    finally:
        os.close(fd)  # also lets go of the shared lock, if it was granted
    return None


def _open_lock(folder: Path, flag: str, exclusive: bool = False) -> int:
    """`folder`'s lock file opened (made when missing, and `folder` with it), never through a symbolic link: a
    planted `.oasst-lock -> somefile` would have had that file overwritten with the holder's line."""
    path = folder / LOCK
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for _ in range(5):  # a run that made `folder` may remove it (empty) between our mkdir and our open
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OasstError(f"{flag} {folder}: cannot be made: {describe_os_error(exc)}") from None
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | nofollow | (os.O_EXCL if exclusive else 0), 0o644)
            except PermissionError:
                if exclusive:
                    raise
                fd = os.open(path, os.O_RDONLY | nofollow)  # another user's file: flock needs no write access
        except FileNotFoundError:
            continue
        except FileExistsError:
            raise  # the O_EXCL lock's holder: _exclusive_fd reads it
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(path):
                raise OasstError(f"{flag} {folder}: {LOCK} is a symbolic link, not the lock file a run makes; "
                                 "remove it") from None
            raise OasstError(f"{flag} {folder}: cannot make its lock file: {describe_os_error(exc)}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OasstError(f"{flag} {folder}: {LOCK} is not a file; remove it")
        return fd
    raise OasstError(f"{flag} {folder}: removed again and again while its lock file was made; try again")


def _lock_fd(folder: Path, tool: str, flag: str, warn: Callable[[str], None] | None) -> tuple[int, bool]:
    """An open descriptor of `folder`'s lock file that holds its lock, and whether flock holds it (False: the file
    itself does), or `OasstError` naming the process holding it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return _exclusive_fd(folder, tool, flag), False
    path = folder / LOCK
    for _ in range(100):  # each turn: a holder ended between our open and our lock
        fd = _open_lock(folder, flag)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                text = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                raise _held(text, tool, flag, folder) from None
            line = (f"{flag} {folder}: cannot lock {LOCK} ({describe_os_error(exc)}); running unlocked: a second "
                    f"{tool} run into it would not be stopped")
            if warn is not None:
                warn(line)
            else:
                print(f"warning: {line}", file=sys.stderr)
            return fd, True
        # The holder that just finished unlinked the file this descriptor opened: lock the one now at `path`.
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        opened = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            _HELD.add(fd)
            return fd, True
        os.close(fd)
    raise OasstError(f"{flag} {folder}: its lock file was replaced again and again while this run took it; try again")


def _exclusive_fd(folder: Path, tool: str, flag: str) -> int:
    """The lock without fcntl: a file only one process can create; a dead holder's file (this host) is moved
    aside, not removed: of two runs taking it over, only one's rename finds it."""
    path = folder / LOCK
    for _ in range(2):
        try:
            return _open_lock(folder, flag, exclusive=True)
        except FileExistsError:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            holder = _holder(text)
            pid = whole_number(str(holder.get("pid", "")))
            if pid is None or _alive(pid) or holder.get("host") not in ("", None, _host()):
                raise _held(text, tool, flag, folder) from None
            aside = folder / f"{LOCK}.{os.getpid()}-{os.urandom(4).hex()}"
            try:
                os.rename(path, aside)
            except OSError:
                continue  # another run took it over first: its new file is refused next
            with contextlib.suppress(OSError):
                os.unlink(aside)
        except PermissionError as exc:
            raise OasstError(f"{flag} {folder}: cannot make its lock file: {describe_os_error(exc)}") from None
    raise _held("", tool, flag, folder)


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _held(text: str, tool: str, flag: str, folder: Path) -> OasstError:
    """The one line for a folder another run holds."""
    holder = _holder(text)
    where = " ".join(part for part in (f"pid {holder['pid']}" if "pid" in holder else "",
                                       f"on {holder['host']}" if holder.get("host") else "") if part)
    who = ", ".join(part for part in (where, f"since {holder['since']}" if "since" in holder else "") if part)
    name = holder.get("tool") or tool
    return OasstError(f"{flag} {folder}: another {name} run{f' ({who})' if who else ''} is writing there; wait for "
                      f"it to end or choose another {flag}")


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _remove_made(made: list[Path]) -> None:
    """Remove the folders a block made (`made`: deepest first) while they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (the block or another process wrote there) or gone: leave it
            break


def write_error(exc: OSError, out: Path) -> OasstError:
    """One line for an OS error while the output was written: it names --out (not the temp folder)."""
    target = exc.filename
    where = str(out)
    if target is not None and not str(target).startswith(str(out.parent / f".{_stem(out)}{_TMP}")):
        where = str(target)  # a parent folder that could not be made, say
    return OasstError(f"{where}: cannot write the output: {describe_os_error(exc)}; nothing written")
