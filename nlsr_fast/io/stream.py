"""Streaming tensor I/O for the executor: reads into private memory, writes whose layout is planned up front.

Why not the memory-mapped reads of `CheckpointReader.get`? A mapped page that was touched stays in the process's
resident set until the mapping closes, so streaming a 5 GB shard through `safe_open` costs 5 GB of RSS. `read_tensor`
copies one tensor's bytes with `pread` into a fresh buffer that is freed with the tensor: peak memory follows the
tensors in flight, not the files.

`PlannedSafetensors` writes a safetensors file whose header (names, dtypes, shapes) is known before any data: the
header is written first, then each tensor with `pwrite` at its offset, in any order and from any process. The
header bytes are those of `write_safetensors` for the same tensors in the same order.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

from nlsr_fast.io._format import DTYPE_NAMES, TensorInfo, header_bytes

__all__ = ["PlannedSafetensors", "data_offset", "read_tensor"]

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


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor described by a header `TensorInfo` into private (anonymous) memory.

    Returns:
        A CPU tensor of `info.shape` and `info.dtype` that owns its memory (no file mapping is kept).
    """
    nbytes = info.nbytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buf.numpy().data).cast("B")
        offset = data_offset(info.file) + info.start
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise ValueError(f"{info.file}: truncated file: tensor data ends at byte {offset + nbytes}, "
                                     f"read stopped at {offset + done}")
                done += got
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
        if create:
            with self.path.open("wb") as f:
                f.write(struct.pack("<Q", len(head)))
                f.write(head)
                f.truncate(self.size)
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
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data.data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self._fd, [view[done:]], offset + done)

    def close(self) -> None:
        """fsync and close the file."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PlannedSafetensors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
