#include "nlsr/row_topk_mask.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"
#include "nlsr/topk_common.h"

namespace nlsr {
namespace {

// Order-preserving key of an fp32 score: a > b <=> key(a) > key(b). Positive floats get the sign bit set, negative
// ones are complemented; -0 is first turned into +0 (x + 0.0f), and every NaN maps to the top key.
inline uint32_t score_key(float s) {
  s += 0.0f;
  const uint32_t u = f32_bits(s);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

template <class Dw, class Dg, bool kScale, bool kGrad>
inline float score(const typename Dw::T* w, const float* cs, const typename Dg::T* g, int64_t j) {
  float s = std::fabs(Dw::load(w + j));
  if constexpr (kScale) s = s * cs[j];
  if constexpr (kGrad) s = s * Dg::load(g + j);
  return s;
}

// ---- keys of one row ----

template <class Dw, class Dg, bool kScale, bool kGrad>
void keys_portable(uint32_t* key, const typename Dw::T* w, const float* cs, const typename Dg::T* g, int64_t begin,
                   int64_t cols) {
  for (int64_t j = begin; j < cols; ++j) key[j] = score_key(score<Dw, Dg, kScale, kGrad>(w, cs, g, j));
}

template <class Dw, class Dg, bool kScale, bool kGrad>
NLSR_AVX2 void keys_avx2(uint32_t* key, const typename Dw::T* w, const float* cs, const typename Dg::T* g,
                         int64_t cols) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    __m256 s = _mm256_and_ps(avx2::load<Dw>(w + j), abs_mask);
    if constexpr (kScale) s = _mm256_mul_ps(s, _mm256_loadu_ps(cs + j));
    if constexpr (kGrad) s = _mm256_mul_ps(s, avx2::load<Dg>(g + j));
    s = _mm256_add_ps(s, _mm256_setzero_ps());
    const __m256i u = _mm256_castps_si256(s);
    __m256i kv = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), top));
    kv = _mm256_or_si256(kv, _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(key + j), kv);
  }
  keys_portable<Dw, Dg, kScale, kGrad>(key, w, cs, g, j, cols);
}

template <class Dw, class Dg, bool kScale, bool kGrad>
NLSR_AVX512 void keys_avx512(uint32_t* key, const typename Dw::T* w, const float* cs, const typename Dg::T* g,
                             int64_t cols) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 v = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1u);
    __m512 s = _mm512_abs_ps(avx512::maskz_load<Dw>(v, w + j));
    if constexpr (kScale) s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(v, cs + j));
    if constexpr (kGrad) s = _mm512_mul_ps(s, avx512::maskz_load<Dg>(v, g + j));
    s = _mm512_add_ps(s, _mm512_setzero_ps());
    const __m512i u = _mm512_castps_si512(s);
    __m512i kv = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), top));
    kv = _mm512_mask_mov_epi32(kv, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
    _mm512_mask_storeu_epi32(key + j, v, kv);
  }
}

// ---- bits of one row: keys > T, plus the first `quota` keys == T ----

void write_portable(uint8_t* out, const uint32_t* key, int64_t begin, int64_t cols, uint32_t T, int64_t quota) {
  for (int64_t j = begin; j < cols; j += 8) {
    const int64_t n = std::min<int64_t>(8, cols - j);
    uint64_t gt = 0, eq = 0;
    for (int64_t l = 0; l < n; ++l) {
      gt |= uint64_t{key[j + l] > T} << l;
      eq |= uint64_t{key[j + l] == T} << l;
    }
    out[j / 8] = static_cast<uint8_t>(take_ties(gt, eq, &quota));
  }
}

NLSR_AVX2 void write_avx2(uint8_t* out, const uint32_t* key, int64_t cols, uint32_t T, int64_t quota) {
  // Unsigned compare as signed compare of both sides with the top bit flipped.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i t = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(T)), flip);
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j)), flip);
    const uint64_t gt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(x, t))));
    uint64_t eq = 0;
    if (quota > 0) eq = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, t))));
    out[j / 8] = static_cast<uint8_t>(take_ties(gt, eq, &quota));
  }
  write_portable(out, key, j, cols, T, quota);
}

