"""resta: add the safety vector back to the fine-tuned model, optionally after DARE on the fine-tuning change
(Bhardwaj et al. 2024).

theta = theta_ft + beta (theta_aligned - theta_unaligned), with the unaligned model the base unless one is given
(--unaligned). With --dare-rate p, the fine-tuning change delta = theta_ft - theta_aligned first loses a seeded
Bernoulli(p) share of its entries and the rest is rescaled by 1/(1 - p): theta = theta_aligned + DARE(delta) +
beta (theta_aligned - theta_unaligned). Every target module, element by element (docs/algorithm.md §12).
"""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs

#: Rows drawn at once for DARE (bounds the uniform draw's transient; the draw is defined block by block).
DARE_ROWS = 1024


def dare_keep(shape: tuple[int, int], rate: float, seed: int, key: str) -> Any:
    """The entries DARE keeps of module `key`'s change (bool, CPU): uniform(0, 1) >= rate from a generator of its
    own, seeded with random_stream(seed, key) and drawn DARE_ROWS rows at a time, so any order and any number of
    processes give the same draw."""
    import torch

    from nlsr_fast.ops import random_stream

    gen = torch.Generator("cpu").manual_seed(random_stream(seed, key))
    rows, cols = shape
    return torch.cat([torch.rand((min(DARE_ROWS, rows - r), cols), generator=gen) >= rate
                      for r in range(0, rows, DARE_ROWS)]) if rows else torch.zeros(shape, dtype=torch.bool)


def combine(w_t: Any, w_a: Any, w_u: Any, *, beta: float, keep: Any = None, rate: float = 0.0,
            out: Any = None) -> Any:
    """theta (fp32) of one module: w_t + beta w_a - beta w_u, or with DARE's `keep` w_a + keep (w_t - w_a) / (1 - rate)
    + beta w_a - beta w_u; computed in place in `out` (an fp32 buffer of the weight's shape, or a new one), the inputs
    cast as they are read, so a module costs one fp32 copy."""
    import torch

    theta = torch.empty(w_t.shape, dtype=torch.float32, device=w_t.device) if out is None else out
    theta.copy_(w_t)
    if keep is not None:
        theta.sub_(w_a).mul_(keep).div_(1.0 - rate).add_(w_a)
    return theta.add_(w_a, alpha=beta).sub_(w_u, alpha=beta)


METHOD = Method(
    name="resta",
    title="RESTA",
    reference="https://arxiv.org/abs/2402.11746",
    summary="adds β × (aligned − unaligned), the safety vector, to every module (DARE on the fine-tuning change "
            "optional)",
    modes=("dense",),
    refused={"lora": "the sum of two adapters' changes has twice their rank; --mode auto runs it in dense mode "
                     "(adapters merged on the fly) and writes a full checkpoint"},
    needs=Needs.NONE,
    repair="add",
    selections=("all",),
    options=("beta", "dare_rate", "unaligned"),
    defaults={"beta": 0.5},
)
