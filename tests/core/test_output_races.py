"""Output folders across real processes: `run_lock` (one run at a time writes into a folder) and `clean_stale`
(what killed builds left)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oasst_tools.errors import OasstError
from oasst_tools.output import LOCK, lock_holder, run_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys; from pathlib import Path; from oasst_tools.output import run_lock\n"
        "with run_lock(Path(sys.argv[1]), 'oasst train'):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


def _holder(folder: Path) -> subprocess.Popen:
    """A real process holding `folder`'s lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline() == "held\n", proc.stderr.read() if proc.stderr else ""
    return proc


def _refusal(folder: Path, pid: int) -> str:
    return (rf"--out {re.escape(str(folder))}: another oasst train run \(pid {pid} on {re.escape(os.uname().nodename)}"
            rf", since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\) is writing there; wait for it to end or choose another --out")


def test_a_second_process_is_refused_at_once_naming_the_first(tmp_path: Path):
    out = tmp_path / "new" / "out"
    proc = _holder(out)
    try:
        started = time.perf_counter()
        with pytest.raises(OasstError) as refused:
            with run_lock(out, "oasst train"):
                pytest.fail("two holders of one lock")
        assert time.perf_counter() - started < 1  # refused, not waiting
        assert re.fullmatch(_refusal(out, proc.pid), str(refused.value))
        assert re.fullmatch(_refusal(out, proc.pid), str(lock_holder(out, "oasst train")))
        assert out.is_dir()  # the refused one removed nothing the holder made
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0
    # The holder made new/out and wrote nothing there: all of it is gone with its lock.
    assert not (tmp_path / "new").exists()
    assert lock_holder(out, "oasst train") is None
    with run_lock(out, "oasst train"):
        assert (out / LOCK).is_file()


def test_a_killed_holder_leaves_no_lock_to_wait_for(tmp_path: Path):
    out = tmp_path / "out"
    proc = _holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (out / LOCK).is_file()  # its file stays; its lock went with the process
    assert lock_holder(out, "oasst train") is None
    with run_lock(out, "oasst train"):
        assert lock_holder(out, "oasst train") is None  # this process's own lock is not "another run"
    assert not (out / LOCK).exists() and out.is_dir()  # made by the killed run, not by this block: kept


def test_the_folder_is_made_for_the_block_and_kept_only_when_written(tmp_path: Path):
    out = tmp_path / "a" / "b"
    with run_lock(out, "oasst train"):
        assert out.is_dir()
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with run_lock(out, "oasst train"):
            raise RuntimeError("failed before writing")
    assert not (tmp_path / "a").exists()
    with run_lock(out, "oasst train"):
        (out / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OasstError, match=r"^--out .*file/out: cannot be made: "):
        with run_lock(tmp_path / "file" / "out", "oasst train"):
            pass


def test_without_fcntl_a_live_holder_is_refused_and_a_dead_one_replaced(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    out = tmp_path / "out"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        host = os.uname().nodename
        (out / LOCK).write_text(f'{{"tool": "oasst train", "pid": {alive.pid}, "host": "{host}", '
                                '"since": "2026-12-07 10:00:00"}')
        with pytest.raises(OasstError, match=rf"another oasst train run \(pid {alive.pid} on "):
            with run_lock(out, "oasst train"):
                pass
    finally:
        alive.communicate(b"", timeout=30)
    # Its process is gone now: the file is taken over, and removed at the end.
    with run_lock(out, "oasst train"):
        assert f'"pid": {os.getpid()}' in (out / LOCK).read_text()
    assert not (out / LOCK).exists()


def test_a_file_system_that_cannot_lock_warns_once_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said: list[str] = []
    with run_lock(tmp_path / "out", "oasst train", warn=said.append) as made:
        assert made and lock_holder(tmp_path / "out", "oasst train") is None
    assert said == [f"--out {tmp_path / 'out'}: cannot lock .oasst-lock (no locks available); running unlocked: a "
                    "second oasst train run into it would not be stopped"]
    assert not (tmp_path / "out").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _left_by_a_killed_build(folder: Path, pid: int, files: dict[str, str]) -> None:
    folder.mkdir()
    (folder / ".oasst-build").write_text(f'{{"tool": "oasst-tools", "pid": {pid}, "host": "{os.uname().nodename}"}}')
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("killed", ["between-the-renames", "removing-the-old-output"])
def test_a_set_aside_output_comes_back_only_when_the_new_one_never_went_in(tmp_path: Path, killed: str):
    """`build --overwrite` killed (-9) while it removed the old output, then --out deleted by hand: the next build
    put the half-removed old output back as --out."""
    from oasst_tools.output import clean_stale

    pid = _dead_pid()
    _left_by_a_killed_build(tmp_path / f".out.old-{pid}-0a0b0c0d", pid, {"train.jsonl": "old rows\n"})
    if killed == "between-the-renames":  # the new output was still in its temp folder
        _left_by_a_killed_build(tmp_path / f".out.tmp-{pid}-01020304", pid, {"train.jsonl": "new rows\n"})
    cleaned = clean_stale(tmp_path / "out")
    assert len(cleaned) == (2 if killed == "between-the-renames" else 1)
    if killed == "between-the-renames":
        assert (tmp_path / "out" / "train.jsonl").read_text() == "old rows\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_planted_symlink_lock_file_is_refused_and_its_target_untouched(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("mine")
    (out / LOCK).symlink_to(tmp_path / "precious.txt")
    with pytest.raises(OasstError, match=rf"^--out {re.escape(str(out))}: \.oasst-lock is a symbolic link, not the "
                                         r"lock file a run makes; remove it$"):
        with run_lock(out, "oasst train"):
            pass
    assert (tmp_path / "precious.txt").read_text() == "mine"
    assert (out / LOCK).is_symlink()


FORKS = ("import os, sys, time; from pathlib import Path; from oasst_tools.output import run_lock\n"
         "with run_lock(Path(sys.argv[1]), 'oasst train'):\n"
         "    child = os.fork()\n"
         "    if child == 0:\n"
         "        os.write(1, b'child runs\\n'); time.sleep(60); os._exit(0)\n"
         "    os.write(1, b'%d\\n' % child); sys.stdin.read()\n")  # one write each: lines never interleave


def test_a_child_forked_under_the_lock_does_not_keep_it_past_its_parent(tmp_path: Path):
    """flock belongs to the open file, which fork shares: a DataLoader worker outliving its killed parent held
    the lock, and every new run was refused naming the dead parent."""
    out = tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-c", FORKS, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert parent.stdout is not None
    # Both lines, in either order: the child's comes once the fork's after-in-child hooks have run.
    lines = sorted(parent.stdout.readline().strip() for _ in range(2))
    assert lines[1] == "child runs", lines
    child = int(lines[0])
    try:
        assert lock_holder(out, "oasst train") is not None
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        os.kill(child, 0)  # the child still runs
        assert lock_holder(out, "oasst train") is None
        with run_lock(out, "oasst train"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
