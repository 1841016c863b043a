#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// Top-k mask of |x| over the whole matrix (docs/algorithm.md §3, low_rank): exactly k entries are kept, every |x| above the k-th
// largest, then the entries equal to it in increasing flat (row-major) index (ties broken by lowest index).
// Selection is a radix select on the bit pattern of |x| with one histogram per thread, no sort: bf16/fp16 take one
// histogram pass (15-bit keys) and fp32 two (16 + 15 bits), then one pass writes the bits. Ordering of special
// values: -0 == +0; NaN counts as larger than every number, +inf included (torch.topk's order), and all NaNs tie.
// Writes every byte of bits, padding bits 0.
// Preconditions (checked in Python): x holds rows x cols contiguous elements of x_dtype (a 1-D tensor is one row);
// bits is (rows, ceil(cols / 8)) uint8 contiguous; 0 <= k <= rows * cols.
void matrix_topk_mask(uint8_t* bits, const void* x, DType x_dtype, int64_t rows, int64_t cols, int64_t k);

}  // namespace nlsr
