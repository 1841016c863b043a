"""Helpers of the `cpu` backend adapters: dtype codes and contiguous buffers for nlsr_fast._C.

The C++ entry points take each tensor as an integer address (`data_ptr()`) plus a dtype code; see csrc/bindings.cpp.
"""

from __future__ import annotations

import torch

from nlsr_fast.ops.packed_mask import PackedMask

__all__ = ["contiguous_out", "dtype_code", "mask_dims"]

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(t: torch.Tensor) -> int:
    """The C++ core's code of t's dtype (0 float32, 1 float16, 2 bfloat16); the public functions validated it."""
    return _CODES[t.dtype]


def contiguous_out(out: torch.Tensor) -> torch.Tensor:
    """`out` itself when contiguous, else a contiguous buffer of its shape and dtype to copy back afterwards."""
    return out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)


def mask_dims(mask: PackedMask) -> tuple[int, int]:
    """(rows, cols) of a PackedMask as the kernels see it (a 1-D mask is one row)."""
    return mask.rows, mask.cols
