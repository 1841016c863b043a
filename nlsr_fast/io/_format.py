"""The safetensors file format, read from the header alone and written by streaming tensor bytes.

Format: https://github.com/huggingface/safetensors#format (8-byte little-endian header length, JSON header,
then the raw little-endian tensor bytes at the header's `data_offsets`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorInfo", "header_bytes", "read_header", "DTYPES", "DTYPE_NAMES"]

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


_U64 = 2**64 - 1


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_u64(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U64


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without reading tensor data.

    Checks what the safetensors library checks when it opens the file, so that a header accepted here is one it
    reads: strict UTF-8 JSON (no NaN, no duplicate keys, no lone surrogates), `__metadata__` a str -> str object,
    each entry a known dtype, a shape and data_offsets of unsigned integers, byte counts that match, and byte ranges
    that tile the data section exactly (from 0, in order, no gap, no overlap, nothing after the last tensor). No
    byte range can then point outside the file.

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
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape is not UTF-8
    except (UnicodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: malformed safetensors header: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (a {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: malformed safetensors header: __metadata__ must map strings to strings, "
                         f"got {str(metadata)[:200]}")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if (not isinstance(entry, dict) or not isinstance(shape, list) or not all(_is_u64(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets)):
            raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {str(entry)[:200]}; expected "
                             '{"dtype": tag, "shape": [unsigned ints], "data_offsets": [start, end]}')
        tag = entry.get("dtype")
        if not isinstance(tag, str) or tag not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tag!r}, which this torch build cannot hold")
        dtype = DTYPES[tag]
        count = 1
        for d in [*shape, dtype.itemsize]:
            count *= d
            if count > _U64:
                raise ValueError(f"{path}: tensor {name!r} has shape {shape}, whose byte count overflows")
        start, end = offsets
        if not (start <= end <= data_size) or end - start != count:
            raise ValueError(
                f"{path}: tensor {name!r} ({tag}, shape {list(shape)}) has data_offsets [{start}, {end}], "
                f"expected {count} bytes within the {data_size}-byte data section"
            )
        infos[name] = TensorInfo(path, dtype, tuple(shape), start, end)
    infos = dict(sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    pos, prev = 0, None
    for name, info in infos.items():
        if info.start != pos:
            after = "the header" if prev is None else f"tensor {prev!r}"
            what = (f"overlap tensor {prev!r} (which ends at {pos})" if info.start < pos
                    else f"leave a gap of {info.start - pos} bytes after {after}")
            raise ValueError(f"{path}: tensor {name!r} has data_offsets [{info.start}, {info.end}], which {what}; "
                             "tensors must tile the data section in order")
        pos, prev = info.end, name
    if pos != data_size:
        raise ValueError(f"{path}: the data section has {data_size} bytes but the tensors cover only {pos}: "
                         f"{data_size - pos} bytes after the last tensor (truncated header or appended data)")
    return infos, dict(metadata)


def header_bytes(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None, *,
    path: Path | None = None,
) -> bytes:
    """The JSON header of a safetensors file holding `entries` (name, dtype, shape) in this order, padded so the
    data section starts 8-byte aligned, as the reference writer does."""
    header: dict[str, object] = {}
    meta = {"format": "pt", **(metadata or {})}
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"{path}: safetensors metadata must map str to str, got {k!r}: {v!r}")
    header["__metadata__"] = meta
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)
