"""Triton matrix_topk_mask: exactly k of |x| over the whole matrix, by radix select (docs/algorithm.md §3, low_rank).

|x| as fp32 with the sign cleared orders like its bit pattern (NaN above +inf), so the k-th largest key T is
found digit by digit, most significant first, without sorting:
  1. three histogram passes over the flat tensor (digits of 11, 10 and 10 bits: bits 30..20, 19..10, 9..0);
     each pass counts the digits of the keys that match the prefix chosen so far. Programs loop over
     blocks (at most HIST_PROGRAMS programs) and flush one register histogram each with atomics;
  2. between passes the host side picks the digit where the count of larger keys crosses k;
  3. the write pass packs keep = key > T, plus keys == T in flat (row-major) order until k: when every key
     equal to T is needed (the usual case) no order is involved; otherwise a counting pass gives each tile its
     ties, an exclusive prefix sum over tiles gives each tile its start, and the write pass ranks ties inside
     the tile. Tiles are [BLOCK_R, BLOCK_B, 8] as in the streaming kernels, in flat order by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import (
    LAUNCH_OPTS,
    STREAM_WARPS,
    TILE_ELEMS,
    check_grid,
    check_numel,
    n_tiles,
    pack_bits3,
    tile_coords,
    tile_shape,
)

HIST_PROGRAMS = 1024  # enough to fill 132 SMs several times; bounds the atomics to 1024 x bins per pass
DIGITS = ((20, 11), (10, 10), (0, 10))  # (lowest bit, width) of each radix digit, most significant first


@triton.jit
def _abs_key(
    x,  # loaded values, any float dtype
):
    """int32 bits of |x| as fp32 (sign cleared): non-negative and ordered like |x|."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _matrix_topk_hist_kernel(
    Hist_ptr,  # out: (2**NBITS,) int32 digit counts, zeroed by the caller, accumulated with atomics
    X_ptr,  # in: (n,) contiguous values
    n,  # number of elements
    prefix,  # key bits above SHIFT + NBITS already chosen
    SHIFT: tl.constexpr,  # lowest bit of the digit
    NBITS: tl.constexpr,  # digit width
    BLOCK: tl.constexpr,  # elements per step
):
    """Hist[d] += #{i : key_i >> (SHIFT + NBITS) == prefix and (key_i >> SHIFT) & (2**NBITS - 1) == d}."""
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    hist = tl.zeros((1 << NBITS,), dtype=tl.int32)
    for start in range(pid * BLOCK, n, n_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = offs < n
        key = _abs_key(tl.load(X_ptr + offs, mask=valid, other=0.0))
        match = valid & ((key >> (SHIFT + NBITS)) == prefix)
        hist += tl.histogram((key >> SHIFT) & ((1 << NBITS) - 1), 1 << NBITS, mask=match)
    bins = tl.arange(0, 1 << NBITS)
    tl.atomic_add(Hist_ptr + bins, hist, mask=hist > 0)


@triton.jit
def _tile_keys(
    X_ptr,  # (rows, cols) contiguous values
    pid,  # int64 tile id
    rows,  # rows
    cols,  # columns
    col_tiles,  # column tiles per row tile
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # bytes per tile row
):
    """[BLOCK_R, BLOCK_B, 8] int32 keys of one tile, -1 outside the matrix; plus the byte coordinates."""
    r3, c3, valid3, r2, b2, bvalid2 = tile_coords(pid, rows, cols, col_tiles, BLOCK_R, BLOCK_B)
    key = _abs_key(tl.load(X_ptr + r3 * cols + c3, mask=valid3, other=0.0))
    return tl.where(valid3, key, -1), r2, b2, bvalid2


@triton.jit
def _matrix_topk_ties_kernel(
    Ties_ptr,  # out: (n_programs,) int32 number of keys == thresh in each tile
    X_ptr,  # in: (rows, cols) contiguous values
    rows,  # rows
    cols,  # columns
    col_tiles,  # column tiles per row tile
    thresh,  # the k-th largest key
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # bytes per tile row
):
    """Ties[pid] = #{key == thresh} in tile pid."""
    pid = tl.program_id(0).to(tl.int64)
    key, _, _, _ = _tile_keys(X_ptr, pid, rows, cols, col_tiles, BLOCK_R, BLOCK_B)
    tl.store(Ties_ptr + pid, tl.sum(tl.sum(tl.sum((key == thresh).to(tl.int32), axis=2), axis=1), axis=0))


@triton.jit
def _matrix_topk_mask_kernel(
    Bits_ptr,  # out: (rows, ceil(cols / 8)) uint8 PackedMask bits
    X_ptr,  # in: (rows, cols) contiguous values
    TieStart_ptr,  # in: (n_programs,) int64 ties in earlier tiles (read only when TIE_FILL)
    rows,  # rows
    cols,  # columns
    col_tiles,  # column tiles per row tile
    thresh,  # the k-th largest key
    need,  # keys == thresh to keep, the first in flat order
    TIE_FILL: tl.constexpr,  # False when every key == thresh is kept
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # bytes per tile row
):
    """bits = pack(key > thresh | (key == thresh & flat tie rank <= need))."""
    pid = tl.program_id(0).to(tl.int64)
    key, r2, b2, bvalid2 = _tile_keys(X_ptr, pid, rows, cols, col_tiles, BLOCK_R, BLOCK_B)
    if TIE_FILL:
        eq = (key == thresh).to(tl.int32)
        within = tl.cumsum(eq, axis=2)  # inclusive rank inside a byte
        per_byte = tl.sum(eq, axis=2)
        before_b = tl.cumsum(per_byte, axis=1) - per_byte  # ties in earlier bytes of the row
        per_row = tl.sum(per_byte, axis=1)
        before_r = tl.cumsum(per_row, axis=0) - per_row  # ties in earlier rows of the tile
        rank = tl.load(TieStart_ptr + pid) + (within + before_b[:, :, None] + before_r[:, None, None]).to(tl.int64)
        keep = (key > thresh) | ((eq != 0) & (rank <= need))
    else:
        keep = key >= thresh
    tl.store(Bits_ptr + r2 * ((cols + 7) // 8) + b2, pack_bits3(keep), mask=bvalid2)


def matrix_topk_mask_triton(x: torch.Tensor, k: int, bits: torch.Tensor) -> torch.Tensor:
    """Fill `bits` (rows, ceil(cols / 8)) uint8 with the top-k mask of |x|; x contiguous, 1-D or 2-D."""
    n = x.numel()
    rows = bits.shape[0]
    if n == 0:
        return bits
    if k == 0:
        return bits.zero_()
    cols = n // rows
    check_numel("matrix_topk_mask", n)
    dev = x.device
    flat = x.reshape(-1)
    hist_grid = min(triton.cdiv(n, TILE_ELEMS), HIST_PROGRAMS)
    prefix, remaining, ties = 0, k, 0
    for shift, nbits in DIGITS:
        hist = torch.zeros(1 << nbits, dtype=torch.int32, device=dev)
        _matrix_topk_hist_kernel[(hist_grid,)](
            hist, flat, n, prefix, SHIFT=shift, NBITS=nbits, BLOCK=TILE_ELEMS, num_warps=STREAM_WARPS, **LAUNCH_OPTS
        )
        counts = hist.tolist()
        # the largest digit d with #(keys >= d among the matching ones) >= remaining
        above = 0
        for d in range(len(counts) - 1, -1, -1):
            if above + counts[d] >= remaining:
                break
            above += counts[d]
        else:
            raise AssertionError("matrix_topk_mask: histogram holds fewer keys than k")
        prefix = (prefix << nbits) | d
        remaining -= above
        ties = counts[d]
    block_r, block_b = tile_shape(rows, cols)
    grid, col_tiles = n_tiles(rows, cols, block_r, block_b)
    check_grid("matrix_topk_mask", grid)
    tie_fill = remaining < ties
    if tie_fill:
        tie_counts = torch.empty(grid, dtype=torch.int32, device=dev)
        _matrix_topk_ties_kernel[(grid,)](
            tie_counts, x, rows, cols, col_tiles, prefix,
            BLOCK_R=block_r, BLOCK_B=block_b, num_warps=STREAM_WARPS, **LAUNCH_OPTS,
        )  # fmt: skip
        tie_start = torch.cumsum(tie_counts.long(), 0) - tie_counts.long()
    else:
        tie_start = bits  # unused
    _matrix_topk_mask_kernel[(grid,)](
        bits, x, tie_start, rows, cols, col_tiles, prefix, remaining,
        TIE_FILL=tie_fill, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=STREAM_WARPS, **LAUNCH_OPTS,
    )  # fmt: skip
    return bits
