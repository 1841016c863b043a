"""lora_masked_cosine: FA rule against a dense fp64 oracle, invariances (docs/algorithm.md §9.5), zero norms, error
paths."""

from __future__ import annotations

import math
import re

import pytest
import torch

from nlsr_fast.ops import lora_masked_cosine
from nlsr_fast.ops.packed_mask import PackedMask

from ._helpers import (
    COSINE_ATOL_FLOOR,
    DTYPES,
    assert_bitwise_equal,
    assert_cosine_fa_rule,
    backends,
    dtype_id,
    lora_cosine_fp64,
    random_mask,
    shape_id,
    skip_if_interpreted_and_large,
    torch_lora_cosine_same_dtype,
)

OP = "lora_masked_cosine"
BACKENDS = backends(OP)

# (r, d_out, d_in): rank 1, primes, d_out > d_in and d_in > d_out, and a real r = 128 slice with d_in = 11008.
LORA_SHAPES = [(1, 1, 1), (1, 5, 3), (3, 37, 301), (7, 301, 37), (16, 64, 1000), (128, 11, 11008)]


def _inputs(r, d_out, d_in, dtype):
    """A ~ 0.1, B ~ 0.2 (so the dense fp16 yardstick stays finite); the e factors continue the t factors."""
    a_t = torch.randn(r, d_in) * 0.1
    b_t = torch.randn(d_out, r) * 0.2
    a_e = 0.7 * a_t + 0.7 * torch.randn(r, d_in) * 0.1
    b_e = 0.7 * b_t + 0.7 * torch.randn(d_out, r) * 0.2
    return tuple(x.to(dtype) for x in (a_t, b_t, a_e, b_e))


def _check(backend, factors, mask_a, mask_b, floor):
    value = lora_masked_cosine(*factors, mask_a, mask_b, backend=backend)
    ma, mb = mask_a.to_bool(), mask_b.to_bool()
    oracle = lora_cosine_fp64(*factors, ma, mb)
    same = torch_lora_cosine_same_dtype(*factors, ma, mb)
    assert math.isfinite(same), "test setup: the same-dtype torch yardstick overflowed"
    assert_cosine_fa_rule(f"{OP}[{backend}]", value, oracle, same, floor=floor)
    return value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [pytest.param(s, id=f"r{s[0]}-{shape_id(s[1:])}") for s in LORA_SHAPES])
def test_lora_masked_cosine_fa_rule(backend, dtype, shape):
    r, d_out, d_in = shape
    skip_if_interpreted_and_large(backend, r * (d_in + d_out))
    factors = _inputs(r, d_out, d_in, dtype)
    _check(backend, factors, random_mask((r, d_in), 0.2), random_mask((d_out, r), 0.2), COSINE_ATOL_FLOOR[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.05, 1.0], ids=lambda d: f"density{d}")
