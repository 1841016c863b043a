"""Calibration: data loading and the layer-streamed engine that gathers LoRA statistics and gradient scores."""

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
    ModuleStats,
    collect_lora_statistics,
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
    "ModuleStats",
    "PairSample",
    "SUPPORTED_MODEL_TYPES",
    "Sample",
    "collect_lora_statistics",
    "format_prompt",
    "load_calibration",
    "lora_gradient_scores",
    "low_rank_masks",
    "low_rank_topk_masks",
    "project_and_mask",
    "project_factors",
    "projection_rank",
]
