"""The count rule of SPEC §3: a group of n entries keeps k = n - floor(s*n), s = 1 - keep."""

from __future__ import annotations

import math

_SNAP = 1e-9


def keep_count(n: int, keep: float) -> int:
    """How many of `n` entries a top-`keep` share keeps.

    `s*n` is snapped to the nearest integer when within 1e-9 of it: in floating point 0.8*160 is
    128.00000000000003, and a naive ceil((1-s)*n) would keep 33 of 160 instead of 32.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    pruned = (1.0 - keep) * n
    nearest = round(pruned)
    if abs(pruned - nearest) <= _SNAP:
        pruned = nearest
    return n - int(math.floor(pruned))


def keep_count_for_sparsity(n: int, sparsity: float) -> int:
    """`keep_count` spelled with the sparsity ratio s of the paper (keep = 1 - s)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    pruned = sparsity * n
    nearest = round(pruned)
    if abs(pruned - nearest) <= _SNAP:
        pruned = nearest
    return n - int(math.floor(pruned))
