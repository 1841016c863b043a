"""OutputLock: one run per output (issue 8, "Two runs with the same OUT mix their outputs")."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nlsr_fast.io.lock import OutputLock, lock_holder, lock_path

_HOLD = (
    "import sys\n"
    "from nlsr_fast.io.lock import OutputLock\n"
    "with OutputLock(sys.argv[1], argv=['holder']):\n"
    "    print('ready', flush=True)\n"
    "    sys.stdin.readline()\n"
)


class _Holder:
    """Another process holding the lock of `out` until `release()`."""

    def __init__(self, out: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def release(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        assert self.proc.wait() == 0


def test_lock_file_contents_and_release(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out, argv=["nlsr-fast", "realign"]) as lock:
        assert lock.path == lock_path(out) == tmp_path / "out.lock"
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["argv"] == ["nlsr-fast", "realign"] and info["started"].endswith("+00:00")
        assert lock_holder(out) is None  # held by this process: not "another run"
    assert not lock.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_second_run_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _Holder(out)
    try:
        info = lock_holder(out)
        assert info is not None and info["pid"] == holder.proc.pid
        with pytest.raises(ValueError) as e:
            with OutputLock(out):
                pytest.fail("must not acquire")
        msg = str(e.value)
        assert msg == (f"output {out} is locked by pid {holder.proc.pid} on host {socket.gethostname()} since "
                       f"{info['started']} (lock file {out}.lock); wait for it, or pass --wait")
        assert lock_path(out).exists()  # the live lock was not touched
    finally:
        holder.release()
    assert not lock_path(out).exists()
    with OutputLock(out):
        pass


def test_wait_waits_for_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _Holder(out)
    got: list[str] = []

    def waiter() -> None:
        with OutputLock(out, wait=True, poll=0.01):
            got.append(json.loads(lock_path(out).read_text())["argv"][0])

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.3)
    assert t.is_alive() and got == []  # still waiting while the holder runs
    holder.release()
    t.join()
    assert got and got[0] != "holder"


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    holder = _Holder(out)
    holder.proc.kill()
    holder.proc.wait()
    assert lock_path(out).exists()  # a SIGKILLed holder leaves its file behind, without its flock
    assert lock_holder(out) is None
    with caplog.at_level(logging.WARNING, logger="nlsr_fast.io.lock"):
        with OutputLock(out):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and str(holder.proc.pid) in r.getMessage() for r in caplog.records)
    assert not lock_path(out).exists()


def test_stale_lock_file_without_flock_or_with_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    # A lock file whose pid is alive (this process' parent) but which nobody flocks: stale.
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="nlsr_fast.io.lock"), OutputLock(out):
        pass
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    lock_path(out).write_bytes(b"\xff not json")
    with OutputLock(out):
        pass
    assert not lock_path(out).exists()


def test_dead_pid_on_this_host_is_stale_even_with_flock(tmp_path: Path) -> None:
    """A flock kept alive by an inherited descriptor while the recorded pid is gone: still stale."""
    import fcntl

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    fd = os.open(lock_path(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with OutputLock(out):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        os.close(fd)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_released_on_exceptions(tmp_path: Path, exc: type[BaseException]) -> None:
    out = tmp_path / "out"
    with pytest.raises(exc):
        with OutputLock(out):
            raise exc()
    assert not lock_path(out).exists()


def test_reentrant_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        with OutputLock(out):
            assert lock_path(out).exists()
        assert lock_path(out).exists()  # the inner exit does not release the outer hold
    assert not lock_path(out).exists()


def test_lock_never_creates_folders_inside_an_input(tmp_path: Path) -> None:
    inp = tmp_path / "input"
    inp.mkdir()
    with pytest.raises(ValueError, match="lies inside the input"):
        with OutputLock(inp / "new" / "out", inputs=[inp]):
            pytest.fail("must not acquire")
    assert list(inp.iterdir()) == []


def test_two_processes_race_one_wins(tmp_path: Path) -> None:
    """Many processes try the same lock at once: exactly the ones that find it free in turn get it; none sees a
    lock that another holds at the same time (each holder checks nobody else is inside)."""
    out = tmp_path / "out"
    marker = tmp_path / "inside"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from nlsr_fast.io.lock import OutputLock\n"
        "m = Path(sys.argv[2])\n"
        "for _ in range(20):\n"
        "    with OutputLock(sys.argv[1], wait=True, poll=0.001):\n"
        "        fd = os.open(m, os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
        "        os.close(fd)\n"
        "        m.unlink()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(marker)]) for _ in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    assert not lock_path(out).exists()


def test_another_thread_of_this_process_is_another_run(tmp_path: Path) -> None:
    """Re-entrance is per thread: a second run in another thread of the same process is refused like any other."""
    out = tmp_path / "out"
    errors: list[str] = []
    holders: list[object] = []

    def second() -> None:
        holders.append(lock_holder(out))
        try:
            with OutputLock(out):
                errors.append("acquired")
        except ValueError as exc:
            errors.append(str(exc))

    with OutputLock(out):
        t = threading.Thread(target=second)
        t.start()
        t.join()
        assert lock_holder(out) is None  # this thread holds it
    assert len(errors) == 1 and f"is locked by pid {os.getpid()}" in errors[0]
    assert holders and isinstance(holders[0], dict) and holders[0]["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_lock_path_ignores_a_trailing_slash(tmp_path: Path) -> None:
    out = f"{tmp_path / 'out'}/"
    assert lock_path(out) == tmp_path / "out.lock"
    with OutputLock(out) as lock:
        assert lock.path == tmp_path / "out.lock" and lock.path.exists()
    assert not (tmp_path / "out").exists()
