"""Triton masked_gather / masked_scatter: the entries under a PackedMask, in row-major order, moved as raw bits.

One program per row walks the row in blocks of BLOCK columns; a block's set bits get their places from an exclusive
prefix sum (tl.cumsum) on top of the row's running count, which starts at the row's offset (computed on the host
from the mask's row popcounts). Tensors arrive viewed as integers of their element size, so nothing is rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import LAUNCH_OPTS, check_grid

BLOCK = 1024


@triton.jit
def _row_bits(Bits_ptr, row, row_bytes, offs, cols):
    inb = offs < cols
    byte = tl.load(Bits_ptr + row * row_bytes + offs // 8, mask=inb, other=0).to(tl.int32)
    bit = (byte >> (offs % 8)) & 1
    return bit, inb & (bit == 1)


@triton.jit
def _masked_gather_kernel(Values_ptr, Src_ptr, Bits_ptr, Starts_ptr, cols, row_bytes, BLOCK: tl.constexpr):
    """Values[start(row) + k] = Src[row, j] for the k-th set bit j of the row."""
    row = tl.program_id(0).to(tl.int64)
    at = tl.load(Starts_ptr + row)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        bit, on = _row_bits(Bits_ptr, row, row_bytes, offs, cols)
        place = at + (tl.cumsum(bit, 0) - bit)
        tl.store(Values_ptr + place, tl.load(Src_ptr + row * cols + offs, mask=on), mask=on)
        at += tl.sum(bit, 0)


@triton.jit
def _masked_scatter_kernel(Dst_ptr, Values_ptr, Bits_ptr, Starts_ptr, Changed_ptr, cols, row_bytes,
                           BLOCK: tl.constexpr):
    """Dst[row, j] = Values[start(row) + k] for the k-th set bit j; Changed[row] = entries whose bits changed."""
    row = tl.program_id(0).to(tl.int64)
    at = tl.load(Starts_ptr + row)
    changed = tl.zeros((), dtype=tl.int64)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        bit, on = _row_bits(Bits_ptr, row, row_bytes, offs, cols)
        v = tl.load(Values_ptr + at + (tl.cumsum(bit, 0) - bit), mask=on)
        old = tl.load(Dst_ptr + row * cols + offs, mask=on)
        changed += tl.sum(((old != v) & on).to(tl.int64), 0)
        tl.store(Dst_ptr + row * cols + offs, v, mask=on)
        at += tl.sum(bit, 0)
    tl.store(Changed_ptr + row, changed)


def masked_gather_triton(values: torch.Tensor, src: torch.Tensor, bits: torch.Tensor, starts: torch.Tensor) -> None:
    """Fill `values` (raw-bit integer view) from `src` (same view, rows x cols contiguous) under `bits`."""
    rows = bits.shape[0]
    if values.numel() == 0:
        return
    check_grid("masked_gather", rows)
    _masked_gather_kernel[(rows,)](values, src, bits, starts, src.numel() // rows, bits.shape[1], BLOCK=BLOCK,
                                   **LAUNCH_OPTS)


def masked_scatter_triton(dst: torch.Tensor, values: torch.Tensor, bits: torch.Tensor,
                          starts: torch.Tensor) -> int:
    """Write `values` into `dst` (raw-bit integer views) under `bits`; returns the entries whose bits changed."""
    rows = bits.shape[0]
    if values.numel() == 0:
        return 0
    check_grid("masked_scatter", rows)
    changed = torch.zeros(rows, dtype=torch.int64, device=dst.device)
    _masked_scatter_kernel[(rows,)](dst, values, bits, starts, changed, dst.numel() // rows, bits.shape[1],
                                    BLOCK=BLOCK, **LAUNCH_OPTS)
    return int(changed.sum())
