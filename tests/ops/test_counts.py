"""The one count rule of docs/algorithm.md §3 (ops/_counts.py): k = n - floor(s*n) with s*n snapped to an integer
within 1e-9, the
`fewer` offset of preset official, and the same snap under select's fraction rule ceil(q*N)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest

from nlsr_fast.ops import keep_count, keep_count_for_sparsity
from nlsr_fast.ops._counts import ceil_snapped, floor_snapped, snap

# Decimal ratios as a user types them; Fraction(str(s)) is the exact decimal the user meant.
RATIOS = [
    "0",
    "0.07",
    "0.55",
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
    """docs/algorithm.md §3: n = 160 at s = 0.8 keeps 32. (1 - 0.8) * 160 is 31.999999999999993 in floating point, so
    a naive
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


def test_snap_helper():
    # products that should be integers but are not in floating point, below and above
    assert (1 - 0.8) * 160 == 31.999999999999993 and snap((1 - 0.8) * 160) == 32.0
    assert 0.55 * 100 == 55.00000000000001 and snap(0.55 * 100) == 55.0
    assert snap(2.5) == 2.5 and snap(31.9999) == 31.9999  # only within 1e-9
    assert floor_snapped((1 - 0.8) * 160) == 32 and math.floor((1 - 0.8) * 160) == 31
    assert ceil_snapped(0.55 * 100) == 55 and math.ceil(0.55 * 100) == 56
    assert ceil_snapped(0.07 * 100) == 7 and math.ceil(0.07 * 100) == 8
    assert floor_snapped(7.5) == 7 and ceil_snapped(7.5) == 8
    assert isinstance(floor_snapped(3.0), int) and isinstance(ceil_snapped(3.0), int)


def test_fewer_is_the_official_offset():
    """preset official keeps one fewer: 160 entries at s = 0.8 keep 31, never 33 or 32."""
    from nlsr_fast.config import PRESETS

    assert keep_count_for_sparsity(160, 0.8) == 32
    assert keep_count_for_sparsity(160, 0.8, fewer=1) == 31
    assert keep_count(160, 0.2, fewer=1) == 31
    for name, want in (("paper", 32), ("official", 31)):
        assert keep_count_for_sparsity(160, 0.8, fewer=PRESETS[name].low_rank_count_offset) == want
    assert keep_count_for_sparsity(1, 0.8, fewer=1) == 0  # never negative
    assert keep_count_for_sparsity(0, 0.5, fewer=1) == 0


@pytest.mark.parametrize("bad", [-1, 0.5, True, "1"], ids=repr)
def test_fewer_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="fewer"):
        keep_count_for_sparsity(10, 0.5, fewer=bad)


@pytest.mark.parametrize("q_text", RATIOS)
def test_fraction_ceil_rule_matches_exact_decimal_arithmetic(q_text):
    """select's fraction rule restores ceil(q*N) modules, q*N snapped like every other count."""
    from nlsr_fast.pipeline.select import select

    q = _frac(q_text)
    for n in range(0, 600):
        assert ceil_snapped(float(q) * n) == math.ceil(q * n), (n, q_text)
    for n in (1, 7, 160, 224, 560):
        sims = [float(i % 13) for i in range(n)]
        restored = select(sims, selection="fraction", fraction=float(q)).restored
        assert sum(restored) == math.ceil(q * n), (n, q_text)
