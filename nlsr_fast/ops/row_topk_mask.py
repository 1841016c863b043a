"""row_topk_mask: per-row top-k of the fused score |W| * col_scale[j] * grad[i, j] (docs/algorithm.md §3, wanda /
snip)."""

from __future__ import annotations

import torch

from nlsr_fast.ops._counts import keep_count
from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_keep, check_matrix, check_same
from nlsr_fast.ops.packed_mask import PackedMask

OP = "row_topk_mask"


def row_scores_reference(
    weight: torch.Tensor, col_scale: torch.Tensor | None, grad: torch.Tensor | None
) -> torch.Tensor:
    """fp32 score, multiplied in this order in every backend: (|W| * col_scale[j]) * grad[i, j]."""
    score = weight.float().abs()
    if col_scale is not None:
        score = score * col_scale.float()[None, :]
    if grad is not None:
        score = score * grad.float()
    return score


@register(OP, Backend.REFERENCE)
def row_topk_mask_reference(
    weight: torch.Tensor, k: int, col_scale: torch.Tensor | None, grad: torch.Tensor | None
) -> PackedMask:
    """The spec: the k highest scores of each row (ties broken by torch.topk, any order is accepted)."""
    score = row_scores_reference(weight, col_scale, grad)
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k > 0:
        keep.scatter_(1, torch.topk(score, k, dim=1, sorted=False).indices, True)
    return PackedMask.from_bool(keep)


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _row_topk_mask_cpu(
    weight: torch.Tensor, k: int, col_scale: torch.Tensor | None, grad: torch.Tensor | None
) -> PackedMask:
    from nlsr_fast.ops._cpu import dtype_code
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    w = weight.contiguous()
    # The kernel reads col_scale as fp32 (exact for fp16/bf16), the dtype the score is computed in.
    cs = None if col_scale is None else col_scale.float().contiguous()
    g = None if grad is None else grad.contiguous()
    mask = PackedMask.empty(tuple(w.shape), device=w.device)
    C.row_topk_mask(
        mask.bits.data_ptr(),
        w.data_ptr(),
        dtype_code(w),
        0 if cs is None else cs.data_ptr(),
        0 if g is None else g.data_ptr(),
        0 if g is None else dtype_code(g),
        mask.rows,
        mask.cols,
        k,
    )
    return mask


# --- triton backend ---


@register(OP, Backend.TRITON)
def _row_topk_mask_triton(
    weight: torch.Tensor, k: int, col_scale: torch.Tensor | None, grad: torch.Tensor | None
) -> PackedMask:
    from nlsr_fast.kernels.row_topk_mask import row_topk_mask_triton  # lazy: triton is optional

    mask = PackedMask.empty(tuple(weight.shape), device=weight.device)
    row_topk_mask_triton(
        weight.contiguous(),
        k,
        None if col_scale is None else col_scale.contiguous(),
        None if grad is None else grad.contiguous(),
        mask.bits,
    )
    return mask


def row_topk_mask(
    weight: torch.Tensor,
    keep: float,
    *,
    col_scale: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    k: int | None = None,
    backend: str | None = None,
) -> PackedMask:
    """Mask of the highest-scoring share `keep` of each row, score = |W| * col_scale[j] * grad[i, j].

    Args:
        weight: (d_out, d_in) fp32/fp16/bf16.
        keep: share kept per row in [0, 1]; each row keeps d_in - floor((1 - keep) * d_in) entries, the product
            snapped to the nearest integer when within 1e-9 of it (docs/algorithm.md §3 "Counts").
        col_scale: optional (d_in,) non-negative per-column factor (wanda: sqrt of the mean squared input).
        grad: optional (d_out, d_in) non-negative factor (snip: summed |gradients|).
        k: optional exact per-row count overriding `keep` (0 <= k <= d_in).
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        PackedMask (d_out, d_in) with exactly k true entries in every row; ties at the threshold are broken by
        a stable order in the kernels.
    """
    check_matrix("weight", weight)
    check_keep(keep)
    d_out, d_in = weight.shape
    if col_scale is not None:
        check_matrix("col_scale", col_scale, ndims=(1,))
        if tuple(col_scale.shape) != (d_in,) or col_scale.device != weight.device:
            raise ValueError(
                f"col_scale must be ({d_in},) on {weight.device}, got {tuple(col_scale.shape)} on {col_scale.device}"
            )
    if grad is not None:
        check_matrix("grad", grad)
        check_same("weight", weight, "grad", grad)
    if k is None:
        k = keep_count(d_in, float(keep))
    elif not 0 <= k <= d_in:
        raise ValueError(f"k must be in [0, {d_in}], got {k}")
    return select(OP, weight.device, backend)(weight, int(k), col_scale, grad)