NLSR_AVX512 void write_avx512(uint8_t* out, const uint32_t* key, int64_t cols, uint32_t T, int64_t quota) {
  const __m512i t = _mm512_set1_epi32(static_cast<int>(T));
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t n = std::min<int64_t>(16, cols - j);
    const __mmask16 v = static_cast<__mmask16>((1u << n) - 1u);
    const __m512i x = _mm512_maskz_loadu_epi32(v, key + j);
    const uint64_t gt = _mm512_mask_cmpgt_epu32_mask(v, x, t);
    uint64_t eq = 0;
    if (quota > 0) eq = _mm512_mask_cmpeq_epu32_mask(v, x, t);
    store_bits(out + j / 8, take_ties(gt, eq, &quota), (n + 7) / 8);
  }
}

// ---- selection ----

// Keys of key[0, n) with (key >> shift) == value, in order, to cand; returns how many.
int64_t compact_portable(uint32_t* cand, const uint32_t* key, int64_t n, int shift, uint32_t value) {
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[c] = key[j];  // branch-free: written always, kept only when it matches
    c += (key[j] >> shift) == value;
  }
  return c;
}

// Needs 16 slots of slack past the result in cand (full-vector stores).
NLSR_AVX512 int64_t compact_avx512(uint32_t* cand, const uint32_t* key, int64_t n, int shift, uint32_t value) {
  const __m512i v = _mm512_set1_epi32(static_cast<int>(value));
  int64_t c = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    const __m512i x = _mm512_maskz_loadu_epi32(valid, key + j);
    const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(valid, _mm512_srli_epi32(x, shift), v);
    _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi32(hit, x));
    c += __builtin_popcount(hit);
  }
  return c;
}

// Scratch of one thread, reused across its rows.
struct Scratch {
  std::vector<uint32_t> key, cand, hist;
  explicit Scratch(int64_t cols)
      : key(static_cast<size_t>(cols)), cand(static_cast<size_t>(cols) + 16), hist(4 * 2048) {}
};

// Few candidates left: a plain selection on them. Sets T to the need-th largest and quota to how many of the
// keys == T are kept.
void select_small(uint32_t* cand, int64_t c, int64_t need, uint32_t* T, int64_t* quota) {
  std::nth_element(cand, cand + (need - 1), cand + c, std::greater<uint32_t>());
  const uint32_t t = cand[need - 1];
  int64_t greater = 0;
  for (int64_t i = 0; i < c; ++i) greater += cand[i] > t;
  *T = t;
  *quota = need - greater;
}

constexpr int64_t kSmall = 64;

