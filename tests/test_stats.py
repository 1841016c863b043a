"""Interval statistics of the end-to-end experiment."""

from __future__ import annotations

import math

import pytest

from nlsr_fast.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, wilson


def test_wilson_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_bootstrap_mean_and_paired() -> None:
    m, lo, hi = bootstrap_mean({0: [1.0] * 50 + [0.0] * 50}, n_boot=500, seed=1)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    m, lo, hi = bootstrap_mean({0: [2.0] * 5, 1: [4.0] * 15}, n_boot=50)
    assert m == pytest.approx(3.5) and lo == pytest.approx(3.5) and hi == pytest.approx(3.5)  # strata keep sizes
    d, lo, hi = paired_bootstrap({0: [(1.0, 0.0)] * 30 + [(0.0, 0.0)] * 70}, n_boot=500)
    assert d == pytest.approx(0.3) and lo > 0
    assert math.isnan(bootstrap_mean({})[0])


def test_mcnemar_exact() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(10, 0) == mcnemar_exact(0, 10)
