"""Type stub of nlsr_fast._C, the torch-free C++ core (csrc/bindings.cpp).

Tensors travel as integer addresses (`tensor.data_ptr()`) of contiguous buffers with a dtype code each
(0 float32, 1 float16, 2 bfloat16; nlsr_fast/ops/_cpu.py). Outputs come first, then inputs, then sizes. Every call
releases the GIL. Shapes and dtypes are validated by the public functions in nlsr_fast.ops, not here.
"""

def isa() -> str:
    """The SIMD path picked at run time: "avx512", "avx2" or "portable" (capped by NLSR_FAST_ISA)."""

def num_threads() -> int:
    """OpenMP threads the kernels use."""

def extrapolate(
    out: int, out_dtype: int, aligned: int, aligned_dtype: int, base: int, base_dtype: int, n: int, alpha: float
) -> None:
    """out = fp32(1 + alpha) * aligned - fp32(alpha) * base over n elements, fp32 math, one cast."""

def masked_restore(
    out: int, target: int, target_dtype: int, source: int, source_dtype: int, mask: int, rows: int, cols: int
) -> None:
    """out = where(mask, source cast to target's dtype, target); out has target's dtype; bit-exact."""

def masked_delta_cosine(
    t: int, t_dtype: int, e: int, e_dtype: int, base: int, base_dtype: int, mask: int, rows: int, cols: int
) -> tuple[float, float, float]:
    """(sum m*a*b, sum m*a^2, sum m*b^2), a = t - base, b = e - base; base = 0 means no base."""

def lora_masked_cosine(
    a_t: int,
    a_t_dtype: int,
    a_e: int,
    a_e_dtype: int,
    b_t: int,
    b_t_dtype: int,
    b_e: int,
    b_e_dtype: int,
    mask_a: int,
    mask_b: int,
    r: int,
    d_in: int,
    d_out: int,
    e_scale: float,
) -> tuple[float, float, float]:
    """(<W_t, W_e>_F, |W_t|_F^2, |W_e|_F^2) of W_x = (M_B*B_x)(M_A*A_x), the reference's factors times e_scale,
    through r x r Grams."""

def row_topk_mask(
    bits: int,
    weight: int,
    weight_dtype: int,
    col_scale: int,
    grad: int,
    grad_dtype: int,
    rows: int,
    cols: int,
    k: int,
) -> None:
    """PackedMask bits of the k highest (|W| * col_scale[j]) * grad[i, j] of each row; col_scale fp32; 0 = absent."""

def matrix_topk_mask(bits: int, x: int, x_dtype: int, rows: int, cols: int, k: int) -> None:
    """PackedMask bits of the k largest |x| of the whole matrix (ties: lowest flat index first)."""

def random_row_mask(bits: int, rows: int, cols: int, k: int, stream: int) -> None:
    """PackedMask bits of a uniformly random k-subset of each row (Floyd's algorithm keyed by stream and row)."""

def masked_gather(values: int, src: int, elem_bytes: int, mask: int, rows: int, cols: int) -> None:
    """values = the entries of src under the mask, row-major (raw bits)."""

def masked_scatter(dst: int, values: int, elem_bytes: int, mask: int, rows: int, cols: int) -> int:
    """dst's entries under the mask take values (row-major, raw bits); returns how many changed bits."""

def popcount(bytes: int, n: int) -> int:
    """Set bits in n bytes."""

def count_nonfinite(x: int, n: int, x_dtype: int) -> int:
    """Number of NaN / Inf entries of n contiguous fp32 / fp16 / bf16 elements."""
