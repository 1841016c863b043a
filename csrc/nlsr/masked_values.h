#pragma once
#include <cstdint>

namespace nlsr {

// The entries of a rows x cols matrix under a PackedMask, in row-major order (restoration's values, stashed
// between the two passes of the executor). Elements are moved as raw bits of `elem_bytes` (2, 4 or 8) bytes, so
// every dtype of that size is handled and nothing is rounded.
// Preconditions (checked in Python): src / dst hold rows x cols contiguous elements; mask is a PackedMask buffer
// (rows, ceil(cols / 8)) uint8 with zero padding bits; values holds exactly popcount(mask) elements.

// Set bits in n bytes (a PackedMask's count: its padding bits are 0).
int64_t popcount(const uint8_t* bytes, int64_t n);

// values[k] = src[i, j] for the k-th set bit (i, j) in row-major order.
void masked_gather(void* values, const void* src, int64_t elem_bytes, const uint8_t* mask, int64_t rows,
                   int64_t cols);

// dst[i, j] = values[k] for the k-th set bit (i, j); returns how many of those entries changed bits.
int64_t masked_scatter(void* dst, const void* values, int64_t elem_bytes, const uint8_t* mask, int64_t rows,
                       int64_t cols);

}  // namespace nlsr