// Threshold key T of a row (the k-th largest key, 1 <= k < cols) and how many keys == T to keep: radix select
// on digits of 11, 11 and 10 bits, narrowing the row to the keys that share the digits found so far.
void select_threshold(const uint32_t* key, int64_t cols, int64_t k, Isa isa, Scratch& s, uint32_t* T,
                      int64_t* quota) {
  auto compact = [&](uint32_t* dst, const uint32_t* src, int64_t n, int shift, uint32_t value) {
    return isa == Isa::kAvx512 ? compact_avx512(dst, src, n, shift, value)
                               : compact_portable(dst, src, n, shift, value);
  };
  uint32_t* h = s.hist.data();
  // Digit 1, the top 11 bits (sign, exponent, 2 mantissa bits), over the whole row. Four interleaved histograms:
  // scores cluster in few buckets, and consecutive increments of one counter would serialise on memory.
  std::memset(h, 0, 4 * 2048 * sizeof(uint32_t));
  int64_t j = 0;
  for (; j + 4 <= cols; j += 4) {
    ++h[key[j] >> 21];
    ++h[2048 + (key[j + 1] >> 21)];
    ++h[4096 + (key[j + 2] >> 21)];
    ++h[6144 + (key[j + 3] >> 21)];
  }
  for (; j < cols; ++j) ++h[key[j] >> 21];
  for (int64_t b = 0; b < 2048; ++b) h[b] += h[2048 + b] + h[4096 + b] + h[6144 + b];
  int64_t above;
  const uint32_t b1 = static_cast<uint32_t>(find_bucket(h, 2048, k, &above));
  int64_t need = k - above;
  uint32_t* cand = s.cand.data();
  int64_t c = compact(cand, key, cols, 21, b1);
  if (c <= kSmall) return select_small(cand, c, need, T, quota);
  // Digit 2: bits 20..10 of the candidates.
  std::memset(h, 0, 2048 * sizeof(uint32_t));
  for (int64_t i = 0; i < c; ++i) ++h[(cand[i] >> 10) & 0x7FFu];
  const uint32_t b2 = static_cast<uint32_t>(find_bucket(h, 2048, need, &above));
  need -= above;
  const uint32_t prefix = (b1 << 11) | b2;
  c = compact(cand, cand, c, 10, prefix);  // in place: the write index never passes the read index
  if (c <= kSmall) return select_small(cand, c, need, T, quota);
  // Digit 3: bits 9..0 (many equal keys, e.g. a constant row).
  std::memset(h, 0, 1024 * sizeof(uint32_t));
  for (int64_t i = 0; i < c; ++i) ++h[cand[i] & 0x3FFu];
  const uint32_t b3 = static_cast<uint32_t>(find_bucket(h, 1024, need, &above));
  *T = (prefix << 10) | b3;
  *quota = need - above;
}

template <class Dw, class Dg, bool kScale, bool kGrad>
void run(uint8_t* bits, const void* weight, const float* cs, const void* grad, int64_t rows, int64_t cols,
         int64_t k) {
  const auto* w = static_cast<const typename Dw::T*>(weight);
  const auto* g = static_cast<const typename Dg::T*>(grad);
  const int64_t row_bytes = (cols + 7) / 8;
  const Isa isa = best_isa();
#pragma omp parallel num_threads(threads_for(rows * cols))
  {
    Scratch s(cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const auto* wi = w + i * cols;
      const auto* gi = kGrad ? g + i * cols : g;
      uint32_t* key = s.key.data();
      if (isa == Isa::kAvx512) keys_avx512<Dw, Dg, kScale, kGrad>(key, wi, cs, gi, cols);
      else if (isa == Isa::kAvx2) keys_avx2<Dw, Dg, kScale, kGrad>(key, wi, cs, gi, cols);
      else keys_portable<Dw, Dg, kScale, kGrad>(key, wi, cs, gi, 0, cols);
      uint32_t T;
      int64_t quota;
      select_threshold(key, cols, k, isa, s, &T, &quota);
      uint8_t* out = bits + i * row_bytes;
      if (isa == Isa::kAvx512) write_avx512(out, key, cols, T, quota);
      else if (isa == Isa::kAvx2) write_avx2(out, key, cols, T, quota);
      else write_portable(out, key, 0, cols, T, quota);
    }
  }
}

}  // namespace

void row_topk_mask(uint8_t* bits, const void* weight, DType weight_dtype, const float* col_scale, const void* grad,
                   DType grad_dtype, int64_t rows, int64_t cols, int64_t k) {
  if (k <= 0 || k >= cols) {  // nothing to select: every row keeps nothing or everything
    fill_trivial(bits, rows, cols, k > 0);
    return;
  }
  dispatch_dtype(weight_dtype, [&](auto wd) {
    using Dw = decltype(wd);
    auto with_scale = [&](auto dg, auto has_grad) {
      using Dg = decltype(dg);
      constexpr bool kGrad = decltype(has_grad)::value;
      if (col_scale != nullptr) run<Dw, Dg, true, kGrad>(bits, weight, col_scale, grad, rows, cols, k);
      else run<Dw, Dg, false, kGrad>(bits, weight, col_scale, grad, rows, cols, k);
    };
    if (grad == nullptr) with_scale(F32{}, std::false_type{});
    else dispatch_dtype(grad_dtype, [&](auto gd) { with_scale(gd, std::true_type{}); });
  });
}

}  // namespace nlsr
