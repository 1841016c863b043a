"""Shared pieces of the Triton kernels: launch limits, tile shapes and PackedMask bit helpers.

PackedMask layout (nlsr_fast/ops/packed_mask.py): uint8 (rows, ceil(cols / 8)), entry (i, j) is bit j % 8 of
byte [i, j // 8], least significant bit first, padding bits 0. The streaming kernels walk a matrix in tiles of
[BLOCK_R rows, BLOCK_B bytes, 8 bits]: the last axis is the bit within a byte, so one byte load serves 8
elements and packing is a sum of `bit << shift` over that axis.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# CUDA grid limit on axis 0; the kernels here use 1-D grids only (tile ids are decomposed in-kernel).
MAX_GRID = 2**31 - 1
# Elements per program of the streaming kernels: 8192 x 2 B = 16 KiB per bf16 operand, 32 per thread at
# num_warps=8, so every thread issues several 16-byte loads; enough bytes in flight to saturate H200 HBM.
TILE_ELEMS = 8192
STREAM_WARPS = 8

# Every launch passes this: no fused multiply-add contraction, so kernels round exactly like the torch
# references (two products and one subtraction stay three roundings). It also silences triton's warning.
LAUNCH_OPTS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_grid(op: str, n_programs: int) -> None:
    """K4: the grid must fit CUDA's axis-0 limit."""
    if n_programs > MAX_GRID:
        raise RuntimeError(f"{op}: {n_programs} programs exceed the CUDA grid limit of {MAX_GRID} on axis 0")


def check_numel(op: str, n: int, limit: int = 2**31 - 1, what: str = "elements") -> None:
    if n > limit:
        raise RuntimeError(f"{op}: {n} {what} exceed the kernel's limit of {limit} (int32 counters)")


def tile_shape(rows: int, cols: int, elems: int = TILE_ELEMS) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_B) with BLOCK_R * BLOCK_B * 8 <= elems; a tile spans whole rows unless cols > elems.

    Either BLOCK_R == 1 or one column tile covers a row, so tiles in program order are in flat (row-major)
    order, which the tie fill of matrix_topk_mask relies on.
    """
    block_c = max(8, min(triton.next_power_of_2(cols), elems))
    block_r = max(1, min(elems // block_c, triton.next_power_of_2(rows)))
    return block_r, block_c // 8


def n_tiles(rows: int, cols: int, block_r: int, block_b: int) -> tuple[int, int]:
    """(number of programs, column tiles per row tile) for `tile_shape`'s tiles."""
    col_tiles = triton.cdiv(triton.cdiv(cols, 8), block_b)
    return triton.cdiv(rows, block_r) * col_tiles, col_tiles


@triton.jit
def tile_coords(
    pid,  # int64 program id
    rows,  # logical rows
    cols,  # logical cols
    col_tiles,  # column tiles per row tile
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # mask bytes per tile row (8 elements each)
):
    """Coordinates of one [BLOCK_R, BLOCK_B, 8] tile: row (R,1,1), col (1,B,8), element mask, byte (1,B), byte mask."""
    tr = pid // col_tiles
    tc = pid % col_tiles
    r = tr * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [R]
    b = tc * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # [B]
    s = tl.arange(0, 8).to(tl.int64)  # [8]
    r3 = r[:, None, None]
    c3 = b[None, :, None] * 8 + s[None, None, :]
    valid3 = (r3 < rows) & (c3 < cols)
    nbytes = (cols + 7) // 8
    bvalid2 = (r[:, None] < rows) & (b[None, :] < nbytes)
    return r3, c3, valid3, r[:, None], b[None, :], bvalid2


@triton.jit
def unpack_bits(
    bits_ptr,  # uint8 (rows, nbytes) PackedMask bits
    r2,  # [R, 1] int64 rows
    b2,  # [1, B] int64 byte columns
    bvalid2,  # [R, B] byte mask
    nbytes,  # bytes per mask row
):
    """[R, B, 8] int1: bit s of byte bits[r, b], one load per 8 elements."""
    byte = tl.load(bits_ptr + r2 * nbytes + b2, mask=bvalid2, other=0).to(tl.int32)
    s = tl.arange(0, 8)
    return ((byte[:, :, None] >> s[None, None, :]) & 1) != 0


@triton.jit
def pack_bits3(
    keep,  # [R, B, 8] int1, the last axis is the bit within a byte
):
    """uint8 [R, B]: sum over the last axis of keep << bit."""
    s = tl.arange(0, 8)
    return tl.sum(keep.to(tl.int32) << s[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def pack_bits2(
    keep,  # [B, 8] int1, the last axis is the bit within a byte
):
    """uint8 [B]: sum over the last axis of keep << bit."""
    s = tl.arange(0, 8)
    return tl.sum(keep.to(tl.int32) << s[None, :], axis=1).to(tl.uint8)


@triton.jit
def cast_rtne(
    y,  # fp32 tensor
    DTYPE: tl.constexpr,  # target dtype
):
    """y cast to DTYPE rounding to nearest even; fp32 -> bf16 by hand (torch's bit trick, NaN -> 0x7FC0).

    The interpreter truncates fp32 -> bf16 instead of rounding; the bit trick is exact on both and costs a
    few integer ops in a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)
