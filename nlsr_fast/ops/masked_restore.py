"""masked_restore: out = where(mask, source, target) (docs/algorithm.md §6), bit-exact, in target's dtype."""

from __future__ import annotations

import torch

from nlsr_fast.ops._cpu import contiguous_out
from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_mask, check_matrix, check_same
from nlsr_fast.ops.packed_mask import PackedMask

OP = "masked_restore"


@register(OP, Backend.REFERENCE)
def masked_restore_reference(
    target: torch.Tensor, source: torch.Tensor, mask: PackedMask, out: torch.Tensor
) -> torch.Tensor:
    """The spec: masked entries take source's value (cast to target's dtype), the rest keep target's bits."""
    out.copy_(torch.where(mask.to_bool(), source.to(target.dtype), target))
    return out


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _masked_restore_cpu(
    target: torch.Tensor, source: torch.Tensor, mask: PackedMask, out: torch.Tensor
) -> torch.Tensor:
    from nlsr_fast.ops._cpu import dtype_code, mask_dims
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    t = target.contiguous()
    s = source.contiguous()
    dst = contiguous_out(out)
    C.masked_restore(
        dst.data_ptr(), t.data_ptr(), dtype_code(t), s.data_ptr(), dtype_code(s), mask.bits.data_ptr(), *mask_dims(mask)
    )
    if dst is not out:
        out.copy_(dst)
    return out


# --- triton backend ---


@register(OP, Backend.TRITON)
def _masked_restore_triton(
    target: torch.Tensor, source: torch.Tensor, mask: PackedMask, out: torch.Tensor
) -> torch.Tensor:
    from nlsr_fast.kernels.masked_restore import masked_restore_triton  # lazy: triton is optional

    dst = contiguous_out(out)
    masked_restore_triton(target.contiguous(), source.contiguous(), mask.bits, dst)
    if dst is not out:
        out.copy_(dst)
    return out


def masked_restore(
    target: torch.Tensor,
    source: torch.Tensor,
    mask: PackedMask,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Restoration of one tensor: where(mask, source, target).

    Args:
        target: (d_out, d_in) or (n,), fp32/fp16/bf16 (the fine-tuned weights).
        source: same shape and device (the reference weights); cast to target's dtype.
        mask: PackedMask of target's shape: true entries take source's value.
        out: optional output of target's shape and dtype (may be `target` itself); default a new tensor.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        `out`, in target's dtype; entries where mask is false are bit-identical to target.
    """
    check_matrix("target", target, ndims=(1, 2))
    check_matrix("source", source, ndims=(1, 2))
    check_same("target", target, "source", source)
    check_mask("mask", mask, tuple(target.shape), target.device)
    if out is None:
        out = torch.empty_like(target, memory_format=torch.contiguous_format)
    else:
        check_same("target", target, "out", out, dtype=True)
    return select(OP, target.device, backend)(target, source, mask, out)
