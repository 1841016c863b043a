#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// Dense safety pre-amplification (docs/algorithm.md §2): out[i] = c1 * aligned[i] - c0 * base[i] with c1 = fp32(1 + alpha),
// c0 = fp32(alpha); the two products and the difference are each rounded in fp32 (no fused multiply-add: this
// core is built with -ffp-contract=off and the vector paths use separate mul/sub), then cast once to out's dtype
// with round to nearest even. So the result is bit-identical to extrapolate_reference, NaN/inf included (NaN
// payloads aside).
// Preconditions (checked in Python): the three buffers hold n contiguous elements of their dtypes; out may be
// aligned or base itself (same index), no other overlap.
void extrapolate(void* out, DType out_dtype, const void* aligned, DType aligned_dtype, const void* base,
                 DType base_dtype, int64_t n, double alpha);

}  // namespace nlsr
