"""File hashes for the report's record of inputs, taken from the run's own reads (docs/algorithm.md §7).

A run's input files are hashed while they are read, not in a second pass. `BackgroundHasher(paths)` registers the
files; each keeps a hash in file order from byte 0 up to a cursor `pos`. `read_tensor` (io/stream.py) looks up the
hasher of the file it reads (`hasher_of(fd)`, None at once when nothing is registered) and:

- when its read continues the hash (starts at or below `pos`, or after a gap of at most `SMALL_GAP` bytes, a norm
  or bias the executor skips, which it reads and hashes first), takes the hash (`claim`), reads in `INLINE_CHUNK`
  pieces and hashes each as it is read, while it is in the CPU cache (`update`), then gives it back (`release`).
  A safetensors header is hashed when the file is registered, so a file read in order is hashed this way from its
  first tensor on, and the hasher reads nothing but the header;
- when its read lies wholly below `pos` (a re-read), does nothing more;
- otherwise (out of order, after a large gap, or the hash held by another thread) hands its buffer to the file's
  worker thread (`offer`: held, not copied). The worker hashes held buffers in file order; it reads a gap
  [pos, next held offset) itself once the run has moved past it (a buffer beyond it is held), and the rest of the
  file to EOF when `records()` asks for the result. It never reads ahead of the run, so at scale (files larger than
  the page cache) no byte is read from disk twice; bytes the run never reads (skipped tensors, files read by other
  code) are read once, by the worker.

Held buffers add at most `OFFER_CAP` bytes of memory, all files together; over it a buffer is not held (nothing
blocks) and the worker reads those bytes itself later, as a gap.

Why the reading thread hashes: sha256 of bytes just read, still in the CPU cache, costs ~0.6 s/GB of CPU on the
2-core dev machine; of a whole tensor hashed later from memory ~0.86 s/GB, more than the old second pass (the
hasher's own 4 MiB reads and their hash, ~0.64 s/GB).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["INLINE_CHUNK", "OFFER_CAP", "SMALL_GAP", "BackgroundHasher", "FileHasher", "file_record", "hasher_of",
           "sha256_file"]

#: Bytes per read of a registered file in read_tensor, each hashed at once: small enough to stay in the L2 cache
#: between the read and the hash (256 KiB measured best here, 64 KiB-512 KiB within 3%, 4 MiB 20% more CPU).
INLINE_CHUNK = 256 * 2**10

#: A gap of up to this many bytes before an in-order read (a norm or bias the executor skips) is read and hashed by
#: the reading thread, so that hashing in the reading thread goes on; a larger gap is left to the worker.
SMALL_GAP = 2**20

#: Bytes held for the workers (reads out of order) but not yet hashed, all registered files together: memory the
#: hashers may keep alive after the executor has dropped its tensors, on top of the bounds in README "Big models".
#: Over it, buffers are not held and the workers read those bytes themselves later. Reads in file order (the
#: executor's) never use it.
OFFER_CAP = 256 * 2**20

# Bulk reads by the workers (the rest of a file at the end) run a few files at a time, not all at once:
# one on 2 cores, where they would take the cores from the run.
_BULK_READERS = threading.BoundedSemaphore(min(4, max(1, (os.cpu_count() or 2) // 2)))

_lock = threading.Lock()  # guards _registry and _held
_registry: dict[tuple[int, int], FileHasher] = {}  # (st_dev, st_ino) -> the hasher of that file
_held = 0  # bytes offered and not yet hashed (all files)


def sha256_file(path: str | os.PathLike[str], chunk: int = 16 * 2**20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces (constant memory).

    Args:
        path: the file.
        chunk: bytes per read.
    """
    if chunk <= 0:
        raise ValueError(f"sha256_file: chunk must be positive, got {chunk}")
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{"path", "size", "sha256"} of a file, for the report."""
    p = Path(path)
    return {"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)}


def hasher_of(fd: int) -> FileHasher | None:
    """The hasher of open file `fd` when a BackgroundHasher registered it, else None (at once when none is)."""
    if not _registry:
        return None
    st = os.fstat(fd)
    return _registry.get((st.st_dev, st.st_ino))


def _reserve(n: int) -> bool:
    global _held
    with _lock:
        if _held + n > OFFER_CAP:
            return False
        _held += n
        return True


def _release(n: int) -> None:
    global _held
    with _lock:
        _held -= n


class FileHasher:
    """sha256 of one registered file from the run's reads and its worker's, in order (see the module doc); made by
    BackgroundHasher, used by readers through `claim`/`update`/`release` and `offer`.

    `pos`, `_pending` and `_busy` are guarded by `_cond`; `_h` is updated only by the one thread that set `_busy`.
    """

    def __init__(self, path: Path, fd: int, key: tuple[int, int], chunk: int) -> None:
        self.path, self._fd, self._key, self._chunk = path, fd, key, chunk
        self.pos = 0  # bytes hashed so far, from byte 0
        self.read_bytes = 0  # bytes the hasher read from the file itself (headers, gaps, the rest)
        self.inline_bytes = 0  # bytes hashed in the reading thread, from its reads
        self.deferred_bytes = 0  # bytes hashed by the worker from offered buffers
        self.error: BaseException | None = None
        self.digest: str | None = None
        self._h = hashlib.sha256()
        self._cond = threading.Condition()
        self._busy = False  # a thread is updating _h
        self._cursor = 0  # the end of the hash while a reader holds it (claim .. release)
        self._pending: list[tuple[int, int, memoryview]] = []  # heap of (offset, seq, buffer) to hash
        self._seq = 0
        self._finishing = False  # read the rest to EOF without waiting for offers (set by records())
        self._stopped = False  # the worker has ended (done, failed or cancelled): nothing more is taken
        self._cancelled = False
        if path.suffix == ".safetensors":
            self._hash_header()
        with _lock:
            _registry[key] = self
        self._thread = threading.Thread(target=self._work, name=f"nlsr-fast-hasher:{path.name}", daemon=True)
        self._thread.start()

    def _hash_header(self) -> None:
        """Hash a safetensors header now: read_tensor never reads it, and with it hashed a file read in order is
        hashed in the reading thread from its first tensor on."""
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        if n > min(100 * 2**20, os.fstat(self._fd).st_size - 8):
            return  # not a safetensors header: the worker reads the file as it is
        body = os.pread(self._fd, n, 8)
        self._h.update(head)
        self._h.update(body)
        self.pos = self.read_bytes = 8 + len(body)

    # -- called by readers ---------------------------------------------------------------------------------------
    def claim(self, offset: int, n: int) -> bool:
        """Take the hash for a read of `n` bytes at `offset` that continues it (after reading and hashing a gap of up
        to SMALL_GAP bytes before it): the caller then hashes its bytes with `update` as it reads them and ends with
        `release`. False when the read does not continue the hash (hashed already, out of order, or busy)."""
        with self._cond:
            if (self._stopped or self._cancelled or self._busy or self._pending or offset + n <= self.pos
                    or offset - self.pos > SMALL_GAP):
                return False
            self._busy = True
            self._cursor = self.pos
        if offset > self._cursor:  # a small gap the executor skipped
            try:
                gap = os.pread(self._fd, offset - self._cursor, self._cursor)
                if len(gap) < offset - self._cursor:
                    raise ValueError(f"{self.path}: the file ends at byte {self._cursor + len(gap)}, but bytes from "
                                     f"{offset} were read from it during the run (was it changed while in use?)")
            except BaseException as exc:  # noqa: BLE001 - this file's hash is lost: records() raises the error
                self.error = exc
                self._cancelled = True
                self.release()
                return False
            self._h.update(gap)
            self._cursor += len(gap)
            self.read_bytes += len(gap)
        return True

    def update(self, offset: int, data: memoryview) -> None:
        """Hash `data`, read at `offset`, after `claim`: consecutive pieces, from at or below the hash's end."""
        skip = self._cursor - offset
        if skip < data.nbytes:
            self._h.update(data[skip:] if skip > 0 else data)
            self.inline_bytes += data.nbytes - max(skip, 0)
            self._cursor = offset + data.nbytes

    def release(self) -> None:
        """End a `claim`: the hash covers the bytes given to `update`."""
        with self._cond:
            self.pos = self._cursor
            self._busy = False
            self._cond.notify()

    def offer(self, offset: int, data: memoryview) -> None:
        """Hold `data` (read at `offset`) for the worker, unless it is hashed already or OFFER_CAP bytes are held."""
        n = data.nbytes
        with self._cond:
            if self._stopped or self._cancelled or offset + n <= self.pos or not _reserve(n):
                return
            heapq.heappush(self._pending, (offset, self._seq, data))
            self._seq += 1
            self._cond.notify()

    # -- called by BackgroundHasher ------------------------------------------------------------------------------
    def finish(self) -> None:
        """Hash the rest of the file to EOF (what no read covers) and end."""
        with self._cond:
            self._finishing = True
            self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify()

    def join(self) -> None:
        self._thread.join()

    # -- the worker ----------------------------------------------------------------------------------------------
    def _next(self) -> tuple[int, memoryview | None, int | None] | None:
        """The next job, with `_busy` set: (offset, buffer, None) to hash from memory, (pos, None, end) to read
        [pos, end) (end None: to EOF); None when cancelled."""
        with self._cond:
            while not self._cancelled:
                if not self._busy:
                    while self._pending and self._pending[0][0] + self._pending[0][2].nbytes <= self.pos:
                        _release(heapq.heappop(self._pending)[2].nbytes)  # wholly hashed already: a re-read
                    if self._pending or self._finishing:
                        self._busy = True
                        if not self._pending:
                            return self.pos, None, None
                        start, _, data = self._pending[0]
                        if start > self.pos:
                            return self.pos, None, start  # the executor has moved past [pos, start)
                        heapq.heappop(self._pending)
                        return start, data, None
                self._cond.wait()
        return None

    def _work(self) -> None:
        bulk = False  # holds a _BULK_READERS slot
        try:
            while (job := self._next()) is not None:
                start, data, end = job
                del job  # `data` alone holds the buffer, dropped as soon as it is hashed
                new_pos, read = self.pos, 0
                try:
                    if data is not None:
                        try:
                            self._h.update(data[self.pos - start:])
                            new_pos = start + data.nbytes
                        finally:
                            _release(data.nbytes)
                            del data
                        continue
                    if self._finishing and not bulk:
                        _BULK_READERS.acquire()
                        bulk = True
                    want = self._chunk if end is None else min(self._chunk, end - start)
                    block = os.pread(self._fd, want, start)  # a buffer only while reading: most workers never do
                    read = len(block)
                    self._h.update(block)
                    del block
                    new_pos = start + read
                    if read == 0:  # EOF (a short read is not: the next one goes on from there)
                        if end is not None:
                            raise ValueError(f"{self.path}: the file ends at byte {new_pos}, but bytes up to {end} "
                                             "were read from it during the run (was it changed while in use?)")
                        self.digest = self._h.hexdigest()
                        return
                finally:
                    with self._cond:
                        self.deferred_bytes += new_pos - self.pos - read
                        self.read_bytes += read
                        self.pos = new_pos
                        self._busy = False
        except BaseException as exc:  # noqa: BLE001 - re-raised by records()
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(self.path)  # a failed pread names no file
            self.error = exc
        finally:
            if bulk:
                _BULK_READERS.release()
            self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending, self._pending = self._pending, []
        for _, _, data in pending:
            _release(data.nbytes)
        with _lock:
            if _registry.get(self._key) is self:
                del _registry[self._key]
        os.close(self._fd)


