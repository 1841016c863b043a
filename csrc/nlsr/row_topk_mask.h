#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// Per-row top-k mask of the fused score s[i, j] = (|W[i, j]| * col_scale[j]) * grad[i, j] (docs/algorithm.md §3: wanda, snip,
// magnitude), computed in fp32 in that order, one row at a time into a thread-local buffer (no score matrix).
// Each row keeps exactly k entries: every score above the row's k-th largest, then the entries equal to it in
// increasing column order (ties broken by lowest column index). Selection is a radix select on order-preserving
// uint32 keys (O(cols) per row, no sort). Ordering of special values: -0 == +0; NaN scores count as larger than
// every number, +inf included (torch.topk's order), and all NaNs tie with each other.
// Writes every byte of bits, padding bits 0.
// Preconditions (checked in Python): weight and grad (nullptr: none, grad_dtype ignored) hold rows x cols contiguous
// elements of their dtypes; col_scale (nullptr: none) holds cols contiguous fp32; bits is (rows, ceil(cols / 8))
// uint8 contiguous; 0 <= k <= cols.
void row_topk_mask(uint8_t* bits, const void* weight, DType weight_dtype, const float* col_scale, const void* grad,
                   DType grad_dtype, int64_t rows, int64_t cols, int64_t k);

}  // namespace nlsr
