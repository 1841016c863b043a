#include "nlsr/matrix_topk_mask.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"
#include "nlsr/topk_common.h"

namespace nlsr {
namespace {

// Key of |x|: the bit pattern without its sign, which orders like |x| for every non-NaN value (and -0 == +0);
// NaNs (patterns above +inf's) all become the largest key.
template <class D>
struct AbsKey;
template <>
struct AbsKey<BF16> {
  static constexpr uint32_t kInf = 0x7F80, kNan = 0x7FFF;
  static uint32_t of(uint16_t u) {
    const uint32_t a = u & 0x7FFFu;
    return a > kInf ? kNan : a;
  }
};
template <>
struct AbsKey<F16> {
  static constexpr uint32_t kInf = 0x7C00, kNan = 0x7FFF;
  static uint32_t of(uint16_t u) {
    const uint32_t a = u & 0x7FFFu;
    return a > kInf ? kNan : a;
  }
};
template <>
struct AbsKey<F32> {
  static constexpr uint32_t kInf = 0x7F800000u, kNan = 0x7FFFFFFFu;
  static uint32_t of(float f) {
    const uint32_t a = f32_bits(f) & 0x7FFFFFFFu;
    return a > kInf ? kNan : a;
  }
};

// The matrix is split into `parts` contiguous flat ranges, one per thread, whose boundaries fall on a column that
// is a multiple of 64 (or a row start): no two threads share a mask byte, and vector groups stay byte aligned.
// The same ranges are used by every pass, so per-range tie counts line up with the writing pass.
int64_t part_begin(int64_t rows, int64_t cols, int64_t parts, int64_t t) {
  const int64_t n = rows * cols;
  if (t >= parts) return n;
  const int64_t p = static_cast<int64_t>((static_cast<__int128>(n) * t) / parts);
  const int64_t i = p / cols, j = p % cols;
  return i * cols + j / 64 * 64;
}

// Calls fn(row, j0, j1) for the row pieces of flat range [b, e).
template <class Fn>
void for_segments(int64_t b, int64_t e, int64_t cols, Fn&& fn) {
  while (b < e) {
    const int64_t i = b / cols, j0 = b % cols;
    const int64_t j1 = std::min(cols, j0 + (e - b));
    fn(i, j0, j1);
    b += j1 - j0;
  }
}

// ---- writing pass: bits of keys > T plus the first `quota` keys == T ----

template <class D>
void write_portable(uint8_t* out, const typename D::T* x, int64_t j0, int64_t j1, uint32_t T, int64_t* quota) {
  for (int64_t j = j0; j < j1; j += 8) {
    const int64_t n = std::min<int64_t>(8, j1 - j);
    uint64_t gt = 0, eq = 0;
    for (int64_t l = 0; l < n; ++l) {
      const uint32_t key = AbsKey<D>::of(x[j + l]);
      gt |= uint64_t{key > T} << l;
      eq |= uint64_t{key == T} << l;
    }
    out[j / 8] = static_cast<uint8_t>(take_ties(gt, eq, quota));
  }
}

template <class D>
NLSR_AVX2 void write_avx2(uint8_t* out, const typename D::T* x, int64_t j0, int64_t j1, uint32_t T, int64_t* quota) {
  // Keys are below 2^31 (2^15), so signed compares order them.
  int64_t j = j0;
  if constexpr (D::code == DType::kF32) {
    const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(static_cast<int>(AbsKey<D>::kInf));
    const __m256i t = _mm256_set1_epi32(static_cast<int>(T));
    for (; j + 8 <= j1; j += 8) {
      __m256i key = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), abs);
      key = _mm256_blendv_epi8(key, abs, _mm256_cmpgt_epi32(key, inf));
      const uint64_t gt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, t))));
      const uint64_t eq = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, t))));
      out[j / 8] = static_cast<uint8_t>(take_ties(gt, eq, quota));
    }
  } else {
    const __m256i abs = _mm256_set1_epi16(0x7FFF), inf = _mm256_set1_epi16(static_cast<int16_t>(AbsKey<D>::kInf));
    const __m256i t = _mm256_set1_epi16(static_cast<int16_t>(T));
    for (; j + 16 <= j1; j += 16) {
      __m256i key = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), abs);
      key = _mm256_blendv_epi8(key, abs, _mm256_cmpgt_epi16(key, inf));
      const __m256i g = _mm256_cmpgt_epi16(key, t), q = _mm256_cmpeq_epi16(key, t);
      // 16-bit lane masks -> 8-bit (saturating pack keeps 0 / -1) -> one bit per lane.
      const uint64_t gt = static_cast<uint32_t>(
          _mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1))));
      const uint64_t eq = static_cast<uint32_t>(
          _mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1))));
      store_bits(out + j / 8, take_ties(gt, eq, quota), 2);
    }
  }
  write_portable<D>(out, x, j, j1, T, quota);
}