class _Failed:
    """A file that could not be opened: its error is raised by records()."""

    def __init__(self, error: BaseException) -> None:
        self.error: BaseException | None = error
        self.pos = self.read_bytes = self.inline_bytes = self.deferred_bytes = 0
        self.digest: str | None = None

    def finish(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def join(self) -> None:
        pass


def _cancel(files: list[Any]) -> None:
    for f in files:
        f.cancel()
    for f in files:
        f.join()


class BackgroundHasher:
    """sha256 of a run's input files, hashed from the run's own reads as it goes (see the module doc).

    Args:
        paths: the files; a file listed twice (or under two names) is hashed once.
        chunk: bytes per read when a worker reads a file itself.
        known: {path: sha256} of files whose digest is already known (a Hugging Face cache names large files'
            blobs by it): never opened nor hashed, recorded with that digest.

    A file is hashed by one BackgroundHasher at a time (the last one made). `records()` waits for the workers and
    returns the report's file records; `close()` (or leaving the `with` block) stops them without a result.
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]], chunk: int = 4 * 2**20,
                 known: Mapping[Path, str] | None = None) -> None:
        if chunk <= 0:
            raise ValueError(f"BackgroundHasher: chunk must be positive, got {chunk}")
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self._known = {p: {"path": str(p), "size": p.stat().st_size, "sha256": d} for p, d in (known or {}).items()
                       if p in self.paths}
        self._files: dict[Path, Any] = {}
        by_key: dict[tuple[int, int], FileHasher] = {}
        for p in self.paths:
            if p in self._known:
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
                st = os.fstat(fd)
            except OSError as exc:
                self._files[p] = _Failed(exc)
                continue
            key = (st.st_dev, st.st_ino)
            if key in by_key:  # the same file under another name
                os.close(fd)
            else:
                try:
                    by_key[key] = FileHasher(p, fd, key, chunk)
                except OSError as exc:
                    os.close(fd)
                    self._files[p] = _Failed(exc)
                    continue
            self._files[p] = by_key[key]
        self._unique = list(dict.fromkeys(self._files.values()))
        self._records: dict[Path, dict[str, Any]] | None = None
        self._finalizer = weakref.finalize(self, _cancel, self._unique)

    @property
    def bytes_read(self) -> int:
        """Bytes the hasher read from the files itself (headers, gaps, the rest at the end)."""
        return sum(f.read_bytes for f in self._unique)

    @property
    def bytes_offered(self) -> int:
        """Bytes hashed from the run's own reads (no second read): in the reading thread or by the worker."""
        return sum(f.inline_bytes + f.deferred_bytes for f in self._unique)

    @property
    def bytes_deferred(self) -> int:
        """Of `bytes_offered`, those hashed by the worker from held buffers (out of order, or hash busy)."""
        return sum(f.deferred_bytes for f in self._unique)

    def records(self) -> dict[Path, dict[str, Any]]:
        """{path: {"path", "size", "sha256"}} of every file, once all are hashed; raises a worker's error."""
        if self._records is None:
            for f in self._unique:
                f.finish()
            for f in self._unique:
                f.join()
            self._finalizer.detach()
            for p in self._files:
                error = self._files[p].error
                if error is not None:
                    raise error
            self._records = {p: self._known.get(p) or {"path": str(p), "size": self._files[p].pos,
                                                       "sha256": self._files[p].digest} for p in self.paths}
        return self._records

    def close(self) -> None:
        """Stop the workers (no records); a no-op after `records()`."""
        self._finalizer()

    def __enter__(self) -> BackgroundHasher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
