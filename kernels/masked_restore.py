"""Triton masked_restore: out = where(mask, source, target) in target's dtype, bit-exact (docs/algorithm.md §6).

Streaming tiles of [BLOCK_R, BLOCK_B, 8] = TILE_ELEMS elements per program (num_warps=8): one mask byte load
per 8 elements, target and source read once, out written once. `out` may alias `target` (each element is read
and written by the same program). Unmasked entries are stored from target's loaded bits without arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import (
    LAUNCH_OPTS,
    STREAM_WARPS,
    cast_rtne,
    check_grid,
    n_tiles,
    tile_coords,
    tile_shape,
    unpack_bits,
)


@triton.jit
def _masked_restore_kernel(
    Out_ptr,  # out: (rows, cols) contiguous, target's dtype (may be Target_ptr)
    Target_ptr,  # in: (rows, cols) contiguous
    Source_ptr,  # in: (rows, cols) contiguous, any float dtype
    Bits_ptr,  # in: (rows, ceil(cols / 8)) uint8 PackedMask bits
    rows,  # rows of the matrix (1 for a 1-D tensor)
    cols,  # columns of the matrix
    col_tiles,  # column tiles per row tile
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # mask bytes per tile row
):
    """out[i, j] = source[i, j] (cast to target's dtype, round to nearest even) if bit (i, j) else target[i, j]."""
    pid = tl.program_id(0).to(tl.int64)
    r3, c3, valid3, r2, b2, bvalid2 = tile_coords(pid, rows, cols, col_tiles, BLOCK_R, BLOCK_B)
    m = unpack_bits(Bits_ptr, r2, b2, bvalid2, (cols + 7) // 8)
    offs = r3 * cols + c3
    t = tl.load(Target_ptr + offs, mask=valid3)
    s = tl.load(Source_ptr + offs, mask=valid3)
    if Source_ptr.dtype.element_ty != Target_ptr.dtype.element_ty:
        # same-dtype copies stay bit moves; a dtype change goes through fp32 (exact) and rounds once
        s = cast_rtne(s.to(tl.float32), Target_ptr.dtype.element_ty)
    tl.store(Out_ptr + offs, tl.where(m, s, t), mask=valid3)


def masked_restore_triton(
    target: torch.Tensor, source: torch.Tensor, bits: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Fill `out` with where(mask, source, target); all contiguous, 1-D or 2-D, `bits` the mask's (rows, nbytes)."""
    rows, cols = bits.shape[0], target.numel() // max(bits.shape[0], 1)
    if target.numel() == 0:
        return out
    block_r, block_b = tile_shape(rows, cols)
    grid, col_tiles = n_tiles(rows, cols, block_r, block_b)
    check_grid("masked_restore", grid)
    _masked_restore_kernel[(grid,)](
        out, target, source, bits, rows, cols, col_tiles,
        BLOCK_R=block_r, BLOCK_B=block_b, num_warps=STREAM_WARPS, **LAUNCH_OPTS,
    )  # fmt: skip
    return out