template <class D>
NLSR_AVX512 void write_avx512(uint8_t* out, const typename D::T* x, int64_t j0, int64_t j1, uint32_t T,
                              int64_t* quota) {
  if constexpr (D::code == DType::kF32) {
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(static_cast<int>(AbsKey<D>::kInf));
    const __m512i t = _mm512_set1_epi32(static_cast<int>(T));
    for (int64_t j = j0; j < j1; j += 16) {
      const int64_t n = std::min<int64_t>(16, j1 - j);
      const __mmask16 v = static_cast<__mmask16>((1u << n) - 1u);
      __m512i key = _mm512_and_si512(_mm512_maskz_loadu_epi32(v, x + j), abs);
      key = _mm512_mask_mov_epi32(key, _mm512_cmpgt_epu32_mask(key, inf), abs);
      const uint64_t gt = _mm512_mask_cmpgt_epu32_mask(v, key, t);
      const uint64_t eq = *quota > 0 ? _mm512_mask_cmpeq_epu32_mask(v, key, t) : 0;
      store_bits(out + j / 8, take_ties(gt, eq, quota), (n + 7) / 8);
    }
  } else {
    const __m512i abs = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(static_cast<int16_t>(AbsKey<D>::kInf));
    const __m512i t = _mm512_set1_epi16(static_cast<int16_t>(T));
    for (int64_t j = j0; j < j1; j += 32) {
      const int64_t n = std::min<int64_t>(32, j1 - j);
      const __mmask32 v = static_cast<__mmask32>((uint64_t{1} << n) - 1u);
      __m512i key = _mm512_and_si512(_mm512_maskz_loadu_epi16(v, x + j), abs);
      key = _mm512_mask_mov_epi16(key, _mm512_cmpgt_epu16_mask(key, inf), abs);
      const uint64_t gt = _mm512_mask_cmpgt_epu16_mask(v, key, t);
      const uint64_t eq = *quota > 0 ? _mm512_mask_cmpeq_epu16_mask(v, key, t) : 0;
      store_bits(out + j / 8, take_ties(gt, eq, quota), (n + 7) / 8);
    }
  }
}

