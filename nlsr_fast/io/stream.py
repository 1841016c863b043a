"""Streaming tensor I/O for the executor: reads into private memory, writes whose layout is planned up front.

Why not the memory-mapped reads of `CheckpointReader.get`? A mapped page that was touched stays in the process's
resident set until the mapping closes, so streaming a 5 GB shard through `safe_open` costs 5 GB of RSS. `read_tensor`
copies one tensor's bytes with `pread` into a fresh buffer that is freed with the tensor: peak memory follows the
tensors in flight, not the files.

`PlannedSafetensors` writes a safetensors file whose header (names, dtypes, shapes) is known before any data: the
header is written first, then each tensor with `pwrite` at its offset, in any order and from any process. The
It is the one writer of safetensors files: `io.writer` builds shards and whole files on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from nlsr_fast.io._format import DTYPE_NAMES, TensorInfo, header_bytes
from nlsr_fast.io.hashing import INLINE_CHUNK, hasher_of

__all__ = ["BufferPool", "PlannedSafetensors", "buffer_pool", "data_offset", "new_buffer", "pread_into", "pwrite_all",
           "read_tensor", "tensor_bytes"]

_data_offsets: dict[tuple[str, int, int], int] = {}


def data_offset(path: Path) -> int:
    """Byte offset of the data section of a safetensors file (8 + header length), cached per file version."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_ino, st.st_mtime_ns)
    if key not in _data_offsets:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        _data_offsets[key] = 8 + n
    return _data_offsets[key]


