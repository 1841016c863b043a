"""extrapolate: W_e = (1 + alpha) * W_a - alpha * W_0 (docs/algorithm.md §2, dense mode), fp32 math, cast once."""

from __future__ import annotations

import torch

from nlsr_fast.ops._cpu import contiguous_out
from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_matrix, check_same

OP = "extrapolate"


@register(OP, Backend.REFERENCE)
def extrapolate_reference(aligned: torch.Tensor, base: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """The spec: fp32 products (1+alpha)*a and alpha*b, one fp32 subtraction, one cast to out's dtype."""
    c1 = torch.tensor(1.0 + alpha, dtype=torch.float32).item()
    c0 = torch.tensor(alpha, dtype=torch.float32).item()
    out.copy_(aligned.float() * c1 - base.float() * c0)
    return out


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _extrapolate_cpu(aligned: torch.Tensor, base: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    from nlsr_fast.ops._cpu import dtype_code
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    a = aligned.contiguous()
    b = base.contiguous()
    dst = contiguous_out(out)
    C.extrapolate(
        dst.data_ptr(), dtype_code(dst), a.data_ptr(), dtype_code(a), b.data_ptr(), dtype_code(b), a.numel(), alpha
    )
    if dst is not out:
        out.copy_(dst)
    return out


# --- triton backend ---


@register(OP, Backend.TRITON)
def _extrapolate_triton(aligned: torch.Tensor, base: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    from nlsr_fast.kernels.extrapolate import extrapolate_triton  # lazy: triton is optional

    dst = contiguous_out(out)
    extrapolate_triton(aligned.contiguous(), base.contiguous(), alpha, dst)
    if dst is not out:
        out.copy_(dst)
    return out


def extrapolate(
    aligned: torch.Tensor,
    base: torch.Tensor,
    alpha: float,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Safety pre-amplification of one tensor: (1 + alpha) * aligned - alpha * base.

    Args:
        aligned: any shape, fp32/fp16/bf16.
        base: same shape and device as `aligned`, any float dtype.
        alpha: the amplification coefficient (0.9 in the paper).
        out: optional output, same shape as `aligned` (may be `aligned` itself); default a new tensor of
            `aligned`'s dtype.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        `out`, computed in fp32 and cast once to its dtype.
    """
    check_matrix("aligned", aligned, ndims=(1, 2))
    check_matrix("base", base, ndims=(1, 2))
    check_same("aligned", aligned, "base", base)
    if out is None:
        out = torch.empty_like(aligned, memory_format=torch.contiguous_format)
    else:
        check_matrix("out", out, ndims=(1, 2))
        check_same("aligned", aligned, "out", out)
    return select(OP, aligned.device, backend)(aligned, base, float(alpha), out)
