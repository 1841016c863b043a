#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// The three sums of the dense-mode similarity (docs/algorithm.md §4) over the masked entries, a = t - base, b = e - base:
//   sums[0] = sum m*a*b,  sums[1] = sum m*a^2,  sums[2] = sum m*b^2.
// a and b are computed in fp32 (exact for bf16/fp16 inputs of close magnitude). The SIMD paths multiply and add in
// fp32 within blocks of 256 elements (at most 16 products per lane) and add the block sums in fp64 (the portable
// path is fp64 throughout): relative error ~1e-7, far below what a cosine used for ranking needs.
// NaN/inf inputs in masked entries propagate into the sums (as in the reference); unmasked entries never reach the
// arithmetic. Partial sums are kept per fixed chunk and added in order, so the result is reproducible and does not
// depend on the thread count.
// Preconditions (checked in Python): t, e and base (nullptr: no base) hold rows x cols contiguous elements of their
// dtypes; mask is a PackedMask buffer (rows, ceil(cols / 8)) uint8.
void masked_delta_cosine(double sums[3], const void* t, DType t_dtype, const void* e, DType e_dtype, const void* base,
                         DType base_dtype, const uint8_t* mask, int64_t rows, int64_t cols);

}  // namespace nlsr
