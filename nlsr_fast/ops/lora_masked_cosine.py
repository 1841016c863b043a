"""lora_masked_cosine: cosine of (M_B*B_t)(M_A*A_t) and (M_B*B_e)(M_A*A_e) through r x r Grams (docs/algorithm.md
§4)."""

from __future__ import annotations

import torch

from nlsr_fast.ops._registry import Backend, register, select
from nlsr_fast.ops._validate import check_mask, check_matrix, check_same
from nlsr_fast.ops.masked_delta_cosine import cosine_from_sums
from nlsr_fast.ops.packed_mask import PackedMask

OP = "lora_masked_cosine"


@register(OP, Backend.REFERENCE)
def lora_masked_cosine_reference(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: PackedMask,
    mask_b: PackedMask,
    e_scale: float = 1.0,
) -> tuple[float, float, float]:
    """The spec in fp64: <B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)); returns (<t,e>, |t|^2, |e|^2)."""
    ma = mask_a.to_bool()
    mb = mask_b.to_bool()
    a_e, b_e = scaled_reference(a_e, b_e, e_scale)
    at = a_t.double() * ma
    ae = a_e.double() * ma
    bt = b_t.double() * mb
    be = b_e.double() * mb

    def inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
        return float(((b1.T @ b2) * (a1 @ a2.T)).sum())

    return inner(bt, at, be, ae), inner(bt, at, bt, at), inner(be, ae, be, ae)


def scaled_reference(a_e: torch.Tensor, b_e: torch.Tensor, e_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference factors times e_scale in fp32 (what the C++ core computes as it packs them)."""
    if e_scale == 1.0:
        return a_e, b_e
    return a_e.float() * e_scale, b_e.float() * e_scale


# --- cpu backend (C++ core) ---


@register(OP, Backend.CPU)
def _lora_masked_cosine_cpu(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: PackedMask,
    mask_b: PackedMask,
    e_scale: float = 1.0,
) -> tuple[float, float, float]:
    from nlsr_fast.ops._cpu import dtype_code
    from nlsr_fast.ops._registry import require_cpp

    C = require_cpp()
    a_t, b_t, a_e, b_e = (x.contiguous() for x in (a_t, b_t, a_e, b_e))
    r, d_in = a_t.shape
    return C.lora_masked_cosine(
        a_t.data_ptr(),
        dtype_code(a_t),
        a_e.data_ptr(),
        dtype_code(a_e),
        b_t.data_ptr(),
        dtype_code(b_t),
        b_e.data_ptr(),
        dtype_code(b_e),
        mask_a.bits.data_ptr(),
        mask_b.bits.data_ptr(),
        r,
        d_in,
        b_t.shape[0],
        e_scale,
    )


# --- triton backend ---


@register(OP, Backend.TRITON)
def _lora_masked_cosine_triton(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: PackedMask,
    mask_b: PackedMask,
    e_scale: float = 1.0,
) -> tuple[float, float, float]:
    from nlsr_fast.kernels.lora_masked_cosine import lora_masked_cosine_triton  # lazy: triton is optional

    a_e, b_e = scaled_reference(a_e, b_e, e_scale)
    a_t, b_t, a_e, b_e = (x.float().contiguous() for x in (a_t, b_t, a_e, b_e))  # the kernel reads fp32
    return lora_masked_cosine_triton(a_t, b_t, a_e, b_e, mask_a.bits, mask_b.bits)


def lora_masked_cosine(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: PackedMask,
    mask_b: PackedMask,
    *,
    e_scale: float = 1.0,
    name: str | None = None,
    backend: str | None = None,
) -> float:
    """Similarity of one LoRA module between the fine-tuned and the reference adapter, never forming d_out x d_in.

    Args:
        a_t, a_e: (r, d_in) LoRA A factors, fp32/fp16/bf16, same shape and device.
        b_t, b_e: (d_out, r) LoRA B factors, same shape and device.
        mask_a: PackedMask (r, d_in), applied to both A factors.
        mask_b: PackedMask (d_out, r), applied to both B factors.
        e_scale: the reference is e_scale * A_e, e_scale * B_e, each product rounded to fp32 (the amplification,
            applied as the factors are read, so a stored bf16 reference needs no fp32 copy).
        name: module name used in the zero-norm warning.
        backend: "reference" | "cpu" | "triton"; default picks the fastest available.
    Returns:
        cos((M_B*B_t)(M_A*A_t), (M_B*B_e)(M_A*A_e)) as a Python float (fp64 reference, fp32-or-wider kernels);
        0.0 with a RuntimeWarning when either product has zero norm.
    """
    for nm, x in (("a_t", a_t), ("b_t", b_t), ("a_e", a_e), ("b_e", b_e)):
        check_matrix(nm, x)
    check_same("a_t", a_t, "a_e", a_e)
    check_same("b_t", b_t, "b_e", b_e)
    if a_t.device != b_t.device:
        raise ValueError(f"A and B factors must be on the same device, got {a_t.device} and {b_t.device}")
    if a_t.shape[0] != b_t.shape[1]:
        raise ValueError(f"rank mismatch: a_t is {tuple(a_t.shape)} (r, d_in) but b_t is {tuple(b_t.shape)} (d_out, r)")
    check_mask("mask_a", mask_a, tuple(a_t.shape), a_t.device)
    check_mask("mask_b", mask_b, tuple(b_t.shape), b_t.device)
    dot, nt, ne = select(OP, a_t.device, backend)(a_t, b_t, a_e, b_e, mask_a, mask_b, e_scale)
    return cosine_from_sums(dot, nt, ne, name)
