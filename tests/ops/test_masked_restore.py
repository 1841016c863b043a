"""masked_restore: bit-exact against the reference (compared as int16/int32), special values, out=, error paths."""

from __future__ import annotations

import re

import pytest
import torch

from nlsr_fast.ops import masked_restore, masked_restore_reference
from nlsr_fast.ops.packed_mask import PackedMask

from ._helpers import (
    DTYPES,
    SHAPES_1D,
    SHAPES_2D,
    assert_bitwise_equal,
    backends,
    dtype_id,
    numel,
    random_mask,
    shape_params,
    skip_if_interpreted_and_large,
)

OP = "masked_restore"
BACKENDS = backends(OP)


def _reference(target, source, mask):
    return masked_restore_reference(
        target, source, mask, torch.zeros_like(target, memory_format=torch.contiguous_format)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
@pytest.mark.parametrize("density", [0.2, 0.5], ids=lambda d: f"density{d}")
def test_masked_restore_bit_exact(backend, dtype, shape, density):
    skip_if_interpreted_and_large(backend, numel(shape))
    target = torch.randn(shape, dtype=dtype)
    source = torch.randn(shape, dtype=dtype)
    mask = random_mask(shape, density)
    out = masked_restore(target, source, mask, backend=backend)
    assert_bitwise_equal(f"{OP}[{backend}]", out, _reference(target, source, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("source_dtype", DTYPES, ids=dtype_id)
def test_masked_restore_casts_source_like_torch(backend, dtype, source_dtype):
    """The source is cast to the target's dtype with torch's rounding (round to nearest even)."""
    shape = (37, 301)
    target = torch.randn(shape, dtype=dtype)
    source = (torch.randn(shape) * 3).to(source_dtype)
    mask = random_mask(shape)
    out = masked_restore(target, source, mask, backend=backend)
    assert out.dtype == dtype
    assert_bitwise_equal(f"{OP}[{backend}]", out, _reference(target, source, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_restore_special_values_keep_their_bits(backend, dtype):
    """NaN payloads, -0.0, inf and subnormals are copied, not computed: a blend m*s + (1-m)*t would fail here."""
    n = 64
    target = torch.randn(n).to(dtype)
    source = torch.randn(n).to(dtype)
    tiny = torch.finfo(dtype).tiny / 4
    specials = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), tiny, -tiny, 0.0, 1.0])
    # every special value lands once on a kept (even) and once on a restored (odd) position
    target[0:8] = specials.to(dtype)
    target[17:25] = specials.to(dtype)
    source[8:16] = specials.to(dtype)
    source[25:33] = specials.to(dtype)
    int_view = torch.int16 if dtype != torch.float32 else torch.int32
    payload_nan = 0x7FC1 if dtype != torch.float32 else 0x7FC00123  # a NaN with a non-default payload
    target.view(int_view)[62] = payload_nan
    source.view(int_view)[61] = payload_nan
    mask = PackedMask.from_bool(torch.arange(n) % 2 == 1)
    out = masked_restore(target, source, mask, backend=backend)
    assert_bitwise_equal(f"{OP}[{backend}]", out, _reference(target, source, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_restore_all_false_returns_target_and_all_true_returns_source(backend, dtype):
    """docs/algorithm.md §9.3."""
    target = torch.randn(37, 301, dtype=dtype)
    source = torch.randn(37, 301, dtype=dtype)
    assert_bitwise_equal(
        "all-false", masked_restore(target, source, PackedMask.zeros((37, 301)), backend=backend), target
    )
    assert_bitwise_equal(
        "all-true", masked_restore(target, source, PackedMask.ones((37, 301)), backend=backend), source
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_restore_does_not_mutate_inputs_without_out(backend):
    target = torch.randn(13, 77, dtype=torch.bfloat16)
    source = torch.randn(13, 77, dtype=torch.bfloat16)
    t0, s0 = target.clone(), source.clone()
    out = masked_restore(target, source, random_mask((13, 77)), backend=backend)
    assert out.data_ptr() != target.data_ptr()
    assert_bitwise_equal("target", target, t0)
    assert_bitwise_equal("source", source, s0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_restore_into_out_and_in_place(backend, dtype):
    target = torch.randn(37, 301, dtype=dtype)
    source = torch.randn(37, 301, dtype=dtype)
    mask = random_mask((37, 301))
    want = _reference(target, source, mask)
    out = torch.full_like(target, float("nan"))
    got = masked_restore(target, source, mask, out=out, backend=backend)
    assert got is out
    assert_bitwise_equal(f"{OP}[{backend}] out=", out, want)
    got = masked_restore(target, source, mask, out=target, backend=backend)
    assert got is target
    assert_bitwise_equal(f"{OP}[{backend}] in place", target, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_restore_non_contiguous_inputs(backend):
    target = torch.randn(301, 37, dtype=torch.bfloat16).t()
    source = torch.randn(301, 37, dtype=torch.bfloat16).t()
    mask = random_mask((37, 301))
    out = masked_restore(target, source, mask, backend=backend)
    assert_bitwise_equal(f"{OP}[{backend}]", out, _reference(target, source, mask))


# --- error paths -------------------------------------------------------------------------------------------------


def test_masked_restore_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (4, 3)")):
        masked_restore(torch.randn(3, 4), torch.randn(4, 3), PackedMask.ones((3, 4)))


def test_masked_restore_rejects_bad_mask():
    with pytest.raises(ValueError, match=re.escape("(3, 5)") + ".*" + re.escape("(3, 4)")):
        masked_restore(torch.randn(3, 4), torch.randn(3, 4), PackedMask.ones((3, 5)))
    with pytest.raises(TypeError, match="PackedMask.*Tensor"):
        masked_restore(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="PackedMask.*NoneType"):
        masked_restore(torch.randn(3, 4), torch.randn(3, 4), None)


def test_masked_restore_rejects_bad_out():
    t, s, m = torch.randn(3, 4), torch.randn(3, 4), PackedMask.ones((3, 4))
    with pytest.raises(ValueError, match="float32 and torch.bfloat16"):
        masked_restore(t, s, m, out=torch.empty(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (4, 3)")):
        masked_restore(t, s, m, out=torch.empty(4, 3))


def test_masked_restore_rejects_devices_dtypes_ndims():
    with pytest.raises(ValueError, match="cpu and meta"):
        masked_restore(torch.randn(3, 4), torch.randn(3, 4, device="meta"), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match="int16"):
        masked_restore(torch.ones(3, 4, dtype=torch.int16), torch.randn(3, 4), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match=re.escape("(1, 3, 4)")):
        masked_restore(torch.randn(1, 3, 4), torch.randn(1, 3, 4), PackedMask.ones((3, 4)))
