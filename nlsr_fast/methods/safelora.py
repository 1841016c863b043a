"""safelora: project each module's fine-tuning change on the aligned change's column space (Hsu et al. 2024).

Per module, V = W_aligned - W_base and dW = W_finetuned - W_aligned; C = V V^T / ||V||_F. The modules whose
cos(C dW, dW) is lowest (the `count` least similar, 10 by default, or those under a threshold) get W_aligned + C dW;
the others keep the fine-tuned weights (docs/algorithm.md §11). C is never formed at d_out x d_out beyond
min(d_out, d_in)^2: in LoRA mode everything goes through r x r products of the factors; in dense mode with an aligned
adapter (V of rank r) through thin GEMMs with its factors, the weight as W_base + left (right + P) as in LoRA mode; with
a full aligned checkpoint the product is taken in the order whose intermediate is the smaller square.
"""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs

#: Dense mode with a full-rank V: above this many multiply-adds x2 (FLOPs) in all on a CPU, the run is refused
#: (docs/algorithm.md §11: about 15-30 minutes at the 100-200 GFLOP/s fp32 of a few CPU cores).
CPU_FLOP_LIMIT = 2e14


def dense_flops(d_out: int, d_in: int, rank: int | None = None) -> int:
    """FLOPs of C dW for one d_out x d_in module: two GEMMs through the min(d_out, d_in)^2 intermediate, or with an
    aligned change of rank `rank` (an aligned adapter) two thin ones (K in pass 1, the weight in pass 2)."""
    return 4 * d_out * d_in * (min(d_out, d_in) if rank is None else rank)


def no_delta(name: str) -> ValueError:
    return ValueError(f"module {name}: the aligned model equals the base there (V = 0), so safelora has no aligned "
                      "change to project on; leave the module out (--targets, dense mode) or use an aligned model that "
                      "changes it")


