#pragma once
#include <cstdint>

namespace nlsr {

// A uniformly random k-subset of every row (docs/algorithm.md §3 `random`), drawn by Floyd's algorithm from a counter-based
// hash, so the bits depend only on (stream, row index, rows' length, k): not on the thread count, the rows asked
// for alongside, or the order of calls. All arithmetic is on uint32, wrapping (the algorithm, bit for bit, is
// the reference in nlsr_fast/ops/random_row_mask.py):
//   mix32(x): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
//   key = mix32(stream ^ mix32(i)) for row i; for t = 0 .. k-1: j = cols - k + t,
//   h = mix32(key + t * 0x9E3779B9), r = (uint64(h) * (j + 1)) >> 32; set entry j if entry r is set, else r.
// Writes every byte of bits, padding bits 0.
// Preconditions (checked in Python): bits is (rows, ceil(cols / 8)) uint8 contiguous; rows <= 2**32;
// cols < 2**32; 0 <= k <= cols.
void random_row_mask(uint8_t* bits, int64_t rows, int64_t cols, int64_t k, uint32_t stream);

}  // namespace nlsr
