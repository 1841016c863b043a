#pragma once
// Pieces shared by the top-k mask kernels: radix-select bucket search, tie-aware bit writing, byte stores.
//
// Both kernels select by radix on integer keys that order like the scores, then write the PackedMask bits with
// one compare against the threshold key T: keys > T are kept, and of the keys == T the first `quota` in index
// order (ties broken by lowest index), so every group keeps exactly k entries.
#include <cstdint>
#include <cstring>

namespace nlsr {

// The bucket holding the k-th largest key (1 <= k <= sum of hist), scanning from the top bucket down.
// *above is the number of keys in higher buckets; the caller keeps k - *above keys of the returned bucket.
template <class Count>
inline int64_t find_bucket(const Count* hist, int64_t nbins, int64_t k, int64_t* above) {
  int64_t acc = 0;
  for (int64_t b = nbins - 1; b > 0; --b) {
    const int64_t h = static_cast<int64_t>(hist[b]);
    if (acc + h >= k) {
      *above = acc;
      return b;
    }
    acc += h;
  }
  *above = acc;
  return 0;
}

// Adds to `gt` the lowest set bits of `eq` while *quota lasts (ties at the threshold, lowest index first).
inline uint64_t take_ties(uint64_t gt, uint64_t eq, int64_t* quota) {
  if (*quota <= 0 || eq == 0) return gt;
  const int64_t n = __builtin_popcountll(eq);
  if (n <= *quota) {
    *quota -= n;
    return gt | eq;
  }
  for (int64_t q = *quota; q > 0; --q) {
    gt |= eq & (~eq + 1);
    eq &= eq - 1;
  }
  *quota = 0;
  return gt;
}

// Writes the low nbytes (<= 8) bytes of `bits`, little endian: bit b of the value is entry b of the group.
inline void store_bits(uint8_t* dst, uint64_t bits, int64_t nbytes) {
  // Fixed-size copies for the common full groups (a variable-size memcpy is a library call).
  if (nbytes == 2) {
    const uint16_t v = static_cast<uint16_t>(bits);
    std::memcpy(dst, &v, 2);
  } else if (nbytes == 4) {
    const uint32_t v = static_cast<uint32_t>(bits);
    std::memcpy(dst, &v, 4);
  } else {
    for (int64_t i = 0; i < nbytes; ++i) dst[i] = static_cast<uint8_t>(bits >> (8 * i));
  }
}

// Mask bytes of a row of `cols` entries that keeps everything: 0xFF, then the partial byte, padding bits 0.
inline void fill_all_kept(uint8_t* row, int64_t cols) {
  std::memset(row, 0xFF, static_cast<size_t>(cols / 8));
  if (cols % 8) row[cols / 8] = static_cast<uint8_t>((1u << (cols % 8)) - 1u);
}

// A mask that keeps nothing (keep_all false) or everything: the answer when there is nothing to rank or draw.
inline void fill_trivial(uint8_t* bits, int64_t rows, int64_t cols, bool keep_all) {
  const int64_t row_bytes = (cols + 7) / 8;
  if (!keep_all) {
    std::memset(bits, 0, static_cast<size_t>(rows * row_bytes));
    return;
  }
  for (int64_t i = 0; i < rows; ++i) fill_all_kept(bits + i * row_bytes, cols);
}

}  // namespace nlsr
