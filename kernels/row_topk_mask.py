"""Triton row_topk_mask: exactly k of each row by the fused score (|W| * col_scale[j]) * grad[i, j]
(docs/algorithm.md §3).

One program per row (or per few narrow rows). The score is non-negative fp32, so its bit pattern (sign cleared,
NaN above +inf) orders like the value: the k-th largest key T is found by a radix-4 search over the 31 key bits,
resolving 2 bits per pass with one reduction (three counts packed in 21-bit fields of an int64 sum), 16 passes
in all. The row keeps every key > T and the first (lowest column) keys == T until it holds k; its packed bytes
are written directly (each row owns its bytes, padding bits 0).

Rows of up to ROW_IN_REGISTERS columns are scored once and held in registers (BLOCK_B x 8 tile, num_warps up to
16); wider rows are re-read in chunks of CHUNK_COLS for every pass (18 reads, served mostly by L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import LAUNCH_OPTS, check_grid, pack_bits3

ROW_IN_REGISTERS = 32768  # 128 KiB of fp32 keys per program: 64 per thread at num_warps=16
CHUNK_COLS = 8192
ROW_TILE = 4096  # elements per program when rows are narrow
MAX_COLS = 2**21 - 1  # the three packed counts of a pass are 21-bit fields
_FIELD = (1 << 21) - 1


@triton.jit
def _row_keys(
    W_ptr,  # (rows, cols) weights, row stride stride_w
    Scale_ptr,  # (cols,) column factor (unused unless HAS_SCALE)
    G_ptr,  # (rows, cols) element factor, row stride stride_g (unused unless HAS_GRAD)
    r,  # [BLOCK_R] int64 row indices
    b0,  # int64 first byte column of the chunk
    rows,  # rows
    cols,  # columns
    stride_w,  # row stride of W
    stride_g,  # row stride of G
    HAS_SCALE: tl.constexpr,  # multiply by Scale
    HAS_GRAD: tl.constexpr,  # multiply by G
    BLOCK_B: tl.constexpr,  # bytes (8 columns each) in the chunk
):
    """[BLOCK_R, BLOCK_B, 8] int32 keys: bits of (|w| * scale) * g with the sign cleared; -1 outside the matrix."""
    b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
    c = b[None, :, None] * 8 + tl.arange(0, 8).to(tl.int64)[None, None, :]
    r3 = r[:, None, None]
    valid = (r3 < rows) & (c < cols)
    score = tl.abs(tl.load(W_ptr + r3 * stride_w + c, mask=valid, other=0.0).to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(Scale_ptr + c, mask=c < cols, other=0.0).to(tl.float32)
    if HAS_GRAD:
        score = score * tl.load(G_ptr + r3 * stride_g + c, mask=valid, other=0.0).to(tl.float32)
    key = score.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(valid, key, -1)


@triton.jit
def _count3(
    key,  # [BLOCK_R, BLOCK_B, 8] int32 keys
    c1,  # [BLOCK_R] int32 candidate thresholds, c1 <= c2 <= c3
    c2,
    c3,
):
    """[BLOCK_R] int64: #(key >= c1) + #(key >= c2) << 21 + #(key >= c3) << 42 per row, one reduction."""
    v = (
        (key >= c1[:, None, None]).to(tl.int64)
        + ((key >= c2[:, None, None]).to(tl.int64) << 21)
        + ((key >= c3[:, None, None]).to(tl.int64) << 42)
    )
    return tl.sum(tl.sum(v, axis=2), axis=1)


@triton.jit
def _tie_fill(
    key,  # [BLOCK_R, BLOCK_B, 8] int32 keys
    t,  # [BLOCK_R] int32 k-th largest key of each row
    budget,  # [BLOCK_R] int32 ties this chunk may still keep
):
    """(keep, ties seen [BLOCK_R]): keep = key > t, or key == t among the first `budget` ties in column order."""
    eq = (key == t[:, None, None]).to(tl.int32)
    within = tl.cumsum(eq, axis=2)  # inclusive rank inside a byte
    per_byte = tl.sum(eq, axis=2)
    before = tl.cumsum(per_byte, axis=1) - per_byte  # ties in earlier bytes of the chunk
    keep = (key > t[:, None, None]) | ((eq != 0) & (within + before[:, :, None] <= budget[:, None, None]))
    return keep, tl.sum(per_byte, axis=1)


