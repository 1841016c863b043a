"""masked_gather / masked_scatter: the entries of a tensor under a PackedMask, as a 1-D tensor in row-major order,
and back (the executor's stash of restoration values between its two passes, docs/architecture.md, "The two passes").

Elements are moved as raw bits (nothing is rounded), so masked_scatter(t, m, masked_gather(s, m)) equals
masked_restore(t, s, m) whenever s has t's dtype. masked_scatter also counts the masked entries whose bits changed
(the report's "entries changed", counted by `changed_bits` here and in pipeline.changed_entries).
"""

from __future__ import annotations

import torch

from nlsr_fast.ops._cpu import contiguous_out
from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_mask, check_matrix
from nlsr_fast.ops.packed_mask import PackedMask

__all__ = ["changed_bits", "masked_gather", "masked_gather_reference", "masked_scatter", "masked_scatter_reference"]

GATHER, SCATTER = "masked_gather", "masked_scatter"
_RAW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers of its element size (comparisons are then bitwise: NaN payloads and -0.0 count)."""
    return t.contiguous().view(_RAW[t.element_size()])


def changed_bits(old: torch.Tensor, new: torch.Tensor) -> int:
    """Number of entries whose bits differ between two float tensors of the same shape and dtype."""
    return int(torch.count_nonzero(_raw(old) != _raw(new)))


@register(GATHER, Backend.REFERENCE)
def masked_gather_reference(source: torch.Tensor, mask: PackedMask) -> torch.Tensor:
    """The spec: torch.masked_select (row-major order)."""
    return torch.masked_select(source, mask.to_bool())


@register(SCATTER, Backend.REFERENCE)
def masked_scatter_reference(target: torch.Tensor, mask: PackedMask, values: torch.Tensor,
                             out: torch.Tensor) -> int:
    """The spec: out = target with Tensor.masked_scatter_ of values; changed = bitwise differences under the mask."""
    keep = mask.to_bool()
    old = torch.masked_select(target, keep)
    out.copy_(target).masked_scatter_(keep, values)
    return changed_bits(old, values)


def _starts(mask: PackedMask) -> torch.Tensor:
    """(rows,) int64: the set bits of the rows before each row (where a row's values begin)."""
    counts = mask.row_counts()
    return torch.cumsum(counts, 0) - counts


# --- cpu backend (C++ core) ---


@register(GATHER, Backend.CPU)
def _masked_gather_cpu(source: torch.Tensor, mask: PackedMask) -> torch.Tensor:
    from nlsr_fast.ops._registry import require_cpp

    s = source.contiguous()
    values = torch.empty(mask.count(), dtype=s.dtype)
    require_cpp().masked_gather(values.data_ptr(), s.data_ptr(), s.element_size(), mask.bits.data_ptr(), mask.rows,
                                mask.cols)
    return values


@register(SCATTER, Backend.CPU)
def _masked_scatter_cpu(target: torch.Tensor, mask: PackedMask, values: torch.Tensor, out: torch.Tensor) -> int:
    from nlsr_fast.ops._registry import require_cpp

    dst = contiguous_out(out)
    dst.copy_(target)
    v = values.contiguous()
    changed = require_cpp().masked_scatter(dst.data_ptr(), v.data_ptr(), dst.element_size(), mask.bits.data_ptr(),
                                           mask.rows, mask.cols)
    if dst is not out:
        out.copy_(dst)
    return int(changed)


# --- triton backend ---


@register(GATHER, Backend.TRITON)
def _masked_gather_triton(source: torch.Tensor, mask: PackedMask) -> torch.Tensor:
    from nlsr_fast.kernels.masked_values import masked_gather_triton  # lazy: triton is optional

    s = source.contiguous()
    values = torch.empty(mask.count(), dtype=s.dtype, device=s.device)
    masked_gather_triton(_raw(values), _raw(s), mask.bits, _starts(mask))
    return values


@register(SCATTER, Backend.TRITON)
def _masked_scatter_triton(target: torch.Tensor, mask: PackedMask, values: torch.Tensor, out: torch.Tensor) -> int:
    from nlsr_fast.kernels.masked_values import masked_scatter_triton  # lazy: triton is optional

    dst = contiguous_out(out)
    dst.copy_(target)
    changed = masked_scatter_triton(_raw(dst), _raw(values.contiguous()), mask.bits, _starts(mask))
    if dst is not out:
        out.copy_(dst)
    return changed


def masked_gather(source: torch.Tensor, mask: PackedMask, *, backend: str | None = None) -> torch.Tensor:
    """The entries of `source` under `mask`, in row-major order.

    Args:
        source: (d_out, d_in) or (n,), fp32/fp16/bf16.
        mask: PackedMask of source's shape, on its device.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        A 1-D tensor of mask.count() elements, source's dtype and device, bit-exact copies.
    """
    check_matrix("source", source, ndims=(1, 2))
    check_mask("mask", mask, tuple(source.shape), source.device)
    return select(GATHER, source.device, backend)(source, mask)


def masked_scatter(target: torch.Tensor, mask: PackedMask, values: torch.Tensor, *, out: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[torch.Tensor, int]:
    """A copy of `target` whose masked entries take `values` (row-major), and how many of them changed bits.

    Args:
        target: (d_out, d_in) or (n,), fp32/fp16/bf16.
        mask: PackedMask of target's shape, on its device.
        values: 1-D, mask.count() elements of target's dtype, on its device.
        out: optional output of target's shape and dtype (not overlapping target); default a new tensor.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        (`out`, target's shape and dtype; entries whose bits differ from target's under the mask).
    """
    check_matrix("target", target, ndims=(1, 2))
    check_mask("mask", mask, tuple(target.shape), target.device)
    if values.dim() != 1 or values.dtype != target.dtype or values.device != target.device:
        raise ValueError(f"masked_scatter: values must be 1-D {target.dtype} on {target.device}, got "
                         f"{values.dim()}-D {values.dtype} on {values.device}")
    count = mask.count()
    if values.numel() != count:
        raise ValueError(f"masked_scatter: {values.numel()} values for a mask of {count} entries")
    if out is None:
        out = torch.empty_like(target, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(target.shape) or out.dtype != target.dtype or out.device != target.device:
        raise ValueError(f"masked_scatter: out must be {target.dtype} {list(target.shape)} on {target.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    changed = select(SCATTER, target.device, backend)(target, mask, values, out)
    return out, changed