template <class D>
void run(uint8_t* bits, const void* xv, int64_t rows, int64_t cols, int64_t k) {
  using E = typename D::T;
  const auto* x = static_cast<const E*>(xv);
  const int64_t n = rows * cols;
  const int64_t row_bytes = (cols + 7) / 8;
  const Isa isa = best_isa();
  const int parts = threads_for(n);
  // Digit 1: the whole 15-bit key of a 16-bit dtype; the top 16 of the 31-bit key of fp32.
  constexpr bool kTwoLevels = D::code == DType::kF32;
  constexpr int64_t kBins1 = kTwoLevels ? 65536 : 32768;
  constexpr int64_t kBins2 = 32768;
  constexpr int kShift1 = kTwoLevels ? 15 : 0;
  std::vector<uint64_t> h1(static_cast<size_t>(parts * kBins1));
  std::vector<uint64_t> h2(kTwoLevels ? static_cast<size_t>(parts * kBins2) : 0);
  std::vector<uint64_t> total(kBins1);
  std::vector<int64_t> quota(static_cast<size_t>(parts));
  uint32_t b1 = 0, T = 0;
  int64_t need = 0;

#pragma omp parallel num_threads(parts)
  {
#ifdef _OPENMP
    const int th = omp_get_thread_num();
#else
    const int th = 0;
#endif
    // Each thread owns part `th`, in every pass; a smaller team than asked for takes the rest in order.
#ifdef _OPENMP
    const int nt = omp_get_num_threads();
#else
    const int nt = 1;
#endif
    for (int p = th; p < parts; p += nt) {
      uint64_t* h = h1.data() + static_cast<size_t>(p) * kBins1;
      for_segments(part_begin(rows, cols, parts, p), part_begin(rows, cols, parts, p + 1), cols,
                   [&](int64_t i, int64_t j0, int64_t j1) {
                     const E* xi = x + i * cols;
                     for (int64_t j = j0; j < j1; ++j) ++h[AbsKey<D>::of(xi[j]) >> kShift1];
                   });
    }
#pragma omp barrier
#pragma omp single
    {
      for (int p = 0; p < parts; ++p) {
        const uint64_t* h = h1.data() + static_cast<size_t>(p) * kBins1;
        for (int64_t b = 0; b < kBins1; ++b) total[b] += h[b];
      }
      int64_t above;
      b1 = static_cast<uint32_t>(find_bucket(total.data(), kBins1, k, &above));
      need = k - above;
      T = b1;
    }  // implicit barrier
    if constexpr (kTwoLevels) {
      // Digit 2: the low 15 bits of the keys in bucket b1.
      for (int p = th; p < parts; p += nt) {
        uint64_t* h = h2.data() + static_cast<size_t>(p) * kBins2;
        for_segments(part_begin(rows, cols, parts, p), part_begin(rows, cols, parts, p + 1), cols,
                     [&](int64_t i, int64_t j0, int64_t j1) {
                       const E* xi = x + i * cols;
                       for (int64_t j = j0; j < j1; ++j) {
                         const uint32_t key = AbsKey<D>::of(xi[j]);
                         if ((key >> 15) == b1) ++h[key & 0x7FFFu];
                       }
                     });
      }
#pragma omp barrier
#pragma omp single
      {
        std::fill(total.begin(), total.begin() + kBins2, 0);
        for (int p = 0; p < parts; ++p) {
          const uint64_t* h = h2.data() + static_cast<size_t>(p) * kBins2;
          for (int64_t b = 0; b < kBins2; ++b) total[b] += h[b];
        }
        int64_t above;
        const uint32_t b2 = static_cast<uint32_t>(find_bucket(total.data(), kBins2, need, &above));
        need -= above;
        T = (b1 << 15) | b2;
      }
    }
#pragma omp single
    {
      // Keys == T are kept in flat order: part p keeps what is left of `need` after the parts before it.
      const uint64_t* last = kTwoLevels ? h2.data() : h1.data();
      const int64_t bins = kTwoLevels ? kBins2 : kBins1;
      const uint32_t digit = kTwoLevels ? (T & 0x7FFFu) : T;
      int64_t left = need;
      for (int p = 0; p < parts; ++p) {
        const int64_t ties = static_cast<int64_t>(last[static_cast<size_t>(p) * bins + digit]);
        quota[p] = std::min(left, ties);
        left -= quota[p];
      }
    }  // implicit barrier
    for (int p = th; p < parts; p += nt) {
      int64_t q = quota[p];
      for_segments(part_begin(rows, cols, parts, p), part_begin(rows, cols, parts, p + 1), cols,
                   [&](int64_t i, int64_t j0, int64_t j1) {
                     uint8_t* out = bits + i * row_bytes;
                     const E* xi = x + i * cols;
                     if (isa == Isa::kAvx512) write_avx512<D>(out, xi, j0, j1, T, &q);
                     else if (isa == Isa::kAvx2) write_avx2<D>(out, xi, j0, j1, T, &q);
                     else write_portable<D>(out, xi, j0, j1, T, &q);
                   });
    }
  }
}

}  // namespace

void matrix_topk_mask(uint8_t* bits, const void* x, DType x_dtype, int64_t rows, int64_t cols, int64_t k) {
  if (k <= 0 || k >= rows * cols) {
    fill_trivial(bits, rows, cols, k > 0);
    return;
  }
  dispatch_dtype(x_dtype, [&](auto d) { run<decltype(d)>(bits, x, rows, cols, k); });
}

}  // namespace nlsr
