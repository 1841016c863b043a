"""Calibration: data loading and the layer-streamed engine that gathers statistics and gradient scores of a LoRA
reference (its factors) or of a dense reference (its target linears)."""

from nlsr_fast.calib.data import (
    ALPACA_TEMPLATE,
    CalibrationSet,
    PairSample,
    Sample,
    format_prompt,
    load_calibration,
)
from nlsr_fast.calib.engine import (
    SUPPORTED_MODEL_TYPES,
    DenseStats,
    ModuleStats,
    collect_dense_statistics,
    collect_lora_statistics,
    dense_gradient_scores,
    lora_gradient_scores,
)
from nlsr_fast.calib.lowrank import (
    low_rank_masks,
    low_rank_topk_masks,
    project_and_mask,
    project_factors,
    projection_rank,
)

__all__ = [
    "ALPACA_TEMPLATE",
    "CalibrationSet",
    "DenseStats",
    "ModuleStats",
    "PairSample",
    "SUPPORTED_MODEL_TYPES",
    "Sample",
    "collect_dense_statistics",
    "collect_lora_statistics",
    "dense_gradient_scores",
    "format_prompt",
    "load_calibration",
    "lora_gradient_scores",
    "low_rank_masks",
    "low_rank_topk_masks",
    "project_and_mask",
    "project_factors",
    "projection_rank",
]
