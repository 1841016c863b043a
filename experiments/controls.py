"""Controls of the end-to-end experiment, built on an NLSR run's masks with the public ops and pipeline stages.

- `matched_random_masks`: for each module NLSR restored, uniformly random masks with exactly as many entries as NLSR's
  mask of that matrix (so the control restores the same modules and the same number of entries per matrix);
- `oracle_masks`: the top 1-s share of |t - a| per matrix (the entries the fine-tuning moved most);
- `diagnostics`: how many entries an arm changed, which share of the fine-tuning drift sum|t - a| it touched, and how
  far its weight deltas are from the aligned ones relative to the fine-tuned model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nlsr_fast.ops import PackedMask, keep_count_for_sparsity, matrix_topk_mask

__all__ = ["matched_random_masks", "oracle_masks", "diagnostics"]

FactorDict = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def matched_random_masks(masks: Mapping[str, tuple[PackedMask, PackedMask]], factors: FactorDict,
                         modules: Sequence[str], seed: int) -> dict[str, tuple[PackedMask, PackedMask]]:
    """{module: (mask_A, mask_B)} for `modules`: uniform random positions, count equal to masks[module]'s per matrix."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    out: dict[str, tuple[PackedMask, PackedMask]] = {}
    for n in modules:
        pair = []
        for mk, x in zip(masks[n], factors[n], strict=True):
            k = mk.count()
            flat = torch.zeros(x.numel(), dtype=torch.bool)
            flat[torch.randperm(x.numel(), generator=gen)[:k]] = True
            pair.append(PackedMask.from_bool(flat.view(tuple(x.shape))))
        out[n] = (pair[0], pair[1])
    return out


def oracle_masks(ft: FactorDict, al: FactorDict, modules: Sequence[str],
                 sparsity: float) -> dict[str, tuple[PackedMask, PackedMask]]:
    """{module: (mask_A, mask_B)}: the top n - floor(s n) entries of |t - a| of each factor matrix."""
    out: dict[str, tuple[PackedMask, PackedMask]] = {}
    for n in modules:
        pair = []
        for x_t, x_a in zip(ft[n], al[n], strict=True):
            k = keep_count_for_sparsity(x_t.numel(), sparsity)
            pair.append(matrix_topk_mask((x_t.float() - x_a.float()).abs().contiguous(), 1.0 - sparsity, k=k))
        out[n] = (pair[0], pair[1])
    return out


def diagnostics(new: FactorDict, ft: FactorDict, al: FactorDict, scale: float) -> dict[str, Any]:
    """modules_changed, entries_changed (bit-level), drift_touched_pct (share of sum|t - a| on changed entries) and
    dw_to_aligned_rel = ||dW_new - dW_a||_F / ||dW_t - dW_a||_F over all modules."""
    from nlsr_fast.pipeline import changed_entries

    changed = modules = 0
    num = den = 0.0
    d_new = d_ft = 0.0
    for n, (a_t, b_t) in ft.items():
        a_n, b_n = new[n]
        a_a, b_a = al[n]
        c = changed_entries(a_t, a_n) + changed_entries(b_t, b_n)
        changed += c
        modules += int(c > 0)
        for x_t, x_n, x_a in ((a_t, a_n, a_a), (b_t, b_n, b_a)):
            drift = (x_t.float() - x_a.float()).abs()
            den += float(drift.sum())
            num += float(drift[x_n != x_t].sum())
        w_a = b_a.float() @ a_a.float()
        d_new += float((scale * (b_n.float() @ a_n.float() - w_a)).square().sum())
        d_ft += float((scale * (b_t.float() @ a_t.float() - w_a)).square().sum())
    return {"modules_changed": modules, "entries_changed": changed,
            "drift_touched_pct": 100.0 * num / den if den else 0.0,
            "dw_to_aligned_rel": (d_new / d_ft) ** 0.5 if d_ft else None}
