"""masked_delta_cosine: cos(M*(t - base), M*(e - base)) in one pass (docs/algorithm.md §4, dense mode)."""

from __future__ import annotations

import math
import warnings

import torch

from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_mask, check_matrix, check_same
from nlsr_fast.ops.packed_mask import PackedMask

OP = "masked_delta_cosine"


def cosine_from_sums(dot: float, norm_t_sq: float, norm_e_sq: float, name: str | None) -> float:
    """dot / sqrt(|t|^2 |e|^2), or 0.0 with a warning naming the module when a norm is zero."""
    if norm_t_sq <= 0.0 or norm_e_sq <= 0.0:
        which = "fine-tuned" if norm_t_sq <= 0.0 else "reference"
        warnings.warn(
            f"{name or 'masked cosine'}: the masked {which} delta has zero norm; similarity set to 0.0",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0.0
    return float(dot / math.sqrt(norm_t_sq * norm_e_sq))


@register(OP, Backend.REFERENCE)
def masked_delta_cosine_reference(
    t: torch.Tensor, e: torch.Tensor, mask: PackedMask, base: torch.Tensor | None
) -> tuple[float, float, float]:
    """The spec in fp64: returns the three sums (sum m*a*b, sum m*a^2, sum m*b^2), a = t - base, b = e - base."""
    m = mask.to_bool()
    a = t.double()
    b = e.double()
    if base is not None:
        a = a - base.double()
        b = b - base.double()
    a = a[m]
    b = b[m]
    return float((a * b).sum()), float((a * a).sum()), float((b * b).sum())


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _masked_delta_cosine_cpu(
    t: torch.Tensor, e: torch.Tensor, mask: PackedMask, base: torch.Tensor | None
) -> tuple[float, float, float]:
    from nlsr_fast.ops._cpu import dtype_code, mask_dims
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    t = t.contiguous()
    e = e.contiguous()
    b = None if base is None else base.contiguous()
    b_ptr, b_code = (0, 0) if b is None else (b.data_ptr(), dtype_code(b))
    return C.masked_delta_cosine(
        t.data_ptr(), dtype_code(t), e.data_ptr(), dtype_code(e), b_ptr, b_code, mask.bits.data_ptr(), *mask_dims(mask)
    )


# --- triton backend ---


@register(OP, Backend.TRITON)
def _masked_delta_cosine_triton(
    t: torch.Tensor, e: torch.Tensor, mask: PackedMask, base: torch.Tensor | None
) -> tuple[float, float, float]:
    from nlsr_fast.kernels.masked_delta_cosine import masked_delta_cosine_triton  # lazy: triton is optional

    return masked_delta_cosine_triton(
        t.contiguous(), e.contiguous(), mask.bits, None if base is None else base.contiguous()
    )


def masked_delta_cosine(
    t: torch.Tensor,
    e: torch.Tensor,
    mask: PackedMask,
    *,
    base: torch.Tensor | None = None,
    name: str | None = None,
    backend: str | None = None,
) -> float:
    """Cosine similarity of the masked deltas of two models for one tensor.

    Args:
        t: (d_out, d_in) or (n,), fp32/fp16/bf16 (fine-tuned weights).
        e: same shape and device, any float dtype (reference weights).
        mask: PackedMask of t's shape; only true entries count.
        base: optional, same shape and device (weights both deltas are taken from); absent means 0.
        name: module name used in the zero-norm warning.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        The cosine as a Python float, accumulated in fp64 (cpu, reference) or fp32 (triton); 0.0 with a
        RuntimeWarning when either masked delta has zero norm.
    """
    check_matrix("t", t, ndims=(1, 2))
    check_matrix("e", e, ndims=(1, 2))
    check_same("t", t, "e", e)
    if base is not None:
        check_matrix("base", base, ndims=(1, 2))
        check_same("t", t, "base", base)
    check_mask("mask", mask, tuple(t.shape), t.device)
    dot, nt, ne = select(OP, t.device, backend)(t, e, mask, base)
    return cosine_from_sums(dot, nt, ne, name)
