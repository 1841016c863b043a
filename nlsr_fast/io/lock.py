"""One lock per output folder: `<out>.lock`, so that two runs never write the same output at once.

The lock file is created atomically (the JSON {pid, host, started, argv} is written to a private file that holds
an `fcntl.flock`, then hard-linked to `<out>.lock`, which fails if the name exists; file systems without hard
links fall back to O_CREAT|O_EXCL). The flock lives as long as the holder's open file, so the kernel drops it when
the holder dies, however it dies: a lock file whose flock nobody holds, or whose pid is dead on this host, is
stale and is taken over with a warning. The stale file is removed only while holding its flock and after checking
that the name still points to it, so two runs taking over the same stale lock cannot both win.

Within one thread the lock is re-entrant: `atomic_output` takes it too, so a caller that already holds it (the
realign API holds it for the whole run) nests without deadlock, and a caller that does not still gets its write
protected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["OutputLock", "lock_path", "lock_holder"]

log = logging.getLogger(__name__)

# resolved lock path -> [holding thread, nesting depth], for the locks this process holds. Re-entrance is per
# thread: another thread of this process is another run.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of output `out`: `<out>.lock`."""
    return Path(f"{Path(out)}.lock")  # Path() drops a trailing slash: "out/" locks "out.lock", not "out/.lock"


def _key(path: Path) -> str:
    return os.path.join(os.path.realpath(path.parent), path.name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > 1 << 20:
                break
        info = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _flock_held_by_other(fd: int) -> bool:
    """True when another open file holds the flock of this file; False after taking it ourselves."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    return False


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')}")


def lock_holder(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of `out` now: its JSON info, or None when the lock is free, stale, or held by this
    thread. Reads only; never takes or removes anything."""
    path = lock_path(out)
    with _HELD_GUARD:
        entry = _HELD.get(_key(path))
        if entry is not None and entry[0] == threading.get_ident():
            return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        held = _flock_held_by_other(fd)
        info = _read_info(fd)
        if not held:
            return None
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            if info["pid"] != os.getpid() and not _pid_alive(info["pid"]):
                return None
        return info or {"pid": "?", "host": "?", "started": "?"}
    finally:
        os.close(fd)  # also drops a flock we may have taken just to test it


class OutputLock:
    """Context manager holding `<out>.lock` for the duration of a run.

    Args:
        out: the output folder the lock protects (it need not exist).
        wait: when the lock is held by another live run, wait for it (polling) instead of failing.
        poll: seconds between attempts while waiting.
        argv: recorded in the lock file (default sys.argv).
        inputs: the run's input files or folders; checked (like `check_output`) before anything is created, so a
            missing parent folder of `out` is never created inside an input.

    Raises (on enter):
        ValueError: the lock is held by another run and `wait` is False (the message names pid, host, start time
            and the lock file), or the lock file cannot be created (the message names the folder).
    """

    def __init__(self, out: str | os.PathLike[str], *, wait: bool = False, poll: float = 0.5,
                 argv: list[str] | None = None, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
        if not poll > 0:
            raise ValueError(f"OutputLock: poll must be positive, got {poll!r}")
        self.out = Path(out)
        self.path = lock_path(out)
        self.wait = bool(wait)
        self.poll = float(poll)
        self.argv = list(sys.argv if argv is None else argv)
        self.inputs = [Path(p) for p in inputs]
        self._fd: int | None = None
        self._nested = False

    # -- acquire ----------------------------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": self.argv}

    def _try_create(self) -> int | None:
        """Create the lock file atomically, holding its flock; the fd, or None when the name exists."""
        parent = self.path.parent
        text = (json.dumps(self._info(), sort_keys=True) + "\n").encode("utf-8")
        tmp = parent / f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            os.unlink(tmp)  # our own leftover (same pid and thread)
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except PermissionError:
            raise ValueError(f"cannot create the lock file {self.path}: folder {parent} is not writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, text)
            os.fsync(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                os.close(fd)
                fd = -1
                return None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # No hard links here: O_EXCL on the final name (the JSON is written just after, under the flock).
                os.close(fd)
                fd = -1
                return self._try_create_excl(text)
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _try_create_excl(self, text: bytes) -> int | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, text)
        os.fsync(fd)
        return fd

    def _check_existing(self) -> dict[str, Any] | None:
        """Inspect an existing lock file: its info when a live run holds it; None after removing a stale one (or
        when it vanished meanwhile), so the caller tries again."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            held = _flock_held_by_other(fd)
            info = _read_info(fd)
            same_host = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            dead = same_host and isinstance(pid, int) and not isinstance(pid, bool) and not _pid_alive(pid)
            if held and not dead:
                return info or {"pid": "?", "host": "?", "started": "?"}
            # Stale: nobody holds its flock (the holder died), or its pid is gone. Remove it only if the name
            # still points to the file we judged (another run may have replaced it meanwhile).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                return None
            if same:
                why = "its process is gone" if dead else "no process holds it"
                log.warning("taking over the stale lock %s of %s (%s)", self.path, _describe(info), why)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            return None
        finally:
            os.close(fd)

    def acquire(self) -> OutputLock:
        if self.inputs:
            from nlsr_fast.io.output import _check_disjoint

            for target, what in ((self.out, "output"), (self.path, "lock file")):
                _check_disjoint(target, self.inputs, what)
        key = _key(self.path) if self.path.parent.exists() else None
        if key is not None:
            with _HELD_GUARD:
                entry = _HELD.get(key)
                if entry is not None and entry[0] == threading.get_ident():
                    entry[1] += 1
                    self._nested = True
                    return self
        if not self.path.parent.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except PermissionError:
                raise ValueError(f"cannot create the output's folder {self.path.parent}: permission denied") from None
        announced = False
        while True:
            fd = self._try_create()
            if fd is not None:
                break
            holder = self._check_existing()
            if holder is None:
                continue
            if not self.wait:
                raise ValueError(f"output {self.out} is locked by {_describe(holder)} (lock file {self.path}); "
                                 "wait for it, or pass --wait")
            if not announced:
                log.warning("output %s is locked by %s (lock file %s); waiting", self.out, _describe(holder),
                            self.path)
                announced = True
            time.sleep(self.poll)
        self._fd = fd
        with _HELD_GUARD:
            _HELD[_key(self.path)] = [threading.get_ident(), 1]
        log.info("locked %s", self.path)
        return self

    # -- release ----------------------------------------------------------------------------------------------
    def release(self) -> None:
        key = _key(self.path)
        if self._nested:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
            self._nested = False
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_GUARD:
            _HELD.pop(key, None)
        try:
            # Remove the name first (only if it is still our file), then drop the flock by closing.
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        log.info("released %s", self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
