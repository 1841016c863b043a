#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// LoRA-mode similarity sums (docs/algorithm.md §4) of W_x = (M_B*B_x)(M_A*A_x), x in {t, e}, never forming d_out x d_in:
//   sums[0] = <W_t, W_e>_F = sum((B_t'^T B_e') * (A_t' A_e'^T)),  sums[1] = |W_t|_F^2,  sums[2] = |W_e|_F^2,
// where X' is the masked factor. Stacking [A_t'; A_e'] (2r x d_in) and [B_t' | B_e'] (d_out x 2r), one symmetric
// 2r x 2r Gram per side holds every r x r block needed: O(r^2 (d_in + d_out)) work. The Grams are accumulated in
// fp32 over blocks of 256 along d (products of bf16/fp16 values are exact in fp32) and the blocks summed in fp64;
// the final contraction is fp64. NaN/inf in masked entries propagate (as in the reference).
// Preconditions (checked in Python): a_t, a_e hold r x d_in contiguous elements, b_t, b_e d_out x r, each of its
// own dtype; mask_a is a PackedMask buffer (r, ceil(d_in / 8)), mask_b (d_out, ceil(r / 8)); r >= 1.
// e_scale: the reference factors are e_scale * A_e and e_scale * B_e, each product rounded to fp32 as the factor is
// read (the amplification, docs/algorithm.md §2, without an fp32 copy of the reference); 1 for a ready reference.
void lora_masked_cosine(double sums[3], const void* a_t, DType a_t_dtype, const void* a_e, DType a_e_dtype,
                        const void* b_t, DType b_t_dtype, const void* b_e, DType b_e_dtype, const uint8_t* mask_a,
                        const uint8_t* mask_b, int64_t r, int64_t d_in, int64_t d_out, float e_scale);

}  // namespace nlsr
