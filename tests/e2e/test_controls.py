"""Matched random masks, oracle masks and the drift diagnostics on small random factors (no model)."""

from __future__ import annotations

import torch

from experiments.controls import diagnostics, matched_random_masks, oracle_masks
from nlsr_fast.ops import PackedMask, row_topk_mask
from nlsr_fast.pipeline import amplify, restore


def _factors(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": (torch.randn(4, 13, generator=g), torch.randn(7, 4, generator=g)) for i in range(3)}


def test_matched_masks_same_counts_other_positions() -> None:
    ft, al = _factors(0), _factors(1)
    src = {n: (row_topk_mask(a.abs(), 0.2), row_topk_mask(b.abs(), 0.2)) for n, (a, b) in al.items()}
    chosen = ["m0", "m2"]
    rnd = matched_random_masks(src, ft, chosen, seed=3)
    assert set(rnd) == set(chosen)
    for n in chosen:
        for mk_r, mk_s in zip(rnd[n], src[n], strict=True):
            assert mk_r.count() == mk_s.count()
    assert not all(rnd[n][0].equal(src[n][0]) for n in chosen)
    assert all(rnd[n][0].equal(matched_random_masks(src, ft, chosen, seed=3)[n][0]) for n in chosen)
    ref = amplify(al, 0.9, "paper")
    new = restore(ft, ref, rnd, chosen)
    d = diagnostics(new, ft, al, scale=2.0)
    assert d["modules_changed"] == 2
    assert d["entries_changed"] == sum(m.count() for n in chosen for m in rnd[n])
    assert 0 < d["drift_touched_pct"] < 100


def test_oracle_masks_take_the_largest_drift() -> None:
    ft, al = _factors(0), _factors(1)
    orc = oracle_masks(ft, al, ["m1"], sparsity=0.8)
    a_t, a_a = ft["m1"][0], al["m1"][0]
    m = orc["m1"][0].to_bool()
    assert int(m.sum()) == 52 - int(0.8 * 52)  # n - floor(s n)
    drift = (a_t - a_a).abs()
    assert float(drift[m].min()) >= float(drift[~m].max())


def test_diagnostics_extremes() -> None:
    ft, al = _factors(0), _factors(1)
    same = diagnostics(ft, ft, al, scale=2.0)
    assert same["entries_changed"] == 0 and same["drift_touched_pct"] == 0.0 and same["dw_to_aligned_rel"] == 1.0
    ones = {n: (PackedMask.ones(tuple(a.shape)), PackedMask.ones(tuple(b.shape))) for n, (a, b) in ft.items()}
    back = restore(ft, al, ones, list(ft))
    d = diagnostics(back, ft, al, scale=2.0)
    assert d["drift_touched_pct"] == 100.0 and d["dw_to_aligned_rel"] == 0.0
