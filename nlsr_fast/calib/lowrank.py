"""The low_rank score of a LoRA module from its r×r Gram, without storing activations (docs/algorithm.md §3).

For the A factor (r, d_in) the calibration outputs are Y = X·Aᵀ, YᵀY = G = Σ_t (A x_t)(A x_t)ᵀ (r, r), and
W̃_A = V_k V_kᵀ A with V_k the top-k eigenvectors of G. For the B factor (d_out, r) the inputs are z_t = A x_t,
Y_B = Z·Bᵀ, Y_BᵀY_B = B·G·Bᵀ, whose top-k eigenvectors are the top-k left singular vectors U_k of B·G^{1/2}
(d_out, r), and W̃_B = U_k U_kᵀ B. k = ⌊s·r⌋ (min(d_out, d_in) = r for both factors), snapped as in docs/algorithm.md §3.
All of it is computed in float64 on the r×r Gram: O(r³ + r²·(d_in + d_out)) per module.
"""

from __future__ import annotations

import torch

from nlsr_fast.ops import keep_count_for_sparsity, matrix_topk_mask
from nlsr_fast.ops.packed_mask import PackedMask

__all__ = ["projection_rank", "project_factors", "low_rank_masks", "low_rank_topk_masks", "project_and_mask"]


def projection_rank(n: int, sparsity: float) -> int:
    """k = ⌊s·n⌋ with s·n snapped to the nearest integer when within 1e-9 (n - keep_count_for_sparsity)."""
    return n - keep_count_for_sparsity(n, sparsity)


def _check(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor) -> int:
    if A.ndim != 2 or B.ndim != 2 or G.ndim != 2:
        raise ValueError(f"A, B, G must be 2-D, got {tuple(A.shape)}, {tuple(B.shape)}, {tuple(G.shape)}")
    r = A.shape[0]
    if B.shape[1] != r or tuple(G.shape) != (r, r):
        raise ValueError(f"shapes do not match a rank-{r} LoRA: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"G {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise ValueError("the Gram G has non-finite entries")
    return r


def _subspaces(B: torch.Tensor, G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_k (r, k), U_k (d_out, k)) in float64: top-k eigenvectors of G and top-k left singular vectors of B·G^½."""
    g = G.to(torch.float64)
    g = 0.5 * (g + g.T)
    evals, evecs = torch.linalg.eigh(g)  # ascending
    v_k = evecs[:, evals.numel() - k:] if k > 0 else evecs[:, :0]
    # B·G^½ = B·Q·Λ^½·Qᵀ has the left singular vectors of B·Q·Λ^½ (Qᵀ is orthogonal on the right).
    m = B.to(torch.float64) @ (evecs * evals.clamp_min(0.0).sqrt())
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    u_k = u[:, :k]
    return v_k, u_k


def _projections(
    A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃_A, W̃_B) in float64."""
    r = _check(A, B, G)
    k = projection_rank(r, sparsity)
    v_k, u_k = _subspaces(B, G, k)
    wa = v_k @ (v_k.T @ A.to(torch.float64))
    wb = u_k @ (u_k.T @ B.to(torch.float64))
    return wa, wb


def project_factors(
    A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃_A (r, d_in), W̃_B (d_out, r)), the rank-k projections of the factors, in the dtype of A and B.

    A: (r, d_in), B: (d_out, r), G: (r, r) Gram of z_t = A x_t over response tokens; k = ⌊s·r⌋.
    """
    wa, wb = _projections(A, B, G, sparsity)
    return wa.to(A.dtype), wb.to(B.dtype)


def low_rank_masks(
    A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The low_rank scores (|W̃_A| (r, d_in), |W̃_B| (d_out, r)) in float32; the caller masks them with
    `matrix_topk_mask` over the whole matrix (`low_rank_topk_masks` does both). Computed in float64, rounded once."""
    wa, wb = _projections(A, B, G, sparsity)
    return wa.abs().to(torch.float32), wb.abs().to(torch.float32)


def _topk_masks(
    score_a: torch.Tensor, score_b: torch.Tensor, sparsity: float, fewer: int, backend: str | None
) -> tuple[PackedMask, PackedMask]:
    masks = []
    for score in (score_a, score_b):
        k = keep_count_for_sparsity(score.numel(), sparsity, fewer=fewer)
        masks.append(matrix_topk_mask(score, 1.0 - sparsity, k=k, backend=backend))
    return masks[0], masks[1]


def low_rank_topk_masks(
    A: torch.Tensor,
    B: torch.Tensor,
    G: torch.Tensor,
    sparsity: float,
    *,
    fewer: int = 0,
    backend: str | None = None,
) -> tuple[PackedMask, PackedMask]:
    """(M_A, M_B): each keeps the n - ⌊s·n⌋ - fewer largest entries of its low_rank score over the whole matrix.

    fewer: the preset field `low_rank_count_offset`, passed through unchanged (0 = paper; 1 = official, whose code
    keeps |W̃| strictly above the ⌊s·n⌋-th smallest value, one entry fewer)."""
    return _topk_masks(*low_rank_masks(A, B, G, sparsity), sparsity, fewer, backend)


def project_and_mask(
    A: torch.Tensor,
    B: torch.Tensor,
    G: torch.Tensor,
    sparsity: float,
    *,
    fewer: int = 0,
    backend: str | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[PackedMask, PackedMask]]:
    """`project_factors` and `low_rank_topk_masks` from one eigen-decomposition (what sequential calibration needs)."""
    wa, wb = _projections(A, B, G, sparsity)
    masks = _topk_masks(wa.abs().to(torch.float32), wb.abs().to(torch.float32), sparsity, fewer, backend)
    return (wa.to(A.dtype), wb.to(B.dtype)), masks
