"""random_row_mask: a uniformly random subset of each row, drawn by a counter-based generator (docs/algorithm.md §3,
random).

The top `keep` share of each row of i.i.d. continuous scores is a uniformly random subset of that size, so the
`random` method draws the subset directly, in O(k) per row, with no scores: Floyd's algorithm, its randomness
taken from an integer hash of (stream, row, step). The mask depends only on (shape, k, stream): not on the
module order, the process, the thread count or the device. All arithmetic is on uint32, wrapping mod 2**32,
and every backend gives the same bits:

    mix32(x):  x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    row_key(i) = mix32(stream ^ mix32(i))                    # i = row index
    for t = 0 .. k-1:                                        # n = cols
        j = n - k + t
        h = mix32(row_key(i) + t * 0x9E3779B9)
        r = (h * (j + 1)) >> 32                              # 64-bit product: r in [0, j]
        keep entry j if entry r is already kept, else entry r

(mix32 is Chris Wellons' "lowbias32" hash, https://nullprogram.com/blog/2018/07/31/; Floyd's algorithm is
Bentley & Floyd, "A sample of brilliance", CACM 30(9), 1987.) `random_stream(seed, key)` derives the stream of a
tensor from the run's seed and the tensor's mask key.

No Triton backend, deliberately: the op has no tensor input, so there is nothing on the GPU to read. On any
device the mask is made on the host (the cpu backend, else the reference) and its bits, 1 bit per entry, are
moved to the device (`HOST_ONLY_REASON`; `nlsr_fast.ops.HOST_OPS` lists such ops).
"""

from __future__ import annotations

import hashlib
import os

import torch

from nlsr_fast.ops._counts import keep_count
from nlsr_fast.ops._registry import Backend, available, register, select
from nlsr_fast.ops._validate import check_keep
from nlsr_fast.ops.packed_mask import PackedMask

__all__ = ["HOST_ONLY_REASON", "host_backend", "random_row_mask", "random_row_mask_reference", "random_stream"]

OP = "random_row_mask"

#: Why the op has no Triton backend and runs on the host whatever the device asked for.
HOST_ONLY_REASON = (
    "no tensor input: the mask depends only on (shape, k, stream), so it is made on the host (cpu backend, else "
    "the reference) and its packed bits (1 bit per entry) are moved to the device"
)

_M32 = 0xFFFFFFFF
_MIX1 = 0x7FEB352D
_MIX2 = 0x846CA68B
_STEP = 0x9E3779B9
#: rows and cols limits: row indices and j + 1 must fit in uint32.
MAX_ROWS = 2**32
MAX_COLS = 2**32 - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) held in int64, without overflow: the product by 16-bit halves of x."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def _mul_hi32(h: torch.Tensor, m: int) -> torch.Tensor:
    """(h * m) >> 32 for h, m in [0, 2**32), exactly, in int64: (hh * m + ((hl * m) >> 16)) >> 16."""
    return ((h >> 16) * m + (((h & 0xFFFF) * m) >> 16)) >> 16


@register(OP, Backend.REFERENCE)
def random_row_mask_reference(
    shape: tuple[int, int], k: int, stream: int, device: torch.device | str = "cpu"
) -> PackedMask:
    """The spec (the algorithm of the module docstring), vectorised over rows, on any device, in int64 tensors."""
    rows, cols = shape
    keep = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    row = torch.arange(rows, dtype=torch.int64, device=device)
    key = _mix32(int(stream) ^ _mix32(row))
    for t in range(k):
        j = cols - k + t
        h = _mix32((key + t * _STEP) & _M32)
        r = _mul_hi32(h, j + 1)
        pick = torch.where(keep[row, r], j, r)
        keep[row, pick] = True
    return PackedMask.from_bool(keep)


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _random_row_mask_cpu(shape: tuple[int, int], k: int, stream: int) -> PackedMask:
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    mask = PackedMask.empty(shape)
    C.random_row_mask(mask.bits.data_ptr(), mask.rows, mask.cols, k, stream)
    return mask


# --- no triton backend: HOST_ONLY_REASON ---

_HOST = torch.device("cpu")


def random_stream(seed: int, key: str) -> int:
    """The stream of tensor `key` (its mask key, e.g. "<module>.lora_A") in a run seeded with `seed`: the first
    4 bytes, little endian, of sha256("<seed>:<key>"), so every tensor gets its own stream in any order."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()[:4], "little")


def host_backend(backend: str | None) -> str | None:
    """This op's backend in a run that asks for `backend` for all its ops (None: NLSR_FAST_BACKEND, else automatic).

    A run asking for "triton" means the GPU kernels where an op has them; this op has none (HOST_ONLY_REASON), so
    it takes its fastest backend on the host. Any other choice is passed on unchanged (and fails loudly if unusable).
    """
    wanted = backend if backend is not None else (os.environ.get("NLSR_FAST_BACKEND") or None)
    if wanted == Backend.TRITON.value:
        return available(OP, _HOST)[0].value
    return backend


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def random_row_mask(
    shape: tuple[int, int],
    keep: float,
    stream: int,
    *,
    k: int | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> PackedMask:
    """Mask keeping a uniformly random share `keep` of each row, the same bits for the same (shape, k, stream).

    Args:
        shape: (rows, cols) of the mask, rows <= 2**32, cols < 2**32.
        keep: share kept per row in [0, 1]; each row keeps cols - floor((1 - keep) * cols) entries, the product
            snapped to the nearest integer when within 1e-9 of it (docs/algorithm.md §3 "Counts").
        stream: int in [0, 2**32) selecting the random stream (see `random_stream`).
        k: optional exact per-row count overriding `keep` (0 <= k <= cols).
        device: where the mask goes (default CPU); it is always made on the host and moved (HOST_ONLY_REASON).
        backend: "reference" | "cpu"; default picks the fastest available on the host.
    Returns:
        PackedMask (rows, cols) on `device` with exactly k true entries in every row.
    """
    if not isinstance(shape, (tuple, list)) or len(shape) != 2 or not all(_is_int(s) for s in shape):
        raise ValueError(f"shape must be (rows, cols) of two ints, got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    if not (0 <= rows <= MAX_ROWS and 0 <= cols <= MAX_COLS):
        raise ValueError(f"shape must have 0 <= rows <= 2**32 and 0 <= cols < 2**32, got {(rows, cols)}")
    check_keep(keep)
    if not _is_int(stream) or not 0 <= stream <= _M32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    if k is None:
        k = keep_count(cols, float(keep))
    elif not _is_int(k) or not 0 <= k <= cols:
        raise ValueError(f"k must be an int in [0, {cols}], got {k!r}")
    target = _HOST if device is None else torch.device(device)
    mask = select(OP, _HOST, backend)((rows, cols), int(k), int(stream))
    return mask if target == _HOST else mask.to(target)
