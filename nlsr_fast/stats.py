"""Interval statistics for evaluations: Wilson intervals, stratified (paired) bootstrap, exact McNemar, and the
percent-with-interval helpers the tables print (`share`, `fmt_ci`).

Plain Python + the standard library (no numpy needed), so the tables can be recomputed anywhere.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["wilson", "bootstrap_mean", "paired_bootstrap", "mcnemar_exact", "share", "fmt_ci"]


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default), as fractions in [0, 1]; (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo, 1.0 if k == n else hi)  # exact at the ends (no round-off)


def _quantiles(xs: list[float], level: float) -> tuple[float, float]:
    xs = sorted(xs)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def q(f: float) -> float:  # linear interpolation between order statistics
        pos = f * (len(xs) - 1)
        i = int(math.floor(pos))
        j = min(i + 1, len(xs) - 1)
        return xs[i] + (xs[j] - xs[i]) * (pos - i)

    return (q(lo_q), q(hi_q))


def bootstrap_mean(strata: Mapping[Any, Sequence[float]], *, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Mean of all values and a percentile bootstrap interval, resampling items within each stratum (seed).

    Returns (mean, lo, hi). The pooled mean weighs every item equally (strata keep their sizes in each resample).
    """
    groups = [list(map(float, v)) for v in strata.values() if len(v)]
    n = sum(len(g) for g in groups)
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    mean = sum(sum(g) for g in groups) / n
    rng = random.Random(seed)
    reps = []
    for _ in range(n_boot):
        s = 0.0
        for g in groups:
            m = len(g)
            s += sum(g[rng.randrange(m)] for _ in range(m))
        reps.append(s / n)
    lo, hi = _quantiles(reps, level)
    return (mean, lo, hi)


def paired_bootstrap(strata: Mapping[Any, Sequence[tuple[float, float]]], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference x - y over items (pairs resampled within each stratum) and its bootstrap interval."""
    return bootstrap_mean({k: [x - y for x, y in v] for k, v in strata.items()}, n_boot=n_boot, seed=seed,
                          level=level)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (x only) and c (y only)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def share(k: int, n: int) -> tuple[float | None, tuple[float, float] | None]:
    """Percentage and Wilson 95% interval (percent) of k in n; (None, None) for n = 0."""
    if not n:
        return None, None
    lo, hi = wilson(k, n)
    return 100.0 * k / n, (100.0 * lo, 100.0 * hi)


def fmt_ci(v: float | None, ci: Sequence[float] | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if ci is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
