#include "nlsr/random_row_mask.h"

#include <cstdint>
#include <cstring>

#include "nlsr/parallel.h"
#include "nlsr/topk_common.h"

namespace nlsr {
namespace {

// The "lowbias32" integer hash (Chris Wellons, https://nullprogram.com/blog/2018/07/31/).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

constexpr uint32_t kStep = 0x9E3779B9U;  // 2**32 / golden ratio: consecutive steps hash far-apart inputs

// Floyd's algorithm on one zeroed row: step t draws r uniform-ish in [0, j] with j = cols - k + t, and keeps j
// instead when r is already kept (j itself cannot be: steps before t only reach entries <= j - 1).
inline void sample_row(uint8_t* row, int64_t cols, int64_t k, uint32_t key) {
  const int64_t first = cols - k;
  for (int64_t t = 0; t < k; ++t) {
    const uint64_t j = static_cast<uint64_t>(first + t);
    const uint32_t h = mix32(key + static_cast<uint32_t>(t) * kStep);
    uint64_t r = (static_cast<uint64_t>(h) * (j + 1)) >> 32;
    const uint8_t bit = static_cast<uint8_t>(1U << (r & 7));
    if (row[r >> 3] & bit) r = j;
    row[r >> 3] |= static_cast<uint8_t>(1U << (r & 7));
  }
}

}  // namespace

void random_row_mask(uint8_t* bits, int64_t rows, int64_t cols, int64_t k, uint32_t stream) {
  const int64_t row_bytes = (cols + 7) / 8;
  if (rows <= 0 || row_bytes == 0) return;  // an empty mask: no byte to write
  if (k <= 0 || k >= cols) {  // nothing to draw: Floyd's algorithm keeps no entry, or every entry
    fill_trivial(bits, rows, cols, k > 0);
    return;
  }
  // Rows are independent and each writes only its own bytes, so any split over threads gives the same bits.
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * (k + row_bytes)))
  for (int64_t i = 0; i < rows; ++i) {
    uint8_t* row = bits + i * row_bytes;
    std::memset(row, 0, static_cast<size_t>(row_bytes));
    sample_row(row, cols, k, mix32(stream ^ mix32(static_cast<uint32_t>(i))));
  }
}

}  // namespace nlsr
