"""The calibration engine's public names, gathered from the three modules that implement it.

* `calib.runtime` – the layer-streamed model runtime (decoder layers one at a time, batching, the LoRA and dense
  wrappers of a linear) and the reader protocol every pass takes;
* `calib.statistics` – the forward statistics pass: `collect_lora_statistics`, `collect_dense_statistics`;
* `calib.gradients` – the gradient pass: `lora_gradient_scores`, `dense_gradient_scores`.

Callers use this module (`from nlsr_fast.calib import engine; engine.collect_lora_statistics(...)`) or the package.
"""

from __future__ import annotations

from nlsr_fast.calib.gradients import OnLayer, dense_gradient_scores, lora_gradient_scores
from nlsr_fast.calib.runtime import DEFAULT_TOKENS_PER_BATCH, SUPPORTED_MODEL_TYPES, Factors
from nlsr_fast.calib.statistics import (
    DenseStats,
    ModuleStats,
    Transform,
    collect_dense_statistics,
    collect_lora_statistics,
)

__all__ = [
    "DEFAULT_TOKENS_PER_BATCH",
    "DenseStats",
    "Factors",
    "ModuleStats",
    "OnLayer",
    "SUPPORTED_MODEL_TYPES",
    "Transform",
    "collect_dense_statistics",
    "collect_lora_statistics",
    "dense_gradient_scores",
    "lora_gradient_scores",
]
