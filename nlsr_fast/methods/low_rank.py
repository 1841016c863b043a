"""low_rank, NLSR's default score: the size of each entry after projecting the factor on the top singular
directions of its calibration outputs, from one r x r Gram per module (docs/algorithm.md §3)."""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs


def _finite_gram(name: str, gram: Any) -> Any:
    """The module's calibration Gram, refused with the module named when it holds NaN/Inf."""
    import torch

    if not torch.isfinite(gram).all():
        raise ValueError(f"module {name!r}: its calibration Gram has non-finite entries (an overflow in a "
                         "low-precision calibration forward? try calib_dtype='float32' / --calib-dtype float32)")
    return gram


def lora_masks(a: Any, b: Any, stats: Any, *, sparsity: float, preset: Any, module: str, backend: str | None,
               **_: Any) -> tuple[Any, Any]:
    from nlsr_fast.calib.lowrank import low_rank_topk_masks

    # official: the code keeps |W~| strictly above the floor(s n)-th smallest value, one entry fewer.
    return low_rank_topk_masks(a, b, _finite_gram(module, stats.gram).to(a.device), sparsity,
                               fewer=preset.low_rank_count_offset, backend=backend)


def project(a: Any, b: Any, stats: Any, *, sparsity: float, preset: Any, module: str,
            backend: str | None) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The sequential schedule's factors (the projected W~_A, W~_B) and the final masks, from one
    eigen-decomposition."""
    from nlsr_fast.calib.lowrank import project_and_mask

    return project_and_mask(a, b, _finite_gram(module, stats.gram).to(a.device), sparsity,
                            fewer=preset.low_rank_count_offset, backend=backend)


METHOD = Method(
    name="low_rank",
    title="NLSR low-rank",
    reference="https://arxiv.org/abs/2412.12497",
    summary="size of the entry after projecting the factor on the top singular directions of its outputs",
    modes=("lora",),
    refused={"dense": "it would need a d_in x d_in Gram and its eigen-decomposition per linear (28672^2 fp64 = 6.6 GB "
                      "and ~10^13 flops for one Llama-3-70B down_proj, 80 of them)"},
    needs=Needs.STATISTICS,
    group="matrix",
    sequential=True,
    lora_masks=lora_masks,
    project=project,
)
