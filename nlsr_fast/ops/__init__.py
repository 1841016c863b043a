"""The numerical ops of nlsr_fast, each with a torch reference, a C++ CPU backend and a Triton GPU backend."""

from nlsr_fast.ops._counts import keep_count, keep_count_for_sparsity
from nlsr_fast.ops._registry import Backend, available, select
from nlsr_fast.ops.extrapolate import extrapolate, extrapolate_reference
from nlsr_fast.ops.lora_masked_cosine import lora_masked_cosine, lora_masked_cosine_reference
from nlsr_fast.ops.masked_delta_cosine import masked_delta_cosine, masked_delta_cosine_reference
from nlsr_fast.ops.masked_restore import masked_restore, masked_restore_reference
from nlsr_fast.ops.matrix_topk_mask import matrix_topk_mask, matrix_topk_mask_reference
from nlsr_fast.ops.packed_mask import PackedMask, load_masks, save_masks
from nlsr_fast.ops.row_topk_mask import row_topk_mask, row_topk_mask_reference

OPS = (
    "row_topk_mask",
    "matrix_topk_mask",
    "masked_delta_cosine",
    "lora_masked_cosine",
    "masked_restore",
    "extrapolate",
)

__all__ = [
    "OPS",
    "Backend",
    "PackedMask",
    "available",
    "extrapolate",
    "extrapolate_reference",
    "keep_count",
    "keep_count_for_sparsity",
    "load_masks",
    "lora_masked_cosine",
    "lora_masked_cosine_reference",
    "masked_delta_cosine",
    "masked_delta_cosine_reference",
    "masked_restore",
    "masked_restore_reference",
    "matrix_topk_mask",
    "matrix_topk_mask_reference",
    "row_topk_mask",
    "row_topk_mask_reference",
    "save_masks",
    "select",
]