class BufferPool:
    """Big byte buffers handed out again once nothing references them (each run's pass over the modules).

    A fresh allocation over 32 MiB is fresh pages from the kernel (glibc maps it, and unmaps it when freed), faulted
    and zeroed again: for dense Llama-3-70B shapes that was a quarter of the run's CPU. The same few sizes come back
    every layer, so a buffer of the exact size is reused when no tensor, view or array refers to its storage any
    more (torch's storage use count; the input hasher may still hold one, a caller may keep a view: those are never
    reused). Memory: the buffers in use, plus at most one idle buffer of each size other than the one asked for.
    """

    MIN_BYTES = 32 * 2**20  # below, glibc serves and reuses from its heap already

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[tuple[torch.Tensor, int]]] = {}  # nbytes -> [(buffer, its idle use count)]

    @staticmethod
    def _uses(buf: torch.Tensor) -> int:
        return int(torch._C._storage_Use_Count(buf.untyped_storage()._cdata))

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` (contents undefined), reused when one of that size is idle."""
        if nbytes < self.MIN_BYTES or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:  # the view is made under the lock, so no other thread can see the buffer as idle
            self._drop_idle_beyond_one(but=nbytes)
            for buf, idle in self._free.setdefault(nbytes, []):
                if self._uses(buf) == idle:
                    return buf[:]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._free[nbytes].append((buf, self._uses(buf)))
            return buf[:]

    def _drop_idle_beyond_one(self, but: int) -> None:
        """Keep one idle buffer of every other size: a burst of one size (two modules in flight, a read the hasher
        still holds) must not stay allocated while other sizes are in use, or peak RSS would follow timing."""
        for nbytes, bufs in self._free.items():
            if nbytes == but:
                continue
            idle = [i for i, (buf, unused) in enumerate(bufs) if self._uses(buf) == unused]
            self._free[nbytes] = [entry for i, entry in enumerate(bufs) if i not in idle[1:]]


_POOL: list[BufferPool] = []  # the active run's pool (see `buffer_pool`)


def new_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer for a big per-module tensor: from the active run's pool, else freshly allocated."""
    return _POOL[-1].take(nbytes) if _POOL else torch.empty(nbytes, dtype=torch.uint8)


@contextlib.contextmanager
def buffer_pool() -> Iterator[BufferPool]:
    """Reuse big buffers (`new_buffer`, `read_tensor`) within the block; they are freed when it ends."""
    pool = BufferPool()
    _POOL.append(pool)
    try:
        yield pool
    finally:
        _POOL.remove(pool)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` (on the CPU, contiguous) as a flat memoryview, which keeps the tensor alive."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(data.data).cast("B")


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` (pwrite may write less than asked)."""
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def pread_into(fd: int, view: memoryview, offset: int, path: Path, step: int | None = None,
               piece: Callable[[int, memoryview], None] | None = None) -> None:
    """Fill `view` with file bytes from `offset`, `step` bytes per read (all at once by default); `piece(offset,
    bytes)` sees each piece as it is read."""
    nbytes = len(view)
    step = step or nbytes
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:done + step]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: truncated file: tensor data ends at byte {offset + nbytes}, read stopped at "
                             f"{offset + done}")
        if piece is not None:
            piece(offset + done, view[done:done + got])
        done += got


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor described by a header `TensorInfo` into private (anonymous) memory.

    The bytes of an input file being hashed (io/hashing.py) are hashed as they are read, in `INLINE_CHUNK` pieces;
    a read out of the file's order is held by the hasher until its worker gets to it, so callers must not write into
    the returned tensor in place.

    Returns:
        A CPU tensor of `info.shape` and `info.dtype` that owns its memory (no file mapping is kept).
    """
    nbytes = info.nbytes
    buf = new_buffer(nbytes)
    if nbytes:
        view = memoryview(buf.numpy().data).cast("B")
        offset = data_offset(info.file) + info.start
        fd = os.open(info.file, os.O_RDONLY)
        try:
            hasher = hasher_of(fd)  # None unless the file is an input being hashed
            if hasher is not None and hasher.claim(offset, nbytes):  # the read continues the file's hash
                try:
                    pread_into(fd, view, offset, info.file, INLINE_CHUNK, hasher.update)
                finally:
                    hasher.release()
            else:
                pread_into(fd, view, offset, info.file)
                if hasher is not None:
                    hasher.offer(offset, view)  # held for the hasher's worker (ignored if hashed already)
        finally:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


class PlannedSafetensors:
    """A safetensors file written from a plan: header first, then tensors at their offsets, in any order.

    Args:
        path: the file to create (truncated).
        plan: (name, dtype, shape) in header order.
        metadata: string pairs for `__metadata__` ({"format": "pt"} always set).
        create: write the header and size the file (one process); False opens a file another process planned.
    """

    def __init__(self, path: str | os.PathLike[str], plan: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, *, create: bool = True) -> None:
        self.path = Path(path)
        entries = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in plan]
        head = header_bytes(entries, metadata, path=self.path)
        self._slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 8 + len(head)
        for name, dtype, shape in entries:
            self._slots[name] = (offset, dtype, shape)
            offset += math.prod(shape) * dtype.itemsize
        self.size = offset
        # The file is hashed as it is written when its bytes arrive front to back (one process writing every slot in
        # plan order): `digest` is then its sha256, and the manifest need not read it again.
        self._hash: _StreamHash | None = None
        self.digest: str | None = None
        if create:
            with self.path.open("wb") as f:
                f.write(struct.pack("<Q", len(head)))
                f.write(head)
                f.truncate(self.size)
            self._hash = _StreamHash(struct.pack("<Q", len(head)) + head)
        else:
            with self.path.open("rb") as f:
                found = f.read(8 + len(head))
            if found != struct.pack("<Q", len(head)) + head or self.path.stat().st_size != self.size:
                raise ValueError(f"{self.path}: this file does not match the planned layout (another run's, or cut "
                                 "short); start afresh (--overwrite)")
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (its planned dtype and shape, any device) at its slot."""
        if name not in self._slots:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the plan")
        offset, dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the plan says "
                             f"{DTYPE_NAMES.get(dtype, dtype)} {list(shape)}")
        if not tensor.numel():
            return
        view = tensor_bytes(tensor)
        pwrite_all(self._fd, view, offset)
        if self._hash is not None and not self._hash.feed(offset, view):
            self._hash = None  # written out of order (or again): the manifest hashes the file itself

    def close(self) -> None:
        """fsync and close the file; `digest` is its sha256 when it was written front to back, else None."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self._hash is not None:
                self.digest = self._hash.finish(self.size)
                self._hash = None

    def __enter__(self) -> PlannedSafetensors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _StreamHash:
    """sha256 of a file written front to back, computed by a background thread (hashlib releases the GIL) so the
    writer does not wait for it; at most _HASH_BACKLOG bytes wait to be hashed (the writer blocks beyond)."""

    def __init__(self, head: bytes) -> None:
        self._sha = hashlib.sha256(head)
        self._next = len(head)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nlsr-fast-out-hash")
        self._room = threading.BoundedSemaphore(_HASH_BACKLOG // _HASH_UNIT)
        self._jobs: list[Any] = []

    def feed(self, offset: int, view: memoryview) -> bool:
        """Hash `view` written at `offset`; False (and no more hashing) when it does not follow the bytes so far."""
        if offset != self._next:
            self.finish(None)
            return False
        self._next += len(view)
        units = max(1, min(len(view) // _HASH_UNIT, _HASH_BACKLOG // _HASH_UNIT))
        for _ in range(units):
            self._room.acquire()

        def job() -> None:
            try:
                self._sha.update(view)  # `view` keeps the written tensor alive until hashed
            finally:
                for _ in range(units):
                    self._room.release()

        self._jobs.append(self._pool.submit(job))
        self._jobs = [j for j in self._jobs if not j.done()]
        return True

    def finish(self, size: int | None) -> str | None:
        """The hex digest once every queued byte is hashed, if `size` bytes were; None otherwise."""
        self._pool.shutdown(wait=True)
        for j in self._jobs:
            j.result()
        return self._sha.hexdigest() if size is not None and self._next == size else None


# Bytes written but not yet hashed, at most (or one tensor, when bigger), counted in units of 1 MiB.
_HASH_UNIT = 2**20
_HASH_BACKLOG = 64 * 2**20
