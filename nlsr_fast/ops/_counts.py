"""The count rule of docs/algorithm.md §3, in one place: a group of n entries keeps k = n - floor(s*n), s = 1 - keep.

Every count in nlsr_fast goes through `snap`: s*n (or q*N) is snapped to the nearest integer when within 1e-9 of
it, because in floating point (1 - 0.8)*160 is 31.999999999999993 (without the snap, keep_count(160, 0.8) would keep
129 entries instead of 128) and 0.55*100 is 55.00000000000001 (a naive ceil restores 56 of 100 modules at fraction
0.55 instead of 55).

* `keep_count(n, keep)` / `keep_count_for_sparsity(n, s)`: the entries a top-`keep` share keeps (masks);
  `fewer=1` keeps one fewer (preset `official` of low_rank: the released code keeps |W~| strictly above the
  floor(s*n)-th smallest value). `fewer` is the preset field `low_rank_count_offset` passed through unchanged.
* `floor_snapped(x)`, `ceil_snapped(x)`: floor / ceil of a product that should be an integer when the user's
  ratio makes it one (`select`'s fraction rule restores ceil(q*N) modules).
"""

from __future__ import annotations

import math

__all__ = ["SNAP", "snap", "floor_snapped", "ceil_snapped", "keep_count", "keep_count_for_sparsity"]

#: how close to an integer a count product must be to count as that integer.
SNAP = 1e-9


def snap(x: float) -> float:
    """`x`, or the nearest integer (as a float) when `x` is within 1e-9 of it."""
    nearest = round(x)
    return float(nearest) if abs(x - nearest) <= SNAP else x


def floor_snapped(x: float) -> int:
    """floor(x) with x snapped to an integer within 1e-9 ((1 - 0.8)*160 -> 32, not 31)."""
    return int(math.floor(snap(x)))


def ceil_snapped(x: float) -> int:
    """ceil(x) with x snapped to an integer within 1e-9 (0.55*100 -> 55, not 56)."""
    return int(math.ceil(snap(x)))


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_fewer(fewer: int) -> None:
    if isinstance(fewer, bool) or not isinstance(fewer, int) or fewer < 0:
        raise ValueError(f"fewer must be an int >= 0 (how many fewer entries to keep), got {fewer!r}")


def keep_count_for_sparsity(n: int, sparsity: float, *, fewer: int = 0) -> int:
    """How many of `n` entries a mask of sparsity ratio s keeps: max(n - floor(s*n) - fewer, 0), s*n snapped."""
    _check_ratio("sparsity", sparsity)
    _check_fewer(fewer)
    return max(n - floor_snapped(sparsity * n) - fewer, 0)


def keep_count(n: int, keep: float, *, fewer: int = 0) -> int:
    """How many of `n` entries a top-`keep` share keeps: `keep_count_for_sparsity(n, 1 - keep, fewer=fewer)`."""
    _check_ratio("keep", keep)
    return keep_count_for_sparsity(n, 1.0 - keep, fewer=fewer)
