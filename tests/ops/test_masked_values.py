"""masked_gather / masked_scatter: every backend bit-exact against the torch reference (masked_select /
masked_scatter_), the changed count against an independent count, the round trip equals masked_restore."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.ops import (
    PackedMask,
    masked_gather,
    masked_gather_reference,
    masked_restore_reference,
    masked_scatter,
    masked_scatter_reference,
)

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

GATHER_BACKENDS = backends("masked_gather")
SCATTER_BACKENDS = backends("masked_scatter")
DENSITIES = [0.0, 0.2, 0.5, 1.0]


def _mask(shape, density):
    if density == 0.0:
        return PackedMask.from_bool(torch.zeros(shape, dtype=torch.bool))
    if density == 1.0:
        return PackedMask.from_bool(torch.ones(shape, dtype=torch.bool))
    return random_mask(shape, density)


@pytest.mark.parametrize("backend", GATHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density{d}")
def test_masked_gather_bit_exact(backend, dtype, shape, density):
    skip_if_interpreted_and_large(backend, numel(shape))
    source = torch.randn(shape, dtype=dtype)
    mask = _mask(shape, density)
    got = masked_gather(source, mask, backend=backend)
    want = masked_gather_reference(source, mask)
    assert got.numel() == mask.count() == int(mask.to_bool().sum())
    assert_bitwise_equal(f"masked_gather[{backend}]", got, want)


@pytest.mark.parametrize("backend", SCATTER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density{d}")
def test_masked_scatter_bit_exact_and_counts_changes(backend, dtype, shape, density):
    skip_if_interpreted_and_large(backend, numel(shape))
    target = torch.randn(shape, dtype=dtype)
    source = torch.randn(shape, dtype=dtype)
    mask = _mask(shape, density)
    keep = mask.to_bool()
    source[keep & (torch.rand(shape) < 0.3)] = 0.0
    target[source == 0.0] = 0.0  # some masked entries equal their new value: not counted as changed
    values = masked_gather_reference(source, mask)
    got, changed = masked_scatter(target, mask, values, backend=backend)
    ref = torch.empty_like(target)
    ref_changed = masked_scatter_reference(target, mask, values, ref)
    assert_bitwise_equal(f"masked_scatter[{backend}]", got, ref)
    # the round trip is restoration itself (masked_restore's reference, an independent implementation)
    assert_bitwise_equal("round trip", got, masked_restore_reference(target, source, mask, torch.empty_like(target)))
    independent = int(((target.view(torch.int16 if dtype.itemsize == 2 else torch.int32)
                        != source.view(torch.int16 if dtype.itemsize == 2 else torch.int32)) & keep).sum())
    assert changed == ref_changed == independent


@pytest.mark.parametrize("backend", SCATTER_BACKENDS)
def test_masked_scatter_leaves_target_untouched_and_handles_views(backend):
    base = torch.randn(64, 40)
    target = base.t()  # a transposed (non-contiguous) view, as the LoRA space passes stored-transposed factors
    before = base.clone()
    mask = random_mask(tuple(target.shape), 0.3)
    values = torch.randn(mask.count())
    got, _ = masked_scatter(target, mask, values, backend=backend)
    assert torch.equal(base, before)
    assert torch.equal(torch.masked_select(got, mask.to_bool()), values)
    assert torch.equal(got[~mask.to_bool()], target[~mask.to_bool()])


@pytest.mark.parametrize("backend", SCATTER_BACKENDS)
def test_masked_scatter_refuses_a_wrong_count(backend):
    target = torch.randn(4, 9)
    mask = random_mask((4, 9), 0.5)
    with pytest.raises(ValueError, match="values for a mask of"):
        masked_scatter(target, mask, torch.zeros(mask.count() + 1), backend=backend)
    with pytest.raises(ValueError, match="values must be 1-D"):
        masked_scatter(target, mask, torch.zeros(mask.count(), dtype=torch.float16), backend=backend)


def test_masked_values_do_not_depend_on_the_thread_count():
    if "cpu" not in GATHER_BACKENDS:
        pytest.skip("the C++ extension is not built")
    source = torch.randn(3000, 700)
    target = torch.randn(3000, 700)
    mask = random_mask((3000, 700), 0.2)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            values = masked_gather(source, mask, backend="cpu")
            runs.append((values, *masked_scatter(target, mask, values, backend="cpu")))
    finally:
        torch.set_num_threads(before)
    for values, out, changed in runs[1:]:
        assert torch.equal(values, runs[0][0]) and torch.equal(out, runs[0][1]) and changed == runs[0][2]


@pytest.mark.parametrize("backend", SCATTER_BACKENDS)
def test_masked_scatter_into_out(backend):
    target = torch.randn(9, 40).to(torch.bfloat16)
    mask = random_mask((9, 40), 0.4)
    values = torch.randn(mask.count()).to(torch.bfloat16)
    out = torch.full_like(target, float("nan"))
    got, changed = masked_scatter(target, mask, values, out=out, backend=backend)
    want, want_changed = masked_scatter(target, mask, values, backend="reference")
    assert got is out and changed == want_changed
    assert_bitwise_equal(f"masked_scatter[{backend}] out=", out, want)
    with pytest.raises(ValueError, match="out must be"):
        masked_scatter(target, mask, values, out=torch.empty(9, 40), backend=backend)
