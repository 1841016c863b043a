"""Stage 3b: which modules to restore (docs/algorithm.md §5): adaptive Bernoulli draw, threshold or fraction."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from nlsr_fast.config import SELECTIONS, Preset, resolve_preset
from nlsr_fast.ops._counts import ceil_snapped

__all__ = ["Selection", "adaptive_probabilities", "rank_positions", "select"]

log = logging.getLogger(__name__)


class Selection(NamedTuple):
    """Result of `select`, in model order.

    probabilities: p_m of `adaptive` (float32 values as Python floats), None for threshold / fraction.
    draws: z_m in {0, 1} of `adaptive`, None for threshold / fraction.
    restored: whether each module is restored.
    """

    probabilities: list[float] | None
    draws: list[int] | None
    restored: list[bool]


def rank_positions(similarities: Sequence[float]) -> list[int]:
    """pi(m): position of each module when sorted by S descending, stably (equal S keep model order)."""
    order = sorted(range(len(similarities)), key=lambda i: -float(similarities[i]))
    pos = [0] * len(similarities)
    for p, i in enumerate(order):
        pos[i] = p
    return pos


def adaptive_probabilities(
    similarities: Sequence[float], prune_rate: float, epsilon: float, preset: Preset
) -> torch.Tensor:
    """p_m = clip(rho - eps + 2 eps w_m, 0, 1), w_m = 1 - u_m (paper) or u_m (official); float32 CPU, model order."""
    n = len(similarities)
    pos = rank_positions(similarities)
    probs = []
    for p in pos:
        u = 1.0 if n == 1 else (n - 1 - p) / (n - 1)
        w = 1.0 - u if preset.adaptive_direction == "dissimilar" else u
        probs.append(min(1.0, max(0.0, prune_rate - epsilon + 2.0 * epsilon * w)))
    return torch.tensor(probs, dtype=torch.float32)


def select(
    similarities: Sequence[float | None],
    *,
    selection: str = "adaptive",
    prune_rate: float = 0.5,
    epsilon: float = 0.2,
    seed: int = 42,
    preset: Preset | str = "paper",
    tau: float | None = None,
    fraction: float | None = None,
    count: int | None = None,
) -> Selection:
    """Choose the modules to restore.

    Args:
        similarities: S_m of the N modules in model order (layer 0..L-1; q, k, v, o, gate, up, down).
        selection: "adaptive" draws z_m ~ Bernoulli(p_m) with exactly
            torch.bernoulli(p, generator=torch.Generator("cpu").manual_seed(seed)), p float32 CPU in model order;
            "threshold" restores S_m < tau; "fraction" restores the ceil(fraction * N) least similar modules
            (ties: the later module in model order counts as less similar, as in the stable sort).
        prune_rate: rho, the mean restore probability of adaptive.
        epsilon: spread of the adaptive probabilities.
        seed: seed of the adaptive draw.
        preset: Preset or name; its adaptive_direction decides which end is restored more often.
        tau: threshold of "threshold".
        fraction: share of "fraction".
        count: "count" restores the `count` least similar modules (ties as for "fraction"); "all" restores every
            module.
    Returns:
        Selection(probabilities, draws, restored), lists in model order.
    """
    preset = resolve_preset(preset)
    if selection == "all":  # every module, ranked or not (a method without a similarity has None)
        return Selection(None, None, [True] * len(similarities))
    if any(s is None for s in similarities):
        raise ValueError(f"selection {selection!r} ranks modules by their similarity; this method gives none")
    sims = [float(s) for s in similarities if s is not None]
    if any(math.isnan(s) for s in sims):
        raise ValueError(f"similarities contain NaN at module indices {[i for i, s in enumerate(sims) if s != s]}")
    n = len(sims)
    if selection == "adaptive":
        if not 0.0 <= prune_rate <= 1.0 or not epsilon >= 0.0:
            raise ValueError(f"adaptive needs prune_rate in [0, 1] and epsilon >= 0, got {prune_rate}, {epsilon}")
        if n == 0:
            return Selection([], [], [])
        p = adaptive_probabilities(sims, prune_rate, epsilon, preset)
        z = torch.bernoulli(p, generator=torch.Generator("cpu").manual_seed(int(seed)))
        draws = [int(v) for v in z.tolist()]
        log.info("select: adaptive, %d of %d modules drawn (expected %.1f)", sum(draws), n, n * prune_rate)
        return Selection([float(v) for v in p.tolist()], draws, [d == 1 for d in draws])
    if selection == "threshold":
        if tau is None:
            raise ValueError("selection='threshold' needs tau")
        restored = [s < tau for s in sims]
        log.info("select: threshold S < %g restores %d of %d modules", tau, sum(restored), n)
        return Selection(None, None, restored)
    if selection in ("fraction", "count"):
        if selection == "fraction":
            if fraction is None or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"selection='fraction' needs fraction in [0, 1], got {fraction!r}")
            count = ceil_snapped(fraction * n)  # the count rule's snap (ops._counts): 0.2 * 160 restores 32, not 33
        elif count is None or count < 0:
            raise ValueError(f"selection='count' needs count >= 0, got {count!r}")
        pos = rank_positions(sims)
        restored = [p >= n - count for p in pos]
        log.info("select: %s restores the %d least similar of %d modules", selection, min(count, n), n)
        return Selection(None, None, restored)
    raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
