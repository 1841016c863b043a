"""Triton lora_masked_cosine: the three sums of cos((M_B*B_t)(M_A*A_t), (M_B*B_e)(M_A*A_e)) via r x r Grams.

<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)) (docs/algorithm.md §4), so d_out x d_in is never formed. One kernel
computes the three Grams X_t^T X_e, X_t^T X_t, X_e^T X_e of a masked factor viewed as X (K, r) (X = B, K = d_out;
or X = A^T, K = d_in) with tl.dot and fp32 accumulation. The grid is (K chunk, i tile, j tile); each program
writes its fp32 partial Grams and the host side adds them and forms the three sums in fp64.

Block sizes (fixed, for an H200; sm_90 builds checked offline for register spills): fp16/bf16 factors go to
tl.dot in their own dtype (products of two 16-bit floats are exact in fp32, so this equals fp32 math, on tensor
cores) with BLOCK_R = 64 and num_warps=8 (r = 128 gives 2 x 2 tiles); fp32 or mixed factors are upcast and use
input_precision="ieee" with BLOCK_R = 32 and num_warps=4. A small r is padded to a power of two >= 16 (tl.dot's
minimum) with masked zeros. BLOCK_K = 32. The interpreter always takes the fp32 path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlsr_fast.kernels._common import LAUNCH_OPTS, check_grid, interpreting

BLOCK_R_NATIVE = 64
BLOCK_R_FP32 = 32
BLOCK_K = 32


@triton.jit
def _load_masked_factor(
    X_ptr,  # factor in memory: A (r, K) when K_IS_COL else B (K, r)
    Bits_ptr,  # its PackedMask bits (same logical shape as the factor)
    kk,  # int64 K indices, broadcastable against ii
    ii,  # int64 rank indices, broadcastable against kk
    k_end,  # end of this program's K chunk (exclusive)
    K,  # length of the contracted dim (row stride of A)
    r,  # rank
    nbytes,  # mask bytes per mask row
    K_IS_COL: tl.constexpr,  # True for A (mask rows are rank indices), False for B
    NATIVE: tl.constexpr,  # keep the loaded dtype (fp16/bf16 tensor-core dot) instead of fp32
):
    """X[k, i] * mask[k, i] as a tile, zero outside the matrix."""
    valid = (kk < k_end) & (ii < r)
    if K_IS_COL:
        x = tl.load(X_ptr + ii * K + kk, mask=valid, other=0.0)
        byte = tl.load(Bits_ptr + ii * nbytes + kk // 8, mask=valid, other=0).to(tl.int32)
        bit = (byte >> (kk % 8).to(tl.int32)) & 1
    else:
        x = tl.load(X_ptr + kk * r + ii, mask=valid, other=0.0)
        byte = tl.load(Bits_ptr + kk * nbytes + ii // 8, mask=valid, other=0).to(tl.int32)
        bit = (byte >> (ii % 8).to(tl.int32)) & 1
    if not NATIVE:
        x = x.to(tl.float32)
    return tl.where(bit != 0, x, tl.zeros_like(x))


@triton.jit
def _lora_masked_cosine_kernel(
    Partial_ptr,  # out: (3, n_chunks, r, r) fp32 partial Grams (t^T e, t^T t, e^T e)
    T_ptr,  # in: fine-tuned factor, contiguous, A (r, K) or B (K, r)
    E_ptr,  # in: reference factor, same shape, contiguous
    Bits_ptr,  # in: PackedMask bits of the factor's shape, applied to both
    K,  # contracted length (d_in for A, d_out for B)
    r,  # rank
    nbytes,  # mask bytes per mask row
    chunk,  # K entries per program (a multiple of BLOCK_K)
    n_chunks,  # number of K chunks
    tiles_r,  # rank tiles per Gram axis
    K_IS_COL: tl.constexpr,  # True for A, False for B
    NATIVE: tl.constexpr,  # dot in the factors' 16-bit dtype (exact products, fp32 accumulation)
    BLOCK_R: tl.constexpr,  # rank tile
    BLOCK_K: tl.constexpr,  # K step
):
    """G_xy[i, j] = sum_{k in chunk} X[k, i] * Y[k, j] for (x, y) in (t, e), (t, t), (e, e); X = masked factor."""
    pid = tl.program_id(0).to(tl.int64)
    kc = pid // (tiles_r * tiles_r)
    ti = (pid // tiles_r) % tiles_r
    tj = pid % tiles_r
    i = ti * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    j = tj * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    kr = tl.arange(0, BLOCK_K).to(tl.int64)
    acc_te = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    acc_tt = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    acc_ee = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    k_start = kc * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kr
        # X^T tiles [BLOCK_R, BLOCK_K] for rank tile i, X tiles [BLOCK_K, BLOCK_R] for rank tile j
        t_i = _load_masked_factor(T_ptr, Bits_ptr, k[None, :], i[:, None], k_end, K, r, nbytes, K_IS_COL, NATIVE)
        e_i = _load_masked_factor(E_ptr, Bits_ptr, k[None, :], i[:, None], k_end, K, r, nbytes, K_IS_COL, NATIVE)
        t_j = _load_masked_factor(T_ptr, Bits_ptr, k[:, None], j[None, :], k_end, K, r, nbytes, K_IS_COL, NATIVE)
        e_j = _load_masked_factor(E_ptr, Bits_ptr, k[:, None], j[None, :], k_end, K, r, nbytes, K_IS_COL, NATIVE)
        if NATIVE:
            acc_te = tl.dot(t_i, e_j, acc_te)
            acc_tt = tl.dot(t_i, t_j, acc_tt)
            acc_ee = tl.dot(e_i, e_j, acc_ee)
        else:
            acc_te = tl.dot(t_i, e_j, acc_te, input_precision="ieee")
            acc_tt = tl.dot(t_i, t_j, acc_tt, input_precision="ieee")
            acc_ee = tl.dot(e_i, e_j, acc_ee, input_precision="ieee")
    out = i[:, None] * r + j[None, :]
    valid = (i[:, None] < r) & (j[None, :] < r)
    plane = n_chunks * r * r
    base = Partial_ptr + kc * r * r
    tl.store(base + out, acc_te, mask=valid)
    tl.store(base + plane + out, acc_tt, mask=valid)
    tl.store(base + 2 * plane + out, acc_ee, mask=valid)


def _grams(x_t: torch.Tensor, x_e: torch.Tensor, bits: torch.Tensor, k_is_col: bool) -> torch.Tensor:
    """(3, r, r) fp64 Grams (t^T e, t^T t, e^T e) of one masked factor pair, contracted over K."""
    if k_is_col:
        r, K = x_t.shape
    else:
        K, r = x_t.shape
    if r == 0 or K == 0:
        return torch.zeros(3, r, r, dtype=torch.float64, device=x_t.device)
    native = not interpreting() and x_t.dtype == x_e.dtype and x_t.dtype in (torch.float16, torch.bfloat16)
    block_max = BLOCK_R_NATIVE if native else BLOCK_R_FP32
    block_r = block_max if r > block_max // 2 else max(16, triton.next_power_of_2(r))
    tiles_r = triton.cdiv(r, block_r)
    # ~K / (12 r) chunks keeps the fp32 partials (3 n_chunks r^2) under a quarter of the bf16 inputs read
    n_chunks = max(1, min(64, K // (12 * r), triton.cdiv(K, BLOCK_K)))
    chunk = triton.cdiv(triton.cdiv(K, n_chunks), BLOCK_K) * BLOCK_K
    n_chunks = triton.cdiv(K, chunk)
    grid = n_chunks * tiles_r * tiles_r
    check_grid("lora_masked_cosine", grid)
    partial = torch.empty(3, n_chunks, r, r, dtype=torch.float32, device=x_t.device)
    _lora_masked_cosine_kernel[(grid,)](
        partial, x_t, x_e, bits, K, r, bits.shape[1], chunk, n_chunks, tiles_r,
        K_IS_COL=k_is_col, NATIVE=native, BLOCK_R=block_r, BLOCK_K=BLOCK_K, num_warps=8 if block_r == 64 else 4,
        **LAUNCH_OPTS,
    )  # fmt: skip
    return partial.double().sum(dim=1)


def lora_masked_cosine_triton(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    bits_a: torch.Tensor,
    bits_b: torch.Tensor,
) -> tuple[float, float, float]:
    """(<W_t, W_e>, |W_t|^2, |W_e|^2), W_x = (M_B*B_x)(M_A*A_x); factors contiguous, bits the masks' bytes."""
    g_a = _grams(a_t, a_e, bits_a, k_is_col=True)  # A_t A_e^T, A_t A_t^T, A_e A_e^T
    g_b = _grams(b_t, b_e, bits_b, k_is_col=False)  # B_t^T B_e, B_t^T B_t, B_e^T B_e
    dot, nt, ne = (g_b * g_a).sum(dim=(1, 2)).tolist()
    return dot, nt, ne