def test_lora_masked_cosine_mask_density(backend, density):
    factors = _inputs(8, 37, 301, torch.float32)
    _check(
        backend,
        factors,
        random_mask((8, 301), density),
        random_mask((37, 8), density),
        COSINE_ATOL_FLOOR[torch.float32],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lora_masked_cosine_self_is_one(backend, dtype):
    a, b, _, _ = _inputs(8, 37, 301, dtype)
    value = lora_masked_cosine(a, b, a.clone(), b.clone(), random_mask((8, 301)), random_mask((37, 8)), backend=backend)
    assert abs(value - 1.0) <= 1e-5, value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_a, scale_b", [(1.9, 1.9), (0.3, 7.0), (2 * 0.9, 2 * 0.9)], ids=str)
def test_lora_masked_cosine_reference_scale_invariant(backend, scale_a, scale_b):
    """docs/algorithm.md §9.5: S_m is unchanged when the reference factors are scaled by any c > 0."""
    a_t, b_t, a_e, b_e = _inputs(8, 37, 301, torch.float32)
    ma, mb = random_mask((8, 301)), random_mask((37, 8))
    c1 = lora_masked_cosine(a_t, b_t, a_e, b_e, ma, mb, backend=backend)
    c2 = lora_masked_cosine(a_t, b_t, a_e * scale_a, b_e * scale_b, ma, mb, backend=backend)
    assert abs(c1 - c2) <= 1e-6, (c1, c2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("e_scale", [1.0, 1.2247448713915890, 0.9], ids=str)
def test_lora_masked_cosine_e_scale_is_the_scaled_reference_bit_for_bit(backend, dtype, e_scale):
    """e_scale multiplies the stored reference factors as they are read: the same sums, bit for bit, as the factors
    scaled in fp32 beforehand (what the LoRA space computed before it kept the reference as stored). Shapes cross
    the kernel's 256-wide blocks and 2048-wide chunks."""
    a_t, b_t, a_e, b_e = _inputs(16, 4100, 2051, dtype)
    ma, mb = random_mask((16, 2051)), random_mask((4100, 16))
    got = lora_masked_cosine(a_t, b_t, a_e, b_e, ma, mb, e_scale=e_scale, backend=backend)
    want = lora_masked_cosine(a_t.float(), b_t.float(), a_e.float() * e_scale, b_e.float() * e_scale, ma, mb,
                              backend=backend)
    assert got == want, (got, want)
    assert abs(got - lora_masked_cosine(a_t, b_t, a_e, b_e, ma, mb, backend=backend)) <= 1e-5  # c drops out


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_masked_cosine_zero_norm_gives_zero_with_warning(backend):
    a_t, b_t, a_e, b_e = _inputs(4, 9, 13, torch.float32)
    with pytest.warns(RuntimeWarning, match="layers.0.q_proj.*zero norm"):
        value = lora_masked_cosine(
            a_t,
            b_t,
            a_e,
            b_e,
            PackedMask.zeros((4, 13)),
            PackedMask.ones((9, 4)),
            name="layers.0.q_proj",
            backend=backend,
        )
    assert value == 0.0
    with pytest.warns(RuntimeWarning, match="reference"):
        value = lora_masked_cosine(
            a_t, b_t, a_e, torch.zeros_like(b_e), PackedMask.ones((4, 13)), PackedMask.ones((9, 4)), backend=backend
        )
    assert value == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_masked_cosine_non_contiguous_factors(backend):
    a_t, b_t, a_e, b_e = (x.t().contiguous().t() for x in _inputs(5, 37, 301, torch.float32))
    assert not a_t.is_contiguous()
    _check(backend, (a_t, b_t, a_e, b_e), random_mask((5, 301)), random_mask((37, 5)), COSINE_ATOL_FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_masked_cosine_does_not_mutate_inputs(backend):
    factors = _inputs(4, 9, 13, torch.bfloat16)
    copies = [x.clone() for x in factors]
    lora_masked_cosine(*factors, random_mask((4, 13)), random_mask((9, 4)), backend=backend)
    for name, after, before in zip(("a_t", "b_t", "a_e", "b_e"), factors, copies, strict=True):
        assert_bitwise_equal(name, after, before)


# --- error paths -------------------------------------------------------------------------------------------------


def _ok():
    return _inputs(4, 9, 13, torch.float32), PackedMask.ones((4, 13)), PackedMask.ones((9, 4))


def test_lora_masked_cosine_rejects_rank_mismatch():
    (a_t, b_t, a_e, b_e), ma, mb = _ok()
    with pytest.raises(ValueError, match=re.escape("(4, 13)") + r".*" + re.escape("(9, 3)")):
        lora_masked_cosine(a_t, b_t[:, :3], a_e, b_e[:, :3], ma, PackedMask.ones((9, 3)))


def test_lora_masked_cosine_rejects_t_e_shape_mismatch():
    (a_t, b_t, a_e, b_e), ma, mb = _ok()
    with pytest.raises(ValueError, match=re.escape("(4, 13) and (4, 12)")):
        lora_masked_cosine(a_t, b_t, a_e[:, :12], b_e, ma, mb)
    with pytest.raises(ValueError, match=re.escape("(9, 4) and (8, 4)")):
        lora_masked_cosine(a_t, b_t, a_e, b_e[:8], ma, mb)


def test_lora_masked_cosine_rejects_bad_masks():
    (a_t, b_t, a_e, b_e), ma, mb = _ok()
    with pytest.raises(ValueError, match="mask_a.*" + re.escape("(13, 4)")):
        lora_masked_cosine(a_t, b_t, a_e, b_e, PackedMask.ones((13, 4)), mb)
    with pytest.raises(ValueError, match="mask_b.*" + re.escape("(4, 9)")):
        lora_masked_cosine(a_t, b_t, a_e, b_e, ma, PackedMask.ones((4, 9)))
    with pytest.raises(TypeError, match="mask_b.*Tensor"):
        lora_masked_cosine(a_t, b_t, a_e, b_e, ma, torch.ones(9, 4, dtype=torch.bool))


def test_lora_masked_cosine_rejects_devices_dtypes_ndims():
    (a_t, b_t, a_e, b_e), ma, mb = _ok()
    with pytest.raises(ValueError, match="cpu and meta"):
        lora_masked_cosine(a_t, b_t.to("meta"), a_e, b_e.to("meta"), ma, mb)
    with pytest.raises(ValueError, match="cpu and meta"):
        lora_masked_cosine(a_t, b_t, a_e.to("meta"), b_e, ma, mb)
    with pytest.raises(ValueError, match="b_e.*int64"):
        lora_masked_cosine(a_t, b_t, a_e, b_e.long(), ma, mb)
    with pytest.raises(ValueError, match="a_t.*" + re.escape("(52,)")):
        lora_masked_cosine(a_t.reshape(-1), b_t, a_e, b_e, ma, mb)


def test_lora_masked_cosine_cpu_does_not_depend_on_the_thread_count():
    """The Grams are cut into fixed chunks of K whose fp64 partials are added in chunk order, so 1, 2 and 5 OpenMP
    threads give the same bits (torch and nlsr_fast._C share libgomp: torch.set_num_threads sets both). Each case has
    m * K well over the kernel's parallel threshold and K over several chunks."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(7)
    cases = []
    for r, d_out, d_in in ((64, 4099, 3001), (128, 2048, 5120), (16, 9000, 1500)):
        factors = tuple(torch.randn(shape, generator=gen) for shape in ((r, d_in), (d_out, r), (r, d_in), (d_out, r)))
        cases.append((factors, random_mask((r, d_in), 0.3, generator=gen), random_mask((d_out, r), 0.3, generator=gen)))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            runs.append([lora_masked_cosine(*f, ma, mb, backend="cpu") for f, ma, mb in cases])
    finally:
        torch.set_num_threads(before)
    assert runs[1] == runs[0] and runs[2] == runs[0], runs
