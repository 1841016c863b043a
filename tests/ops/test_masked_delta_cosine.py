"""masked_delta_cosine: FA rule against an fp64 oracle, zero norms, invariances, error paths."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from nlsr_fast.ops import masked_delta_cosine, masked_delta_cosine_reference
from nlsr_fast.ops.packed_mask import PackedMask

from ._helpers import (
    COSINE_ATOL_FLOOR,
    DTYPES,
    SHAPES_1D,
    SHAPES_2D,
    assert_bitwise_equal,
    assert_cosine_fa_rule,
    backends,
    delta_cosine_fp64,
    dtype_id,
    numel,
    random_mask,
    shape_params,
    skip_if_interpreted_and_large,
    torch_delta_cosine_same_dtype,
)

OP = "masked_delta_cosine"
BACKENDS = backends(OP)


def _inputs(shape, dtype, with_base, e_dtype=None):
    """Deltas ~1e-3 on weights ~2e-2 (fine-tuning scale), the two deltas correlated (cos about 0.6)."""
    dt = torch.randn(shape) * 1e-3
    de = 0.6 * dt + 0.8 * torch.randn(shape) * 1e-3
    if with_base:
        base = torch.randn(shape) * 2e-2
        t = (base + dt).to(dtype)
        e = (base + de).to(e_dtype or dtype)
        return t, e, base.to(dtype)
    return dt.to(dtype), de.to(e_dtype or dtype), None


def _check(backend, t, e, mask, base, floor):
    value = masked_delta_cosine(t, e, mask, base=base, backend=backend)
    m = mask.to_bool()
    oracle = delta_cosine_fp64(t, e, m, base)
    same = torch_delta_cosine_same_dtype(t, e, m, base)
    assert math.isfinite(same), "test setup: the same-dtype torch yardstick overflowed"
    assert_cosine_fa_rule(f"{OP}[{backend}]", value, oracle, same, floor=floor)
    return value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_masked_delta_cosine_fa_rule(backend, dtype, shape, with_base):
    skip_if_interpreted_and_large(backend, numel(shape))
    t, e, base = _inputs(shape, dtype, with_base)
    _check(backend, t, e, random_mask(shape, 0.5), base, COSINE_ATOL_FLOOR[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.01, 0.2, 1.0], ids=lambda d: f"density{d}")
def test_masked_delta_cosine_mask_density(backend, density):
    t, e, base = _inputs((37, 301), torch.bfloat16, True)
    _check(backend, t, e, random_mask((37, 301), density), base, COSINE_ATOL_FLOOR[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("e_dtype", DTYPES, ids=dtype_id)
def test_masked_delta_cosine_mixed_dtypes(backend, e_dtype):
    """bf16 fine-tuned weights against a reference in another dtype."""
    t, e, base = _inputs((29, 131), torch.bfloat16, True, e_dtype=e_dtype)
    _check(backend, t, e, random_mask((29, 131)), base, COSINE_ATOL_FLOOR[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_delta_cosine_self_is_one(backend, dtype):
    t, _, base = _inputs((37, 301), dtype, True)
    value = masked_delta_cosine(t, t.clone(), random_mask((37, 301)), base=base, backend=backend)
    assert abs(value - 1.0) <= 1e-6, value


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_delta_cosine_scale_invariant(backend):
    t, e, _ = _inputs((37, 301), torch.float32, False)
    mask = random_mask((37, 301))
    c1 = masked_delta_cosine(t, e, mask, backend=backend)
    c2 = masked_delta_cosine(t, e * 3.5, mask, backend=backend)
    assert abs(c1 - c2) <= 1e-6, (c1, c2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_delta_cosine_zero_norm_gives_zero_with_warning(backend):
    t, e, base = _inputs((5, 9), torch.float32, True)
    with pytest.warns(RuntimeWarning, match="q_proj.*zero norm"):
        value = masked_delta_cosine(t, e, PackedMask.zeros((5, 9)), base=base, name="q_proj", backend=backend)
    assert value == 0.0
    with pytest.warns(RuntimeWarning, match="layers.3.down.*fine-tuned"):
        value = masked_delta_cosine(base, e, PackedMask.ones((5, 9)), base=base, name="layers.3.down", backend=backend)
    assert value == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_delta_cosine_no_warning_when_defined(backend):
    t, e, base = _inputs((5, 9), torch.float32, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked_delta_cosine(t, e, random_mask((5, 9)), base=base, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_delta_cosine_non_contiguous_inputs(backend):
    t, e, base = _inputs((301, 37), torch.float32, True)
    t, e, base = t.t(), e.t(), base.t()
    _check(backend, t, e, random_mask((37, 301)), base, COSINE_ATOL_FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_delta_cosine_does_not_mutate_inputs(backend):
    t, e, base = _inputs((7, 33), torch.bfloat16, True)
    copies = (t.clone(), e.clone(), base.clone())
    masked_delta_cosine(t, e, random_mask((7, 33)), base=base, backend=backend)
    for name, after, before in zip(("t", "e", "base"), (t, e, base), copies, strict=True):
        assert_bitwise_equal(name, after, before)


def test_masked_delta_cosine_reference_returns_fp64_sums():
    t, e, base = _inputs((6, 10), torch.float32, True)
    mask = random_mask((6, 10))
    dot, nt, ne = masked_delta_cosine_reference(t, e, mask, base)
    m = mask.to_bool()
    a = (t.double() - base.double())[m]
    b = (e.double() - base.double())[m]
    assert (dot, nt, ne) == pytest.approx((float(a @ b), float(a @ a), float(b @ b)), rel=1e-12)


# --- error paths -------------------------------------------------------------------------------------------------


def test_masked_delta_cosine_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (4, 3)")):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(4, 3), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (3, 5)")):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(3, 4), PackedMask.ones((3, 4)), base=torch.randn(3, 5))


def test_masked_delta_cosine_rejects_bad_mask():
    with pytest.raises(ValueError, match=re.escape("(4, 3)") + r".*" + re.escape("(3, 4)")):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(3, 4), PackedMask.ones((4, 3)))
    with pytest.raises(TypeError, match="PackedMask.*Tensor"):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))


def test_masked_delta_cosine_rejects_devices_and_dtypes():
    with pytest.raises(ValueError, match="cpu and meta"):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(3, 4, device="meta"), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match="int32"):
        masked_delta_cosine(torch.ones(3, 4, dtype=torch.int32), torch.randn(3, 4), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match="float64"):
        masked_delta_cosine(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), PackedMask.ones((3, 4)))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        masked_delta_cosine(torch.randn(2, 3, 4), torch.randn(2, 3, 4), PackedMask.ones((3, 4)))
    with pytest.raises(TypeError, match="float"):
        masked_delta_cosine(1.0, torch.randn(3, 4), PackedMask.ones((3, 4)))
