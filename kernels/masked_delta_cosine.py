"""Triton masked_delta_cosine: the three sums of cos(M*(t - base), M*(e - base)) in one pass (docs/algorithm.md §4).

Streaming tiles of [BLOCK_R, BLOCK_B, 8] = TILE_ELEMS elements per program (num_warps=8): one mask byte load
per 8 elements, t, e (and base) read once. Each program writes its three fp32 partial sums (a tree sum over
8192 products); the host side adds the per-program partials in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import (
    LAUNCH_OPTS,
    STREAM_WARPS,
    check_grid,
    n_tiles,
    tile_coords,
    tile_shape,
    unpack_bits,
)


@triton.jit
def _masked_delta_cosine_kernel(
    Partial_ptr,  # out: (3, n_programs) fp32 partial sums (dot, |a|^2, |b|^2)
    T_ptr,  # in: (rows, cols) contiguous fine-tuned weights
    E_ptr,  # in: (rows, cols) contiguous reference weights
    Base_ptr,  # in: (rows, cols) contiguous base weights (unused unless HAS_BASE)
    Bits_ptr,  # in: (rows, ceil(cols / 8)) uint8 PackedMask bits
    rows,  # rows of the matrix (1 for a 1-D tensor)
    cols,  # columns of the matrix
    col_tiles,  # column tiles per row tile
    n_programs,  # grid size (row stride of Partial_ptr)
    HAS_BASE: tl.constexpr,  # subtract base from t and e
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_B: tl.constexpr,  # mask bytes per tile row
):
    """a = t - base, b = e - base; partial[:, pid] = (sum m*a*b, sum m*a*a, sum m*b*b) over one tile, fp32."""
    pid = tl.program_id(0).to(tl.int64)
    r3, c3, valid3, r2, b2, bvalid2 = tile_coords(pid, rows, cols, col_tiles, BLOCK_R, BLOCK_B)
    m = unpack_bits(Bits_ptr, r2, b2, bvalid2, (cols + 7) // 8)
    offs = r3 * cols + c3
    a = tl.load(T_ptr + offs, mask=valid3, other=0.0).to(tl.float32)
    b = tl.load(E_ptr + offs, mask=valid3, other=0.0).to(tl.float32)
    if HAS_BASE:
        w0 = tl.load(Base_ptr + offs, mask=valid3, other=0.0).to(tl.float32)
        a = a - w0
        b = b - w0
    # out-of-range lanes load 0 and their mask bits are 0, so where() only drops masked-off entries (and NaNs there)
    a = tl.where(m, a, 0.0)
    b = tl.where(m, b, 0.0)
    dot = tl.sum(tl.sum(tl.sum(a * b, axis=2), axis=1), axis=0)
    naa = tl.sum(tl.sum(tl.sum(a * a, axis=2), axis=1), axis=0)
    nbb = tl.sum(tl.sum(tl.sum(b * b, axis=2), axis=1), axis=0)
    tl.store(Partial_ptr + pid, dot)
    tl.store(Partial_ptr + n_programs + pid, naa)
    tl.store(Partial_ptr + 2 * n_programs + pid, nbb)


def masked_delta_cosine_triton(
    t: torch.Tensor, e: torch.Tensor, bits: torch.Tensor, base: torch.Tensor | None
) -> tuple[float, float, float]:
    """(sum m*a*b, sum m*a^2, sum m*b^2), a = t - base, b = e - base; inputs contiguous, `bits` (rows, nbytes)."""
    if t.numel() == 0:
        return 0.0, 0.0, 0.0
    rows, cols = bits.shape[0], t.numel() // bits.shape[0]
    block_r, block_b = tile_shape(rows, cols)
    grid, col_tiles = n_tiles(rows, cols, block_r, block_b)
    check_grid("masked_delta_cosine", grid)
    partial = torch.empty(3, grid, dtype=torch.float32, device=t.device)
    _masked_delta_cosine_kernel[(grid,)](
        partial, t, e, t if base is None else base, bits, rows, cols, col_tiles, grid,
        HAS_BASE=base is not None, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=STREAM_WARPS, **LAUNCH_OPTS,
    )  # fmt: skip
    dot, naa, nbb = partial.double().sum(dim=1).tolist()
    return dot, naa, nbb
