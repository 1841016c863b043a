"""The test helpers catch what they are meant to catch (a lenient helper would pass every backend)."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.ops.packed_mask import PackedMask

from ._helpers import (
    assert_bitwise_equal,
    assert_close_to_reference,
    assert_cosine_fa_rule,
    assert_mask_well_formed,
    assert_masks_match,
)


def test_close_reports_count_max_err_and_indices():
    ref = torch.zeros(4, 5)
    out = ref.clone()
    out[1, 2] = 0.5
    out[3, 4] = float("nan")
    with pytest.raises(AssertionError, match=r"2 of 20 elements differ.*max abs err 0\.5.*\(1, 2\).*\(3, 4\)"):
        assert_close_to_reference("op", out, ref, atol=1e-3, rtol=0)
    assert_close_to_reference("op", ref + 1e-4, ref, atol=1e-3, rtol=0)


def test_close_checks_dtype_shape():
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_to_reference("op", torch.zeros(3), torch.zeros(3, dtype=torch.float64), atol=1, rtol=1)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference("op", torch.zeros(3), torch.zeros(1, 3), atol=1, rtol=1)


def test_bitwise_sees_negative_zero_and_nan_payloads():
    a = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="1 of 2 elements differ bitwise.*0x0000 vs 0x8000"):
        assert_bitwise_equal("op", a, b)
    n1 = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    n2 = torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)
    with pytest.raises(AssertionError):
        assert_bitwise_equal("op", n1, n2)


def test_masks_match_accepts_ties_only_at_the_threshold():
    scores = torch.tensor([[5.0, 3.0, 3.0, 1.0]])
    ref = PackedMask.from_bool(torch.tensor([[True, True, False, False]]))
    tie = PackedMask.from_bool(torch.tensor([[True, False, True, False]]))
    assert_masks_match(tie, ref, scores, 2, per_row=True)
    wrong = PackedMask.from_bool(torch.tensor([[False, True, True, False]]))
    with pytest.raises(AssertionError, match="away from the threshold"):
        assert_masks_match(wrong, ref, scores, 2, per_row=True)


def test_masks_match_checks_counts():
    scores = torch.tensor([[5.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    ref = PackedMask.from_bool(scores >= torch.tensor([[3.0], [3.0]]))
    three = PackedMask.from_bool(torch.tensor([[True, True, True, False], [False, False, True, True]]))
    with pytest.raises(AssertionError, match="row 0: 3"):
        assert_masks_match(three, ref, scores, 2, per_row=True)
    with pytest.raises(AssertionError, match="keeps 5 entries in all, expected exactly k=4"):
        assert_masks_match(three, ref, scores, 4, per_row=False)


def test_mask_well_formed_sees_padding_bits():
    bits = torch.tensor([[0x01, 0x80]], dtype=torch.uint8)  # cols = 9: bit 7 of byte 1 is padding
    m = PackedMask(bits, (1, 9))
    with pytest.raises(AssertionError, match="padding"):
        assert_mask_well_formed("m", m, (1, 9), torch.device("cpu"))


def test_fa_rule():
    assert_cosine_fa_rule("c", 0.5001, 0.5, 0.5002, floor=0.0)
    with pytest.raises(AssertionError, match="bound"):
        assert_cosine_fa_rule("c", 0.51, 0.5, 0.5002, floor=1e-5)
    with pytest.raises(AssertionError, match="float"):
        assert_cosine_fa_rule("c", torch.tensor(0.5), 0.5, 0.5, floor=1.0)
