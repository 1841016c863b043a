"""snip: |W| times the summed per-sample |dL/dW| of the calibration responses' NLL (Lee et al. 2019)."""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs


def lora_masks(a: Any, b: Any, grads: Any, *, sparsity: float, backend: str | None, **_: Any) -> tuple[Any, Any]:
    """Masks from the summed |dL/dA|, |dL/dB| of the module (any gradient method)."""
    import torch

    from nlsr_fast.ops import row_topk_mask

    g_a, g_b = grads
    keep = 1.0 - sparsity
    return (row_topk_mask(a, keep, grad=g_a.to(device=a.device, dtype=torch.float32), backend=backend),
            row_topk_mask(b, keep, grad=g_b.to(device=b.device, dtype=torch.float32), backend=backend))


METHOD = Method(
    name="snip",
    title="snip",
    reference="https://arxiv.org/abs/1810.02340",
    summary="|W| × Σ per-sample |∂ loss / ∂W| of the safe responses",
    modes=("lora", "dense"),
    needs=Needs.GRADIENTS,
    loss="nll",
    lora_masks=lora_masks,
)
