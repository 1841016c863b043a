"""wanda: |W| times the root mean square of the entry's input over the calibration responses (Sun et al. 2023)."""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs


def input_scale(x_sq: Any, n_samples: int) -> Any:
    """sqrt(sum of squared inputs / samples) per input column, in fp32: the column scale of the score."""
    import torch

    return (x_sq.double() / max(int(n_samples), 1)).sqrt().to(torch.float32)


def lora_masks(a: Any, b: Any, stats: Any, *, sparsity: float, backend: str | None, **_: Any) -> tuple[Any, Any]:
    from nlsr_fast.ops import row_topk_mask

    keep = 1.0 - sparsity
    return (row_topk_mask(a, keep, col_scale=input_scale(stats.x_sq, stats.n_samples).to(a.device), backend=backend),
            row_topk_mask(b, keep, col_scale=input_scale(stats.z_sq, stats.n_samples).to(b.device), backend=backend))


METHOD = Method(
    name="wanda",
    title="wanda",
    reference="https://arxiv.org/abs/2306.11695",
    summary="|W| × norm of its input over the response tokens",
    modes=("lora", "dense"),
    needs=Needs.STATISTICS,
    sequential=True,
    lora_masks=lora_masks,
    col_scale=input_scale,
)
