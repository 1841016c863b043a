"""The numerical ops of nlsr_fast, each with a torch reference, a C++ CPU backend and a Triton GPU backend (except
the ops of `HOST_OPS`, made on the host whatever the device, for the reason given there)."""

from nlsr_fast.ops._counts import keep_count, keep_count_for_sparsity
from nlsr_fast.ops._registry import Backend, available, select
from nlsr_fast.ops.extrapolate import extrapolate, extrapolate_reference
from nlsr_fast.ops.lora_masked_cosine import lora_masked_cosine, lora_masked_cosine_reference
from nlsr_fast.ops.masked_delta_cosine import masked_delta_cosine, masked_delta_cosine_reference
from nlsr_fast.ops.masked_restore import masked_restore, masked_restore_reference
from nlsr_fast.ops.masked_values import (
    masked_gather,
    masked_gather_reference,
    masked_scatter,
    masked_scatter_reference,
)
from nlsr_fast.ops.matrix_topk_mask import matrix_topk_mask, matrix_topk_mask_reference
from nlsr_fast.ops.packed_mask import PackedMask, load_masks, save_masks
from nlsr_fast.ops.random_row_mask import HOST_ONLY_REASON, random_row_mask, random_row_mask_reference, random_stream
from nlsr_fast.ops.row_topk_mask import row_topk_mask, row_topk_mask_reference

OPS = (
    "row_topk_mask",
    "matrix_topk_mask",
    "masked_delta_cosine",
    "lora_masked_cosine",
    "masked_restore",
    "extrapolate",
    "random_row_mask",
    "masked_gather",
    "masked_scatter",
)

#: Ops with no Triton backend, each with the reason: they have no tensor input, so they run on the host (cpu
#: backend, else the reference) and move their result to the device asked for.
HOST_OPS: dict[str, str] = {"random_row_mask": HOST_ONLY_REASON}

__all__ = [
    "HOST_OPS",
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
    "masked_gather",
    "masked_gather_reference",
    "masked_restore",
    "masked_restore_reference",
    "masked_scatter",
    "masked_scatter_reference",
    "random_row_mask",
    "random_row_mask_reference",
    "random_stream",
    "matrix_topk_mask",
    "matrix_topk_mask_reference",
    "row_topk_mask",
    "row_topk_mask_reference",
    "save_masks",
    "select",
]
