"""extrapolate: elementwise tolerance table against the reference, alpha cases, out=, error paths."""

from __future__ import annotations

import re

import pytest
import torch

from nlsr_fast.ops import extrapolate, extrapolate_reference

from ._helpers import (
    ELEMENTWISE_TOL,
    SHAPES_1D,
    SHAPES_2D,
    assert_bitwise_equal,
    assert_close_to_reference,
    backends,
    dtype_id,
    numel,
    shape_params,
    skip_if_interpreted_and_large,
    tol_params,
)

OP = "extrapolate"
BACKENDS = backends(OP)
TOL = {d: (a, r) for d, a, r in ELEMENTWISE_TOL}


def _reference(aligned, base, alpha, out_dtype=None):
    out = torch.zeros(aligned.shape, dtype=out_dtype or aligned.dtype)
    return extrapolate_reference(aligned, base, alpha, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", tol_params())
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
def test_extrapolate_matches_reference(backend, dtype, atol, rtol, shape):
    skip_if_interpreted_and_large(backend, numel(shape))
    aligned = torch.randn(shape, dtype=dtype)
    base = torch.randn(shape, dtype=dtype)
    out = extrapolate(aligned, base, 0.9, backend=backend)
    assert_close_to_reference(f"{OP}[{backend}]", out, _reference(aligned, base, 0.9), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", tol_params())
@pytest.mark.parametrize("alpha", [0.5, -0.3, 3.0, 1e-3], ids=lambda a: f"alpha{a}")
def test_extrapolate_alphas(backend, dtype, atol, rtol, alpha):
    aligned = torch.randn(37, 301, dtype=dtype)
    base = torch.randn(37, 301, dtype=dtype)
    out = extrapolate(aligned, base, alpha, backend=backend)
    assert_close_to_reference(f"{OP}[{backend}]", out, _reference(aligned, base, alpha), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [d for d, _, _ in ELEMENTWISE_TOL], ids=dtype_id)
def test_extrapolate_alpha_zero_is_identity(backend, dtype):
    aligned = torch.randn(37, 301, dtype=dtype)
    base = torch.randn(37, 301, dtype=dtype)
    assert_bitwise_equal(f"{OP}[{backend}]", extrapolate(aligned, base, 0.0, backend=backend), aligned)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", tol_params())
@pytest.mark.parametrize("base_dtype", [d for d, _, _ in ELEMENTWISE_TOL], ids=lambda d: "base-" + dtype_id(d))
def test_extrapolate_mixed_base_dtype(backend, dtype, atol, rtol, base_dtype):
    aligned = torch.randn(29, 131, dtype=dtype)
    base = torch.randn(29, 131, dtype=base_dtype)
    out = extrapolate(aligned, base, 0.9, backend=backend)
    assert out.dtype == dtype
    assert_close_to_reference(f"{OP}[{backend}]", out, _reference(aligned, base, 0.9), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", tol_params())
def test_extrapolate_into_fp32_out(backend, dtype, atol, rtol):
    """A wider `out` gets the fp32 result before any rounding to the input dtype."""
    aligned = torch.randn(29, 131, dtype=dtype)
    base = torch.randn(29, 131, dtype=dtype)
    out = torch.full((29, 131), float("nan"))
    got = extrapolate(aligned, base, 0.9, out=out, backend=backend)
    assert got is out
    a, r = TOL[torch.float32]
    assert_close_to_reference(f"{OP}[{backend}]", out, _reference(aligned, base, 0.9, torch.float32), atol=a, rtol=r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", tol_params())
def test_extrapolate_in_place(backend, dtype, atol, rtol):
    aligned = torch.randn(37, 301, dtype=dtype)
    base = torch.randn(37, 301, dtype=dtype)
    want = _reference(aligned, base, 0.9)
    got = extrapolate(aligned, base, 0.9, out=aligned, backend=backend)
    assert got is aligned
    assert_close_to_reference(f"{OP}[{backend}] in place", aligned, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extrapolate_does_not_mutate_inputs_without_out(backend):
    aligned = torch.randn(13, 77, dtype=torch.bfloat16)
    base = torch.randn(13, 77, dtype=torch.bfloat16)
    a0, b0 = aligned.clone(), base.clone()
    extrapolate(aligned, base, 0.9, backend=backend)
    assert_bitwise_equal("aligned", aligned, a0)
    assert_bitwise_equal("base", base, b0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extrapolate_non_contiguous_inputs(backend):
    aligned = torch.randn(301, 37).t()
    base = torch.randn(301, 37).t()
    out = extrapolate(aligned, base, 0.9, backend=backend)
    atol, rtol = TOL[torch.float32]
    assert_close_to_reference(f"{OP}[{backend}]", out, _reference(aligned, base, 0.9), atol=atol, rtol=rtol)


# --- error paths -------------------------------------------------------------------------------------------------


def test_extrapolate_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (4, 3)")):
        extrapolate(torch.randn(3, 4), torch.randn(4, 3), 0.9)
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (12,)")):
        extrapolate(torch.randn(3, 4), torch.randn(3, 4), 0.9, out=torch.empty(12))


def test_extrapolate_rejects_devices_dtypes_ndims():
    with pytest.raises(ValueError, match="cpu and meta"):
        extrapolate(torch.randn(3, 4), torch.randn(3, 4, device="meta"), 0.9)
    with pytest.raises(ValueError, match="int8"):
        extrapolate(torch.ones(3, 4, dtype=torch.int8), torch.randn(3, 4), 0.9)
    with pytest.raises(ValueError, match="out.*int32"):
        extrapolate(torch.randn(3, 4), torch.randn(3, 4), 0.9, out=torch.empty(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        extrapolate(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0.9)
    with pytest.raises(TypeError, match="tuple"):
        extrapolate((1.0, 2.0), torch.randn(2), 0.9)
