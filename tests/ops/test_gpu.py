"""CUDA-only checks (marker `gpu`, deselected by default): int64 addressing past 2**31 elements and the bf16 paths
at a real model size. Run with `pytest -m gpu tests/ops` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.ops import (
    OPS,
    available,
    extrapolate,
    extrapolate_reference,
    keep_count,
    lora_masked_cosine,
    lora_masked_cosine_reference,
    masked_delta_cosine,
    masked_delta_cosine_reference,
    masked_restore,
    masked_restore_reference,
    matrix_topk_mask,
    matrix_topk_mask_reference,
    row_topk_mask,
    row_topk_mask_reference,
)
from nlsr_fast.ops.masked_delta_cosine import cosine_from_sums
from nlsr_fast.ops.packed_mask import PackedMask
from nlsr_fast.ops.row_topk_mask import row_scores_reference

from ._helpers import (
    COSINE_ATOL_FLOOR,
    DTYPES,
    ELEMENTWISE_TOL,
    SHAPES_2D,
    assert_bitwise_equal,
    assert_close_to_reference,
    assert_cosine_fa_rule,
    assert_masks_match,
    delta_cosine_fp64,
    dtype_id,
    lora_cosine_fp64,
    random_mask,
    shape_params,
    torch_delta_cosine_same_dtype,
    torch_lora_cosine_same_dtype,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
# rows * cols > 2**31: any int32 offset arithmetic wraps on the last rows.
BIG = (65537, 32769)
TAIL = 3  # rows checked at the end of the big tensors


def _gpu_backends(op: str) -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b.value for b in available(op, CUDA) if b.value != "reference"]


def _tail_rand(shape, dtype, scale=1.0):
    """Zeros except the last TAIL rows, which are random: only correct 64-bit addressing finds them."""
    x = torch.zeros(shape, dtype=dtype, device=CUDA)
    x[-TAIL:] = (torch.randn(TAIL, shape[1], device=CUDA) * scale).to(dtype)
    return x


@pytest.mark.parametrize("backend", _gpu_backends("masked_restore"))
def test_gpu_masked_restore_int64_offsets(backend):
    target = _tail_rand(BIG, torch.bfloat16)
    source = _tail_rand(BIG, torch.bfloat16)
    tail_mask = torch.rand(TAIL, BIG[1], device=CUDA) < 0.5
    full = torch.zeros(BIG, dtype=torch.bool, device=CUDA)
    full[-TAIL:] = tail_mask
    mask = PackedMask.from_bool(full)
    del full
    out = masked_restore(target, source, mask, backend=backend)
    want = torch.where(tail_mask, source[-TAIL:], target[-TAIL:])
    assert_bitwise_equal(f"masked_restore[{backend}] tail", out[-TAIL:], want)
    assert not bool(out[:8].ne(0).any())


@pytest.mark.parametrize("backend", _gpu_backends("extrapolate"))
def test_gpu_extrapolate_int64_offsets(backend):
    aligned = _tail_rand(BIG, torch.bfloat16)
    base = _tail_rand(BIG, torch.bfloat16)
    out = extrapolate(aligned, base, 0.9, backend=backend)
    want = extrapolate_reference(aligned[-TAIL:], base[-TAIL:], 0.9, torch.empty_like(aligned[-TAIL:]))
    assert_close_to_reference(f"extrapolate[{backend}] tail", out[-TAIL:], want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", _gpu_backends("masked_delta_cosine"))
def test_gpu_masked_delta_cosine_int64_offsets(backend):
    t = _tail_rand(BIG, torch.bfloat16)
    e = _tail_rand(BIG, torch.bfloat16)
    mask = PackedMask.ones(BIG, device=CUDA)
    value = masked_delta_cosine(t, e, mask, backend=backend)
    want = cosine_from_sums(
        *masked_delta_cosine_reference(t[-TAIL:], e[-TAIL:], PackedMask.ones((TAIL, BIG[1]), CUDA), None), None
    )
    assert abs(value - want) <= 1e-4, (value, want)


@pytest.mark.parametrize("backend", _gpu_backends("row_topk_mask"))
def test_gpu_row_topk_mask_int64_offsets(backend):
    w = _tail_rand(BIG, torch.bfloat16)
    k = keep_count(BIG[1], 0.2)
    mask = row_topk_mask(w, 0.2, backend=backend)
    tail = PackedMask(mask.bits[-TAIL:].contiguous(), (TAIL, BIG[1]))
    ref = row_topk_mask_reference(w[-TAIL:], k, None, None)
    assert_masks_match(tail, ref, row_scores_reference(w[-TAIL:], None, None), k, per_row=True)


@pytest.mark.parametrize("backend", _gpu_backends("matrix_topk_mask"))
def test_gpu_matrix_topk_mask_int64_offsets(backend):
    """Only the tail is non-zero and k is its size: the mask must be exactly the tail rows."""
    x = _tail_rand(BIG, torch.bfloat16, scale=1.0)
    x[-TAIL:] = x[-TAIL:].abs() + 1
    k = TAIL * BIG[1]
    mask = matrix_topk_mask(x, 0.5, k=k, backend=backend)
    assert mask.count() == k
    assert bool(mask.to_bool()[-TAIL:].all())


OP_BACKENDS = [pytest.param(op, b, id=f"{op}-{b}") for op in OPS for b in _gpu_backends(op)]
TOL = {d: (a, r) for d, a, r in ELEMENTWISE_TOL}


def _compare_on_cuda(op, backend, shape, dtype):
    """The CPU test matrix, on CUDA tensors: each op's own criterion against its reference."""
    x = torch.randn(shape, dtype=dtype, device=CUDA)
    y = torch.randn(shape, dtype=dtype, device=CUDA)
    name = f"{op}[{backend}] {tuple(shape)} {dtype}"
    if op == "row_topk_mask":
        k = keep_count(shape[1], 0.2)
        got = row_topk_mask(x, 0.2, backend=backend)
        assert_masks_match(got, row_topk_mask_reference(x, k, None, None), x.float().abs(), k, True, name=name)
    elif op == "matrix_topk_mask":
        k = keep_count(x.numel(), 0.2)
        got = matrix_topk_mask(x, 0.2, backend=backend)
        assert_masks_match(got, matrix_topk_mask_reference(x, k), x.float().abs(), k, False, name=name)
    elif op == "masked_delta_cosine":
        base = x * 0.02
        t = (base.float() + torch.randn(shape, device=CUDA) * 1e-3).to(dtype)
        e = (base.float() + 0.6 * (t.float() - base.float()) + torch.randn(shape, device=CUDA) * 8e-4).to(dtype)
        mask = random_mask(shape).to(CUDA)
        got = masked_delta_cosine(t, e, mask, base=base, backend=backend)
        m = mask.to_bool()
        same = torch_delta_cosine_same_dtype(t, e, m, base)
        assert_cosine_fa_rule(name, got, delta_cosine_fp64(t, e, m, base), same, floor=COSINE_ATOL_FLOOR[dtype])
    elif op == "lora_masked_cosine":
        r = min(16, shape[0])
        d_out, d_in = shape
        a_t = (torch.randn(r, d_in, device=CUDA) * 0.1).to(dtype)
        b_t = (torch.randn(d_out, r, device=CUDA) * 0.2).to(dtype)
        a_e = (0.7 * a_t.float() + 0.07 * torch.randn(r, d_in, device=CUDA)).to(dtype)
        b_e = (0.7 * b_t.float() + 0.14 * torch.randn(d_out, r, device=CUDA)).to(dtype)
        f = (a_t, b_t, a_e, b_e)
        ma, mb = random_mask((r, d_in)).to(CUDA), random_mask((d_out, r)).to(CUDA)
        got = lora_masked_cosine(*f, ma, mb, backend=backend)
        bm_a, bm_b = ma.to_bool(), mb.to_bool()
        same = torch_lora_cosine_same_dtype(*f, bm_a, bm_b)
        assert_cosine_fa_rule(name, got, lora_cosine_fp64(*f, bm_a, bm_b), same, floor=COSINE_ATOL_FLOOR[dtype])
    elif op == "masked_restore":
        mask = random_mask(shape).to(CUDA)
        got = masked_restore(x, y, mask, backend=backend)
        assert_bitwise_equal(name, got, masked_restore_reference(x, y, mask, torch.zeros_like(x)))
    else:
        got = extrapolate(x, y, 0.9, backend=backend)
        atol, rtol = TOL[dtype]
        want = extrapolate_reference(x, y, 0.9, torch.zeros_like(x))
        assert_close_to_reference(name, got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("op, backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D))
def test_gpu_matches_reference(op, backend, dtype, shape):
    _compare_on_cuda(op, backend, shape, dtype)


@pytest.mark.parametrize("op, backend", OP_BACKENDS)
def test_gpu_bf16_real_size_matches_reference(op, backend):
    _compare_on_cuda(op, backend, (8192, 8192), torch.bfloat16)


@pytest.mark.parametrize("backend", _gpu_backends("lora_masked_cosine"))
def test_gpu_lora_masked_cosine_real_size(backend):
    r, d_out, d_in = 128, 8192, 28672
    a_t = torch.randn(r, d_in, device=CUDA, dtype=torch.bfloat16) * 0.01
    b_t = torch.randn(d_out, r, device=CUDA, dtype=torch.bfloat16) * 0.01
    a_e = (a_t.float() + torch.randn(r, d_in, device=CUDA) * 0.01).bfloat16()
    b_e = (b_t.float() + torch.randn(d_out, r, device=CUDA) * 0.01).bfloat16()
    ma = PackedMask.from_bool(torch.rand(r, d_in, device=CUDA) < 0.2)
    mb = PackedMask.from_bool(torch.rand(d_out, r, device=CUDA) < 0.2)
    got = lora_masked_cosine(a_t, b_t, a_e, b_e, ma, mb, backend=backend)
    want = cosine_from_sums(*lora_masked_cosine_reference(a_t, b_t, a_e, b_e, ma, mb), None)
    assert abs(got - want) <= 1e-4, (got, want)
