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


def combine(w_t: Any, w_a: Any, w_u: Any, *, beta: float, keep: Any = None, rate: float = 0.0) -> Any:
    """theta (fp32) of one module: w_t + beta (w_a - w_u), or with DARE's `keep` w_a + keep (w_t - w_a) / (1 - rate)
    + beta (w_a - w_u)."""
    w_a32 = w_a.float()
    safety = (w_a32 - w_u.float()).mul_(beta)
    if keep is None:
        return safety.add_(w_t.float())
    change = (w_t.float() - w_a32).mul_(keep.to(w_a32.device)).div_(1.0 - rate)
    return change.add_(w_a32).add_(safety)


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
