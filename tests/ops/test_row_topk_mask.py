"""row_topk_mask: every backend against the reference, exact per-row counts, tie-aware agreement, error paths."""

from __future__ import annotations

import re

import pytest
import torch

from nlsr_fast.ops import keep_count, row_topk_mask, row_topk_mask_reference
from nlsr_fast.ops.packed_mask import PackedMask
from nlsr_fast.ops.row_topk_mask import row_scores_reference

from ._helpers import (
    DEVICE,
    DTYPES,
    SHAPES_2D,
    assert_bitwise_equal,
    assert_masks_match,
    backends,
    dtype_id,
    numel,
    shape_params,
    skip_if_interpreted_and_large,
)

OP = "row_topk_mask"
BACKENDS = backends(OP)
VARIANTS = ["plain", "col_scale", "grad", "col_scale+grad"]


def _inputs(shape, dtype, variant):
    w = torch.randn(shape, dtype=dtype)
    col_scale = torch.rand(shape[1]) if "col_scale" in variant else None  # wanda: sqrt(mean x^2), fp32
    grad = torch.rand(shape, dtype=dtype) if "grad" in variant else None  # snip: summed |dL/dW|
    return w, col_scale, grad


def _check(backend, w, keep, *, col_scale=None, grad=None, k=None):
    kk = keep_count(w.shape[1], keep) if k is None else k
    mask = row_topk_mask(w, keep, col_scale=col_scale, grad=grad, k=k, backend=backend)
    ref = row_topk_mask_reference(w, kk, col_scale, grad)
    scores = row_scores_reference(w, col_scale, grad)
    assert_masks_match(mask, ref, scores, kk, per_row=True, name=f"{OP}[{backend}]")
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D))
@pytest.mark.parametrize("variant", VARIANTS)
def test_row_topk_mask_matches_reference(backend, dtype, shape, variant):
    skip_if_interpreted_and_large(backend, numel(shape))
    w, col_scale, grad = _inputs(shape, dtype, variant)
    _check(backend, w, 0.2, col_scale=col_scale, grad=grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "keep, expected",
    [(0.2, 32), (0.0, 0), (1.0, 160), (0.5, 80), (0.3, 48), (0.7, 112), (0.01, 2)],
    ids=lambda v: str(v),
)
def test_row_topk_mask_spec_counts_n160(backend, keep, expected):
    """docs/algorithm.md §3: n = 160, s = 0.8 keeps exactly 32 (a naive ceil((1-s)*n) keeps 33)."""
    w = torch.randn(6, 160)
    assert keep_count(160, keep) == expected
    mask = _check(backend, w, keep)
    assert mask.row_counts().tolist() == [expected] * 6
    assert mask.count() == 6 * expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 2, 36, 37])
def test_row_topk_mask_explicit_k(backend, k):
    w = torch.randn(5, 37)
    mask = _check(backend, w, 0.5, k=k)
    assert mask.row_counts().tolist() == [k] * 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_row_topk_mask_heavy_ties(backend, dtype):
    """Few distinct values: the threshold falls inside a run of equal scores; any tie-break is accepted."""
    w = torch.randint(-3, 4, (9, 301)).to(dtype)
    mask = _check(backend, w, 0.2)
    assert mask.row_counts().tolist() == [keep_count(301, 0.2)] * 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_topk_mask_all_equal_rows(backend):
    w = torch.ones(4, 33)
    mask = _check(backend, w, 0.5)
    assert mask.row_counts().tolist() == [keep_count(33, 0.5)] * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_row_topk_mask_mixed_input_dtypes(backend, dtype):
    """bf16/fp16 weight with an fp32 grad and a col_scale in the weight's dtype."""
    w = torch.randn(7, 129, dtype=dtype)
    _check(backend, w, 0.2, col_scale=torch.rand(129, dtype=dtype), grad=torch.rand(7, 129))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_topk_mask_non_contiguous_inputs(backend):
    w = torch.randn(301, 37).t()  # (37, 301), column-major view
    grad = torch.rand(301, 37).t()
    col_scale = torch.rand(602)[::2]
    assert not w.is_contiguous() and not col_scale.is_contiguous()
    _check(backend, w, 0.2, col_scale=col_scale, grad=grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_topk_mask_does_not_mutate_inputs(backend):
    w, col_scale, grad = _inputs((11, 67), torch.bfloat16, "col_scale+grad")
    copies = [w.clone(), col_scale.clone(), grad.clone()]
    row_topk_mask(w, 0.2, col_scale=col_scale, grad=grad, backend=backend)
    for name, before, after in zip(("weight", "col_scale", "grad"), copies, (w, col_scale, grad), strict=True):
        assert_bitwise_equal(name, after, before)


# --- error paths: ValueError / TypeError with the values in the message ------------------------------------------


def test_row_topk_mask_rejects_non_tensor():
    with pytest.raises(TypeError, match="list"):
        row_topk_mask([[1.0, 2.0]], 0.5)


def test_row_topk_mask_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        row_topk_mask(torch.randn(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match=re.escape("(7,)")):
        row_topk_mask(torch.randn(7), 0.5)


def test_row_topk_mask_rejects_int_dtype():
    with pytest.raises(ValueError, match="int64"):
        row_topk_mask(torch.ones(3, 4, dtype=torch.int64), 0.5)


@pytest.mark.parametrize("keep", [-0.1, 1.5, float("nan"), "0.2"], ids=str)
def test_row_topk_mask_rejects_keep_outside_unit_interval(keep):
    with pytest.raises(ValueError, match=re.escape(repr(keep))):
        row_topk_mask(torch.randn(3, 4), keep)


@pytest.mark.parametrize("k", [-1, 5])
def test_row_topk_mask_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"\[0, 4\].*{k}"):
        row_topk_mask(torch.randn(3, 4), 0.5, k=k)


def test_row_topk_mask_rejects_bad_col_scale():
    with pytest.raises(ValueError, match=re.escape("(5,)")):
        row_topk_mask(torch.randn(3, 4), 0.5, col_scale=torch.rand(5))
    with pytest.raises(ValueError, match="meta"):
        row_topk_mask(torch.randn(3, 4), 0.5, col_scale=torch.rand(4, device="meta"))
    with pytest.raises(ValueError, match="int32"):
        row_topk_mask(torch.randn(3, 4), 0.5, col_scale=torch.ones(4, dtype=torch.int32))


def test_row_topk_mask_rejects_bad_grad():
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (4, 3)")):
        row_topk_mask(torch.randn(3, 4), 0.5, grad=torch.rand(4, 3))
    with pytest.raises(ValueError, match="meta"):
        row_topk_mask(torch.randn(3, 4), 0.5, grad=torch.rand(3, 4, device="meta"))


def test_row_topk_mask_result_is_packed_mask_on_input_device():
    mask = row_topk_mask(torch.randn(3, 9), 0.5)
    assert isinstance(mask, PackedMask) and mask.shape == (3, 9) and mask.device == DEVICE