@triton.jit
def _row_topk_mask_kernel(
    Bits_ptr,  # out: (rows, ceil(cols / 8)) uint8 PackedMask bits
    W_ptr,  # in: (rows, cols) weights, last dim contiguous
    Scale_ptr,  # in: (cols,) column factor, or any pointer when not HAS_SCALE
    G_ptr,  # in: (rows, cols) element factor, last dim contiguous, or any pointer when not HAS_GRAD
    rows,  # rows
    cols,  # columns
    k,  # entries kept per row, 0 <= k <= cols
    stride_w,  # row stride of W
    stride_g,  # row stride of G
    HAS_SCALE: tl.constexpr,  # multiply by Scale
    HAS_GRAD: tl.constexpr,  # multiply by G
    IN_REGISTERS: tl.constexpr,  # whole rows fit in one BLOCK_B x 8 tile
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_B: tl.constexpr,  # bytes per tile row (8 columns each)
):
    """bits[i] = pack(key > T | (key == T & tie rank <= k - #(key > T))), T = k-th largest key of row i."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    nbytes = (cols + 7) // 8
    if IN_REGISTERS:
        key = _row_keys(W_ptr, Scale_ptr, G_ptr, r, 0, rows, cols, stride_w, stride_g, HAS_SCALE, HAS_GRAD, BLOCK_B)
    # t stays the largest value with #(key >= t) >= k: bits 30..1 two per pass, then bit 0 alone
    t = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for p in range(16):
        step = (1 << tl.maximum(29 - 2 * p, 0)).to(tl.int32)
        c1 = t + step
        # the last pass (shift 0) resolves one bit only: c2 / c3 are never accepted there
        c2 = tl.where(p < 15, t + 2 * step, 0x7FFFFFFF)
        c3 = tl.where(p < 15, t + 3 * step, 0x7FFFFFFF)
        if IN_REGISTERS:
            packed = _count3(key, c1, c2, c3)
        else:
            packed = tl.zeros((BLOCK_R,), dtype=tl.int64)
            for b0 in range(0, nbytes, BLOCK_B):
                kc = _row_keys(W_ptr, Scale_ptr, G_ptr, r, b0, rows, cols, stride_w, stride_g, HAS_SCALE, HAS_GRAD,
                               BLOCK_B)  # fmt: skip
                packed += _count3(kc, c1, c2, c3)
        n1 = packed & 0x1FFFFF
        n2 = (packed >> 21) & 0x1FFFFF
        n3 = packed >> 42
        t = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, t)))
    # with k == 0 the search ends at t = 2**31 - 1 and the tie budget is 0, so nothing is kept
    rmask = r[:, None] < rows
    b = tl.arange(0, BLOCK_B).to(tl.int64)[None, :]
    if IN_REGISTERS:
        n_gt = tl.sum(tl.sum((key > t[:, None, None]).to(tl.int32), axis=2), axis=1)
        keep, _ = _tie_fill(key, t, k - n_gt)
        tl.store(Bits_ptr + r[:, None] * nbytes + b, pack_bits3(keep), mask=rmask & (b < nbytes))
    else:
        n_gt = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for b0 in range(0, nbytes, BLOCK_B):
            kc = _row_keys(W_ptr, Scale_ptr, G_ptr, r, b0, rows, cols, stride_w, stride_g, HAS_SCALE, HAS_GRAD,
                           BLOCK_B)  # fmt: skip
            n_gt += tl.sum(tl.sum((kc > t[:, None, None]).to(tl.int32), axis=2), axis=1)
        budget = k - n_gt
        for b0 in range(0, nbytes, BLOCK_B):
            kc = _row_keys(W_ptr, Scale_ptr, G_ptr, r, b0, rows, cols, stride_w, stride_g, HAS_SCALE, HAS_GRAD,
                           BLOCK_B)  # fmt: skip
            keep, seen = _tie_fill(kc, t, budget)
            budget -= seen
            tl.store(Bits_ptr + r[:, None] * nbytes + b0 + b, pack_bits3(keep), mask=rmask & (b0 + b < nbytes))


def row_topk_mask_triton(
    weight: torch.Tensor,
    k: int,
    col_scale: torch.Tensor | None,
    grad: torch.Tensor | None,
    bits: torch.Tensor,
    *,
    chunk_cols: int | None = None,
) -> torch.Tensor:
    """Fill `bits` (rows, ceil(cols / 8)) uint8 with the per-row top-k mask; weight/grad last dim contiguous.

    `chunk_cols` forces the chunked (re-reading) path with that chunk width, for tests.
    """
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        return bits
    if cols > MAX_COLS:
        raise RuntimeError(f"row_topk_mask: {cols} columns exceed the kernel's limit of {MAX_COLS} (21-bit counts)")
    width = triton.next_power_of_2(max(cols, 8))
    in_registers = chunk_cols is None and width <= ROW_IN_REGISTERS
    block = width if in_registers else triton.next_power_of_2(max(chunk_cols or CHUNK_COLS, 8))
    # narrow rows share a program (LoRA B factors have r columns): about ROW_TILE elements per program
    block_r = max(1, min(ROW_TILE // block, triton.next_power_of_2(rows))) if in_registers else 1
    tile = block_r * block
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    grid = triton.cdiv(rows, block_r)
    check_grid("row_topk_mask", grid)
    _row_topk_mask_kernel[(grid,)](
        bits, weight, weight if col_scale is None else col_scale, weight if grad is None else grad,
        rows, cols, k, weight.stride(0), weight.stride(0) if grad is None else grad.stride(0),
        HAS_SCALE=col_scale is not None, HAS_GRAD=grad is not None, IN_REGISTERS=in_registers,
        BLOCK_R=block_r, BLOCK_B=block // 8, num_warps=num_warps, **LAUNCH_OPTS,
    )  # fmt: skip
    return bits
