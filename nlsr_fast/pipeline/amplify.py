"""Stage 1: safety pre-amplification of the aligned LoRA adapter into the reference `e` (docs/algorithm.md §2)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from nlsr_fast.config import Preset, resolve_preset
from nlsr_fast.pipeline._types import Factors

__all__ = ["amplification", "amplify", "scaled"]

log = logging.getLogger(__name__)


def amplify(
    adapter_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, preset: Preset | str = "paper"
) -> Factors:
    """Reference factors e from the aligned factors a: each of A and B times the preset's factor.

    Preset `paper` multiplies by sqrt(1+alpha), so dW_e = (1+alpha) dW_a; preset `official` by 2*alpha, so
    dW_e = 4 alpha^2 dW_a (alpha = 0.5 is the identity).

    Args:
        adapter_factors: {module: (A (r, d_in), B (d_out, r))}, any float dtype.
        alpha: amplification coefficient >= 0.
        preset: a Preset or a key of PRESETS.
    Returns:
        New {module: (A_e, B_e)} in fp32 (fp32 math; the inputs are not modified), same order as the input.
        A factor of exactly 1.0 returns fp32 copies of the inputs.
    """
    c = amplification(alpha, preset)
    log.info("amplify: preset %s, alpha %g, each factor x %.6g (delta x %.6g)", resolve_preset(preset).name, alpha,
             c, c * c)
    return {name: (scaled(a, c), scaled(b, c)) for name, (a, b) in adapter_factors.items()}


def amplification(alpha: float, preset: Preset | str = "paper") -> float:
    """The factor each aligned LoRA factor is multiplied by (alpha >= 0 checked here)."""
    if not alpha >= 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    return resolve_preset(preset).amplification_factor(float(alpha))


def scaled(x: torch.Tensor, c: float) -> torch.Tensor:
    """x times c in fp32: a new tensor (x is not modified). The streaming LoRA space applies the same fp32 products
    to the masked entries only (and the similarity kernel as it reads the factors), so both give these bits."""
    return x.float().clone() if c == 1.0 else x.float() * c
