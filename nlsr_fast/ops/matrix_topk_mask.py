"""matrix_topk_mask: top-k of |x| over the whole matrix (docs/algorithm.md §3, low_rank)."""

from __future__ import annotations

import torch

from nlsr_fast.ops._counts import keep_count
from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_keep, check_matrix
from nlsr_fast.ops.packed_mask import PackedMask

OP = "matrix_topk_mask"


@register(OP, Backend.REFERENCE)
def matrix_topk_mask_reference(x: torch.Tensor, k: int) -> PackedMask:
    """The spec: the k largest |x| of the whole matrix (ties broken by torch.topk, any order is accepted)."""
    score = x.float().abs().reshape(-1)
    keep = torch.zeros(score.numel(), dtype=torch.bool, device=x.device)
    if k > 0:
        keep[torch.topk(score, k, sorted=False).indices] = True
    return PackedMask.from_bool(keep.reshape(x.shape))


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _matrix_topk_mask_cpu(x: torch.Tensor, k: int) -> PackedMask:
    from nlsr_fast.ops._cpu import dtype_code
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    x = x.contiguous()
    mask = PackedMask.empty(tuple(x.shape), device=x.device)
    C.matrix_topk_mask(mask.bits.data_ptr(), x.data_ptr(), dtype_code(x), mask.rows, mask.cols, k)
    return mask


# --- triton backend ---


@register(OP, Backend.TRITON)
def _matrix_topk_mask_triton(x: torch.Tensor, k: int) -> PackedMask:
    from nlsr_fast.kernels.matrix_topk_mask import matrix_topk_mask_triton  # lazy: triton is optional

    mask = PackedMask.empty(tuple(x.shape), device=x.device)
    matrix_topk_mask_triton(x.contiguous(), k, mask.bits)
    return mask


def matrix_topk_mask(
    x: torch.Tensor, keep: float, *, k: int | None = None, backend: str | None = None
) -> PackedMask:
    """Mask of the largest share `keep` of |x| over the whole matrix.

    Args:
        x: (d_out, d_in) or (n,), fp32/fp16/bf16.
        keep: share kept in [0, 1]; keeps n - floor((1 - keep) * n) entries, n = x.numel(), the product snapped to
            the nearest integer when within 1e-9 of it (docs/algorithm.md §3 "Counts").
        k: optional exact count overriding `keep` (0 <= k <= n), e.g. the `official` preset's n - floor(s*n) - 1.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        PackedMask of x's shape with exactly k true entries (selection, not a full sort; ties broken by a
        stable order in the kernels).
    """
    check_matrix("x", x, ndims=(1, 2))
    check_keep(keep)
    n = x.numel()
    if k is None:
        k = keep_count(n, float(keep))
    elif not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    return select(OP, x.device, backend)(x, int(k))
