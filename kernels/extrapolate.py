"""Triton extrapolate: out = c1 * a - c0 * b, c1 = fp32(1 + alpha), c0 = fp32(alpha) (docs/algorithm.md §2, dense mode).

One flat streaming pass over contiguous tensors: TILE_ELEMS elements per program, num_warps=8, fp32 math,
one cast at the store. FMA contraction is disabled at launch so the result rounds exactly like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import LAUNCH_OPTS, STREAM_WARPS, TILE_ELEMS, cast_rtne, check_grid


@triton.jit
def _extrapolate_kernel(
    Out_ptr,  # out: (n,) contiguous, any float dtype
    A_ptr,  # in: (n,) contiguous aligned weights
    B_ptr,  # in: (n,) contiguous base weights
    n,  # number of elements
    c1,  # fp32(1 + alpha)
    c0,  # fp32(alpha)
    BLOCK: tl.constexpr,  # elements per program
):
    """out[i] = c1 * a[i] - c0 * b[i], fp32 products and subtraction, cast once to out's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    a = tl.load(A_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    y = c1 * a - c0 * b
    tl.store(Out_ptr + offs, cast_rtne(y, Out_ptr.dtype.element_ty), mask=valid)


def extrapolate_triton(aligned: torch.Tensor, base: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (contiguous, same numel) with (1 + alpha) * aligned - alpha * base; inputs contiguous."""
    n = aligned.numel()
    if n == 0:
        return out
    grid = triton.cdiv(n, TILE_ELEMS)
    check_grid("extrapolate", grid)
    c1 = torch.tensor(1.0 + alpha, dtype=torch.float32).item()
    c0 = torch.tensor(alpha, dtype=torch.float32).item()
    _extrapolate_kernel[(grid,)](out, aligned, base, n, c1, c0, BLOCK=TILE_ELEMS, num_warps=STREAM_WARPS, **LAUNCH_OPTS)
    return out
