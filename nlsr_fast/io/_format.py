"""The safetensors file format, read from the header alone and written by streaming tensor bytes.

Format: https://github.com/huggingface/safetensors#format (8-byte little-endian header length, JSON header,
then the raw little-endian tensor bytes at the header's `data_offsets`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorInfo", "read_header", "write_safetensors", "DTYPES", "DTYPE_NAMES"]

# safetensors dtype tag -> torch dtype (only those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U8", "uint8"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a checkpoint header (safetensors itself caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (relative to the data section)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without reading tensor data.

    Args:
        path: a .safetensors file.

    Returns:
        ({tensor name: TensorInfo} in file (data offset) order, the `__metadata__` dict or {}).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (a {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            tag, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from e
        if tag not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tag!r}, which this torch build cannot hold")
        dtype = DTYPES[tag]
        expected = math.prod(shape) * dtype.itemsize
        if not (0 <= start <= end <= data_size) or end - start != expected:
            raise ValueError(
                f"{path}: tensor {name!r} ({tag}, shape {list(shape)}) has data_offsets [{start}, {end}], "
                f"expected {expected} bytes within the {data_size}-byte data section"
            )
        infos[name] = TensorInfo(path, dtype, shape, int(start), int(end))
    infos = dict(sorted(infos.items(), key=lambda kv: kv[1].start))
    return infos, dict(metadata)


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write `tensors` to `path` in safetensors format, streaming each tensor's bytes (no full in-memory copy).

    Args:
        path: destination file (overwritten).
        tensors: name -> tensor, any device, any layout; written contiguous in its own dtype.
        metadata: string -> string pairs for `__metadata__` ({"format": "pt"} is always set).

    Returns:
        The number of bytes written (header included).
    """
    header: dict[str, object] = {}
    meta = {"format": "pt", **(metadata or {})}
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"{path}: safetensors metadata must map str to str, got {k!r}: {v!r}")
    header["__metadata__"] = meta
    offset = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        end = offset + nbytes
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    # Pad so the data section starts 8-byte aligned, as the reference writer does.
    blob += b" " * (-len(blob) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(_as_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
