"""The Gram route of low_rank against an explicit SVD of the stored activations (docs/algorithm.md §9.6)."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.calib import collect_lora_statistics, low_rank_masks, low_rank_topk_masks, project_factors
from nlsr_fast.calib.hf_reference import hf_peft_model, lora_layers
from nlsr_fast.calib.lowrank import projection_rank
from nlsr_fast.ops import keep_count_for_sparsity, matrix_topk_mask


def _explicit(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float):
    """W̃ = V_k V_kᵀ W with V_k the top-k right singular vectors of the stored Y = X·Wᵀ (the released route)."""
    X, A, B = X.double(), A.double(), B.double()
    k = projection_rank(A.shape[0], s)
    out = []
    for Y, W in ((X @ A.T, A), ((X @ A.T) @ B.T, B)):
        _, _, vh = torch.linalg.svd(Y, full_matrices=False)
        v = vh[:k].T
        out.append(v @ (v.T @ W))
    return out


def _same_subspace(P: torch.Tensor, Q: torch.Tensor) -> None:
    torch.testing.assert_close(P.double(), Q.double(), rtol=1e-6, atol=1e-8)


def _masks_equal_up_to_ties(m, ref_mask, score) -> None:
    a, b = m.to_bool(), ref_mask.to_bool()
    assert int(a.sum()) == int(b.sum())
    diff = a ^ b
    if diff.any():  # only near-ties at the threshold may differ
        thr = score[b].min()
        assert torch.allclose(score[diff], thr.expand(int(diff.sum())), rtol=1e-5), "masks differ beyond ties"


@pytest.mark.parametrize("r,d_in,d_out,s", [(8, 20, 24, 0.8), (16, 40, 12, 0.5), (5, 7, 9, 0.3)])
def test_gram_route_equals_explicit_svd(r, d_in, d_out, s):
    g = torch.Generator().manual_seed(r + d_in)
    X = torch.randn(200, d_in, generator=g) * torch.linspace(0.2, 3.0, d_in)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    Z = X.double() @ A.T
    G = Z.T @ Z
    wa, wb = project_factors(A, B, G, s)
    ea, eb = _explicit(X, A, B, s)
    _same_subspace(wa, ea)
    _same_subspace(wb, eb)
    sa, sb = low_rank_masks(A, B, G, s)
    assert sa.dtype == torch.float32 and sa.shape == A.shape and sb.shape == B.shape
    for fewer in (0, 1):
        ma, mb = low_rank_topk_masks(A, B, G, s, fewer=fewer, backend="reference")
        for m, e, score in ((ma, ea, sa), (mb, eb, sb)):
            torch.testing.assert_close(score, e.abs().float(), rtol=1e-5, atol=1e-6)
            n = e.numel()
            k = keep_count_for_sparsity(n, s) - fewer
            ref = matrix_topk_mask(e.abs().float(), 1 - s, k=k, backend="reference")
            _masks_equal_up_to_ties(m, ref, e.abs().float())
            assert int(m.to_bool().sum()) == k


def test_count_at_160():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 20, generator=g)
    B = torch.randn(20, 8, generator=g)
    G = torch.eye(8) + 0.1
    ma, mb = low_rank_topk_masks(A, B, G, 0.8, backend="reference")
    assert int(ma.to_bool().sum()) == 32 and int(mb.to_bool().sum()) == 32
    ma, _ = low_rank_topk_masks(A, B, G, 0.8, fewer=1, backend="reference")  # preset official
    assert int(ma.to_bool().sum()) == 31


def test_projection_rank_and_errors():
    assert projection_rank(4, 0.8) == 3 and projection_rank(10, 0.8) == 8 and projection_rank(128, 0.8) == 102
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    with pytest.raises(ValueError, match="rank-4"):
        project_factors(A, B, torch.eye(3), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        project_factors(A, B, torch.full((4, 4), float("nan")), 0.5)
    # k = floor(s*r): s = 1 keeps the full subspace (identity), s = 0 projects onto nothing
    wa, wb = project_factors(A, B, torch.eye(4) + 0.1, 1.0)
    torch.testing.assert_close(wa, A)
    torch.testing.assert_close(wb, B)
    wa, wb = project_factors(A, B, torch.eye(4) + 0.1, 0.0)
    assert not wa.any() and not wb.any()


def test_engine_gram_vs_stored_activations(tiny):
    """End to end: masks from the engine's Gram equal masks from an explicit SVD of the HF model's stored inputs."""
    peft = hf_peft_model(tiny.base, tiny.adapter, tiny.factors)
    names = [n for n in tiny.factors if n.endswith(("q_proj", "down_proj"))]
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    state = {}
    mods = lora_layers(peft)
    hooks = [mods[n].lora_A["default"].register_forward_hook(
        lambda m, i, o, n=n: store[n].append(i[0][state["mask"]].detach())) for n in names]
    with torch.no_grad():
        for smp in tiny.calib.samples:
            state["mask"] = smp.response_mask[None]
            peft(input_ids=smp.input_ids[None])
    for h in hooks:
        h.remove()
    stats = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib)
    s = 0.5
    for n in names:
        X = torch.cat(store[n])
        A, B, _ = tiny.factors[n]
        ea, eb = _explicit(X, A, B, s)
        wa, wb = project_factors(A.double(), B.double(), stats[n].gram, s)
        torch.testing.assert_close(wa, ea, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wb, eb, rtol=1e-4, atol=1e-6)
        ma, mb = low_rank_topk_masks(A, B, stats[n].gram, s, backend="reference")
        for m, e in ((ma, ea), (mb, eb)):
            ref = matrix_topk_mask(e.abs().float(), 1 - s, backend="reference")
            _masks_equal_up_to_ties(m, ref, e.abs().float())
