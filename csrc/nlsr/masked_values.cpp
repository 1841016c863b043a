#include "nlsr/masked_values.h"

#include <vector>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"

namespace nlsr {
namespace {

// Up to 8 mask bytes starting at m (fewer at the end of a row), as one little-endian word.
inline uint64_t mask_word(const uint8_t* m, int64_t nbytes) { return load_bits(m, nbytes < 8 ? nbytes : 8); }

// Set bits before each row: rows are independent, so each thread can start at its row's first value.
std::vector<int64_t> row_starts(const uint8_t* mask, int64_t rows, int64_t row_bytes) {
  std::vector<int64_t> start(static_cast<size_t>(rows) + 1, 0);
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * row_bytes * 8))
  for (int64_t i = 0; i < rows; ++i) start[static_cast<size_t>(i) + 1] = popcount(mask + i * row_bytes, row_bytes);
  for (int64_t i = 0; i < rows; ++i) start[static_cast<size_t>(i) + 1] += start[static_cast<size_t>(i)];
  return start;
}

template <class E>
void gather(E* values, const E* src, const uint8_t* mask, int64_t rows, int64_t cols) {
  const int64_t row_bytes = (cols + 7) / 8;
  const std::vector<int64_t> start = row_starts(mask, rows, row_bytes);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_for(rows * cols))
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* m = mask + i * row_bytes;
    const E* s = src + i * cols;
    E* v = values + start[static_cast<size_t>(i)];
    for (int64_t b = 0; b < row_bytes; b += 8) {
      for (uint64_t w = mask_word(m + b, row_bytes - b); w; w &= w - 1) *v++ = s[b * 8 + __builtin_ctzll(w)];
    }
  }
}

template <class E>
int64_t scatter(E* dst, const E* values, const uint8_t* mask, int64_t rows, int64_t cols) {
  const int64_t row_bytes = (cols + 7) / 8;
  const std::vector<int64_t> start = row_starts(mask, rows, row_bytes);
  int64_t changed = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : changed) num_threads(threads_for(rows * cols))
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* m = mask + i * row_bytes;
    E* d = dst + i * cols;
    const E* v = values + start[static_cast<size_t>(i)];
    for (int64_t b = 0; b < row_bytes; b += 8) {
      for (uint64_t w = mask_word(m + b, row_bytes - b); w; w &= w - 1) {
        E& slot = d[b * 8 + __builtin_ctzll(w)];
        changed += slot != *v;
        slot = *v++;
      }
    }
  }
  return changed;  // an integer sum: the same for any thread count
}

}  // namespace

namespace {

__attribute__((always_inline)) inline int64_t popcount_words(const uint8_t* bytes, int64_t n) {
  int64_t total = 0;
  for (int64_t b = 0; b < n; b += 8) total += __builtin_popcountll(mask_word(bytes + b, n - b));
  return total;
}

// Without -march the builtin is a libgcc call, several times slower than the POPCNT instruction that every CPU
// with AVX2 has; the same count either way.
NLSR_AVX2 int64_t popcount_hw(const uint8_t* bytes, int64_t n) { return popcount_words(bytes, n); }

}  // namespace

int64_t popcount(const uint8_t* bytes, int64_t n) {
  static const bool hw = best_isa() != Isa::kPortable;
  return hw ? popcount_hw(bytes, n) : popcount_words(bytes, n);
}

void masked_gather(void* values, const void* src, int64_t elem_bytes, const uint8_t* mask, int64_t rows,
                   int64_t cols) {
  switch (elem_bytes) {
    case 2: return gather(static_cast<uint16_t*>(values), static_cast<const uint16_t*>(src), mask, rows, cols);
    case 4: return gather(static_cast<uint32_t*>(values), static_cast<const uint32_t*>(src), mask, rows, cols);
    default: return gather(static_cast<uint64_t*>(values), static_cast<const uint64_t*>(src), mask, rows, cols);
  }
}

int64_t masked_scatter(void* dst, const void* values, int64_t elem_bytes, const uint8_t* mask, int64_t rows,
                       int64_t cols) {
  switch (elem_bytes) {
    case 2: return scatter(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(values), mask, rows, cols);
    case 4: return scatter(static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(values), mask, rows, cols);
    default: return scatter(static_cast<uint64_t*>(dst), static_cast<const uint64_t*>(values), mask, rows, cols);
  }
}

}  // namespace nlsr