def change_norm(left: Any, right: Any) -> Any:
    """||left @ right||_F in fp64 from the two factors' r x r Grams (the d_out x d_in product is never formed)."""
    left, right = left.double(), right.double()
    return ((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt()


def _cosine(inner: Any, norm2_a: Any, norm2_b: Any) -> float:
    """cos from an inner product and two squared norms (fp64); 1.0 when the fine-tuning change is zero."""
    if float(norm2_b) == 0.0:
        return 1.0
    if float(norm2_a) == 0.0:
        return 0.0
    return float(inner / (norm2_a.sqrt() * norm2_b.sqrt()))


def lora_projection(name: str, aligned: tuple[Any, Any], s_a: float, finetuned: tuple[Any, Any],
                    s_t: float) -> tuple[Any, float]:
    """(the output's A factor, cos(C dW, dW)) of a LoRA module, in fp64 through r x r products.

    V = s_a B_a A_a and dW = s_t B_t A_t - s_a B_a A_a. With K = B_a^T dW and G = A_a A_a^T, C dW = B_a P for
    P = s_a^2 G K / ||V||_F, so W_aligned + C dW = W_0 + B_a (s_a A_a + P): the output keeps B_a and its A is
    (s_a A_a + P) / s_t under the fine-tuned adapter's scale.
    """
    import torch

    a_a, b_a = (t.to(torch.float64) for t in aligned)
    a_t, b_t = (t.to(device=a_a.device, dtype=torch.float64) for t in finetuned)
    gram_a, gram_b = a_a @ a_a.T, b_a.T @ b_a
    k = s_t * (b_a.T @ b_t) @ a_t - s_a * gram_b @ a_a
    norm_v = s_a * change_norm(b_a, a_a)
    if float(norm_v) == 0.0:
        raise no_delta(name)
    p = (s_a * s_a) * (gram_a @ k) / norm_v
    stacked_b = torch.cat([s_t * b_t, -s_a * b_a], dim=1)
    stacked_a = torch.cat([a_t, a_a], dim=0)
    norm2_dw = ((stacked_b.T @ stacked_b) * (stacked_a @ stacked_a.T)).sum()
    cos = _cosine((p * k).sum(), ((gram_b @ p) * p).sum(), norm2_dw)
    return (s_a * a_a + p) / s_t, cos


def _dot(x: Any, y: Any) -> Any:
    """sum(x * y) accumulated in fp64, with one fp32 temporary (no fp64 copy of a 70B-sized weight)."""
    import torch

    return torch.sum(x * y, dtype=torch.float64)


def dense_projection(name: str, w_a: Any, w_0: Any, w_t: Any) -> tuple[Any, float]:
    """(W_aligned + C dW in fp32, cos(C dW, dW)) of a dense module (fp32 GEMMs, fp64 sums). Holds three fp32 copies
    of the weight (V, dW, C dW) and one temporary at a time."""

    w_a32 = w_a.float()
    v = w_a32 - w_0.float()
    norm_v = _dot(v, v).sqrt()
    if float(norm_v) == 0.0:
        raise no_delta(name)
    dw = w_t.float() - w_a32
    d_out, d_in = v.shape
    if d_out <= d_in:
        projected = (v @ v.T) @ dw  # the d_out x d_out C is the smaller square
    else:
        projected = v @ (v.T @ dw)  # d_in x d_in
    del v
    projected.div_(float(norm_v))
    cos = _cosine(_dot(projected, dw), _dot(projected, projected), _dot(dw, dw))
    return projected.add_(w_a32), cos


def dense_lowrank_projection(name: str, left: Any, right: Any, w_a: Any, w_t: Any,
                             dw: Any = None) -> tuple[Any, float]:
    """(Q, cos(C dW, dW)) of a dense module whose aligned change is V = left @ right (an aligned adapter's s B A:
    rank r), from W_a (the merged weight) and W_t in any float dtype. With K = left^T dW and
    P = (right right^T) K / ||V||_F, C dW = left @ P, so W_a + C dW = W_0 + left @ Q for Q = right + P (r x d_in,
    fp32): LoRA mode's association, written by `dense_lowrank_weight` with one rank-r GEMM. Here one rank-r GEMM
    (K, 2 r d_out d_in FLOPs); dW = W_t - W_a is formed in fp32 into `dw` (a d_out x d_in fp32 buffer, fresh when
    None) a block of rows at a time, its squared norm summed in fp64 while the block is in cache; P is fp64 and Q is
    rounded once to fp32."""
    import torch

    left, right = left.float(), right.float()
    norm_v = change_norm(left, right)
    if float(norm_v) == 0.0:
        raise no_delta(name)
    d_out, d_in = w_t.shape
    dw = torch.empty((d_out, d_in), dtype=torch.float32, device=w_t.device) if dw is None else dw
    norm2_dw = torch.zeros((), dtype=torch.float64, device=w_t.device)
    # 8 MiB blocks of fp32: in cache from the subtraction to the norm, and few enough that the time the two intra-op
    # threads spend waiting for each other (the reader thread computes the next module meanwhile) stays small
    step = max(1, 2**21 // d_in)
    for r in range(0, d_out, step):
        block = dw[r:r + step]
        block.copy_(w_t[r:r + step]).sub_(w_a[r:r + step])  # fp32 arithmetic: bf16 -> fp32 is exact
        norm2_dw += torch.linalg.vector_norm(block, dtype=torch.float64).square()
    k = (left.T @ dw).double()  # r x d_in
    p = (right @ right.T).double() @ k / norm_v
    cos = _cosine(torch.sum(p * k), torch.sum(((left.T @ left).double() @ p) * p), norm2_dw)
    return (right.double() + p).float(), cos


def dense_lowrank_weight(w_0: Any, left: Any, q: Any, out: Any = None, scratch: Any = None) -> Any:
    """W_0 + left @ q (left d_out x r and q r x d_in fp32), computed in fp32 and rounded once into `out` (fp32 when
    None; the fine-tuned dtype in a run): one rank-r GEMM, 2 r d_out d_in FLOPs, a block of rows at a time through
    `scratch` (an fp32 buffer of at least one row; 1024 rows when None), so the fp32 transient is one block."""
    import torch

    d_out, d_in = w_0.shape
    out = torch.empty((d_out, d_in), dtype=torch.float32, device=w_0.device) if out is None else out
    if scratch is None:
        scratch = torch.empty((min(1024, d_out), d_in), dtype=torch.float32, device=w_0.device)
    step = scratch.numel() // d_in
    assert step > 0, f"scratch of {scratch.numel()} entries holds no row of {d_in}"
    for r in range(0, d_out, step):
        n = min(step, d_out - r)
        block = scratch.reshape(-1)[: n * d_in].view(n, d_in)
        block.copy_(w_0[r:r + n]).addmm_(left[r:r + n], q)
        out[r:r + n].copy_(block)
    return out


def lora_masks(a: Any, b: Any, _: Any, **__: Any) -> tuple[Any, Any]:
    """Every entry: a projected module's factors are replaced whole."""
    from nlsr_fast.ops import PackedMask

    return PackedMask.ones(tuple(a.shape), a.device), PackedMask.ones(tuple(b.shape), b.device)


METHOD = Method(
    name="safelora",
    title="SafeLoRA",
    reference="https://arxiv.org/abs/2405.16833",
    summary="of a module: cos(C ΔW, ΔW), C the projection on the aligned change V = W_a − W_0",
    modes=("lora", "dense"),
    needs=Needs.NONE,
    repair="project",
    selections=("count", "threshold", "fraction", "all"),
    defaults={"count": 10},  # the released code's num_proj_layers
    lora_masks=lora_masks,
)
