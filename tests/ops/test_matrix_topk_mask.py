"""matrix_topk_mask: every backend against the reference, exact whole-matrix counts, tie-aware agreement, errors."""

from __future__ import annotations

import re

import pytest
import torch

from nlsr_fast.ops import keep_count, matrix_topk_mask, matrix_topk_mask_reference
from nlsr_fast.ops.packed_mask import PackedMask

from ._helpers import (
    DEVICE,
    DTYPES,
    SHAPES_1D,
    SHAPES_2D,
    assert_bitwise_equal,
    assert_masks_match,
    backends,
    dtype_id,
    numel,
    shape_params,
    skip_if_interpreted_and_large,
)

OP = "matrix_topk_mask"
BACKENDS = backends(OP)


def _check(backend, x, keep, *, k=None):
    kk = keep_count(x.numel(), keep) if k is None else k
    mask = matrix_topk_mask(x, keep, k=k, backend=backend)
    ref = matrix_topk_mask_reference(x, kk)
    assert_masks_match(mask, ref, x.float().abs(), kk, per_row=False, name=f"{OP}[{backend}]")
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", shape_params(SHAPES_2D + SHAPES_1D))
@pytest.mark.parametrize("keep", [0.2, 0.5], ids=lambda v: f"keep{v}")
def test_matrix_topk_mask_matches_reference(backend, dtype, shape, keep):
    skip_if_interpreted_and_large(backend, numel(shape))
    _check(backend, torch.randn(shape, dtype=dtype), keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", shape_params([(10, 16), (160,), (1, 160), (160, 1)]))
def test_matrix_topk_mask_spec_count_n160(backend, shape):
    """docs/algorithm.md §3: a group of n = 160 at s = 0.8 keeps exactly 32."""
    mask = _check(backend, torch.randn(shape), 0.2)
    assert mask.count() == 32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0.0, 1.0], ids=lambda v: f"keep{v}")
def test_matrix_topk_mask_keep_extremes(backend, keep):
    x = torch.randn(37, 301)
    mask = _check(backend, x, keep)
    assert mask.count() == (x.numel() if keep == 1.0 else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_topk_mask_official_count(backend):
    """The `official` preset keeps n - floor(s*n) - 1, passed as an explicit k."""
    x = torch.randn(37, 301)
    n = x.numel()
    k = keep_count(n, 0.2) - 1
    assert _check(backend, x, 0.2, k=k).count() == k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 7, 11 * 37 - 1, 11 * 37])
def test_matrix_topk_mask_explicit_k(backend, k):
    assert _check(backend, torch.randn(11, 37), 0.5, k=k).count() == k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matrix_topk_mask_heavy_ties(backend, dtype):
    x = torch.randint(-4, 5, (23, 97)).to(dtype)
    _check(backend, x, 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_topk_mask_sign_is_ignored(backend):
    """The score is |x|: the most negative entries are kept too."""
    x = torch.tensor([[-5.0, 1.0, 0.5], [0.1, 4.0, -3.0]])
    mask = matrix_topk_mask(x, 0.5, backend=backend)
    assert mask.to_bool().tolist() == [[True, False, False], [False, True, True]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_topk_mask_non_contiguous_input(backend):
    x = torch.randn(301, 37).t()
    assert not x.is_contiguous()
    _check(backend, x, 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_topk_mask_does_not_mutate_input(backend):
    x = torch.randn(13, 71, dtype=torch.bfloat16)
    before = x.clone()
    matrix_topk_mask(x, 0.2, backend=backend)
    assert_bitwise_equal("x", x, before)


# --- error paths -------------------------------------------------------------------------------------------------


def test_matrix_topk_mask_rejects_non_tensor():
    with pytest.raises(TypeError, match="ndarray"):
        import numpy as np

        matrix_topk_mask(np.zeros((2, 2), dtype=np.float32), 0.5)


def test_matrix_topk_mask_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        matrix_topk_mask(torch.randn(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match=re.escape("()")):
        matrix_topk_mask(torch.tensor(1.0), 0.5)


def test_matrix_topk_mask_rejects_int_dtype():
    with pytest.raises(ValueError, match="uint8"):
        matrix_topk_mask(torch.ones(3, 4, dtype=torch.uint8), 0.5)


@pytest.mark.parametrize("keep", [-0.5, 1.0001, None], ids=str)
def test_matrix_topk_mask_rejects_keep_outside_unit_interval(keep):
    with pytest.raises(ValueError, match=re.escape(repr(keep))):
        matrix_topk_mask(torch.randn(3, 4), keep)


@pytest.mark.parametrize("k", [-3, 13])
def test_matrix_topk_mask_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"\[0, 12\].*{k}"):
        matrix_topk_mask(torch.randn(3, 4), 0.5, k=k)


def test_matrix_topk_mask_result_on_input_device():
    mask = matrix_topk_mask(torch.randn(5), 0.4)
    assert isinstance(mask, PackedMask) and mask.shape == (5,) and mask.device == DEVICE
