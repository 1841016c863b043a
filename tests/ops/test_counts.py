"""keep_count: the count rule of SPEC §3, k = n - floor(s*n) with s*n snapped to an integer within 1e-9."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest

from nlsr_fast.ops import keep_count, keep_count_for_sparsity

# Decimal ratios as a user types them; Fraction(str(s)) is the exact decimal the user meant.
RATIOS = [
    "0",
    "0.01",
    "0.1",
    "0.125",
    "0.2",
    "0.25",
    "0.3",
    "1/3",
    "0.4",
    "0.5",
    "0.6",
    "0.7",
    "0.75",
    "0.8",
    "0.9",
    "0.95",
    "0.99",
    "1",
]


def _exact(n: int, s: Fraction) -> int:
    return n - math.floor(s * n)


def _frac(text: str) -> Fraction:
    return Fraction(text)


def test_spec_case_160_at_08():
    """SPEC §3: n = 160 at s = 0.8 keeps 32. (1 - 0.8) * 160 is 31.999999999999993 in floating point, so a naive
    floor((1 - s) * n) keeps 31."""
    assert math.floor((1 - 0.8) * 160) == 31
    assert keep_count_for_sparsity(160, 0.8) == 32
    assert keep_count(160, 0.2) == 32


def test_snap_to_integer():
    """0.7 * 90 is 62.99999999999999: without the 1e-9 snap, n - floor(s*n) keeps 28 instead of 27."""
    assert 0.7 * 90 < 63
    assert keep_count_for_sparsity(90, 0.7) == 27
    assert keep_count(90, 1 - 0.7) == 27
    assert keep_count(170, 0.3) == 51


@pytest.mark.parametrize("s_text", RATIOS)
def test_keep_count_for_sparsity_matches_exact_decimal_arithmetic(s_text):
    s = _frac(s_text)
    for n in range(0, 1200):
        got = keep_count_for_sparsity(n, float(s))
        assert got == _exact(n, s), (n, s_text, got)


@pytest.mark.parametrize("s_text", RATIOS)
def test_keep_count_matches_exact_decimal_arithmetic(s_text):
    s = _frac(s_text)
    keep = 1 - s
    for n in range(0, 1200):
        got = keep_count(n, float(keep))
        assert got == _exact(n, s), (n, s_text, got)


@pytest.mark.parametrize("n", [0, 1, 7, 160, 4096, 11008, 8192 * 28672, 128 * 8192])
def test_extremes_and_real_sizes(n):
    assert keep_count(n, 0.0) == 0
    assert keep_count(n, 1.0) == n
    assert keep_count_for_sparsity(n, 1.0) == 0
    assert keep_count_for_sparsity(n, 0.0) == n
    assert keep_count_for_sparsity(n, 0.8) == n - (4 * n) // 5


def test_result_is_int_within_range():
    for n in (1, 3, 301):
        for keep in (0.0, 0.33, 0.5, 0.999, 1.0):
            k = keep_count(n, keep)
            assert isinstance(k, int) and 0 <= k <= n


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("inf"), float("nan")], ids=str)
def test_rejects_ratio_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        keep_count(10, bad)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        keep_count_for_sparsity(10, bad)
