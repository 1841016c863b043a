#include "nlsr/masked_delta_cosine.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"

namespace nlsr {
namespace {

// Every segment is `len` elements whose mask bits start at bit 0 of `m`; it adds its three sums to acc.

template <class Dt, class De, class Db, bool kBase>
void seg_portable(const typename Dt::T* t, const typename De::T* e, const typename Db::T* b, const uint8_t* m,
                  int64_t len, double acc[3]) {
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t j = 0; j < len; ++j) {
    if (!((m[j >> 3] >> (j & 7)) & 1)) continue;
    float x = Dt::load(t + j);
    float y = De::load(e + j);
    if constexpr (kBase) {
      const float z = Db::load(b + j);
      x -= z;
      y -= z;
    }
    const double dx = x, dy = y;
    s0 += dx * dy;
    s1 += dx * dx;
    s2 += dy * dy;
  }
  acc[0] += s0;
  acc[1] += s1;
  acc[2] += s2;
}

// The vector paths multiply and add in fp32 for a block of kBlock elements per lane group, then add the block's
// sums to fp64 accumulators: fp64 throughout would make the op compute-bound (four conversions and six fp64 FMAs
// per 16 elements) instead of memory-bound, for no accuracy that matters here (a block sum adds at most
// kBlock / lanes fp32 roundings).
constexpr int64_t kBlock = 256;

template <class Dt, class De, class Db, bool kBase>
NLSR_AVX2 void seg_avx2(const typename Dt::T* t, const typename De::T* e, const typename Db::T* b, const uint8_t* m,
                        int64_t len, double acc[3]) {
  __m256d sum[3] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t j = 0;
  while (j + 8 <= len) {
    const int64_t end = std::min(len, j + kBlock) / 8 * 8;
    __m256 f[2][3];  // two independent sets of (dot, |a|^2, |b|^2), to hide FMA latency
    for (int u = 0; u < 2; ++u) f[u][0] = f[u][1] = f[u][2] = _mm256_setzero_ps();
    for (int u = 0; j < end; j += 8, u ^= 1) {
      const uint32_t byte = m[j / 8];
      if (byte == 0) continue;
      const __m256 sel = _mm256_castsi256_ps(avx2::lanes_from_bits(byte));
      __m256 x = avx2::load<Dt>(t + j);
      __m256 y = avx2::load<De>(e + j);
      if constexpr (kBase) {
        const __m256 z = avx2::load<Db>(b + j);
        x = _mm256_sub_ps(x, z);
        y = _mm256_sub_ps(y, z);
      }
      // Masked-off lanes become +0 (and so do their NaNs: the and clears every bit).
      x = _mm256_and_ps(x, sel);
      y = _mm256_and_ps(y, sel);
      f[u][0] = _mm256_fmadd_ps(x, y, f[u][0]);
      f[u][1] = _mm256_fmadd_ps(x, x, f[u][1]);
      f[u][2] = _mm256_fmadd_ps(y, y, f[u][2]);
    }
    for (int q = 0; q < 3; ++q) {
      for (int u = 0; u < 2; ++u) {
        sum[q] = _mm256_add_pd(sum[q], _mm256_cvtps_pd(_mm256_castps256_ps128(f[u][q])));
        sum[q] = _mm256_add_pd(sum[q], _mm256_cvtps_pd(_mm256_extractf128_ps(f[u][q], 1)));
      }
    }
  }
  alignas(32) double lanes[4];
  for (int q = 0; q < 3; ++q) {
    _mm256_store_pd(lanes, sum[q]);
    acc[q] += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
  seg_portable<Dt, De, Db, kBase>(t + j, e + j, b + j, m + j / 8, len - j, acc);
}

template <class Dt, class De, class Db, bool kBase>
NLSR_AVX512 void seg_avx512(const typename Dt::T* t, const typename De::T* e, const typename Db::T* b,
                            const uint8_t* m, int64_t len, double acc[3]) {
  __m512d sum[3] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  for (int64_t j = 0; j < len;) {
    const int64_t end = std::min(len, j + kBlock);
    __m512 f[2][3];  // two independent sets of (dot, |a|^2, |b|^2), to hide FMA latency
    for (int u = 0; u < 2; ++u) f[u][0] = f[u][1] = f[u][2] = _mm512_setzero_ps();
    for (int u = 0; j < end; j += 16, u ^= 1) {
      const int64_t rem = end - j;
      const __mmask16 k = rem >= 16 ? static_cast<__mmask16>(load_bits(m + j / 8, 2))
                                    : static_cast<__mmask16>(load_bits(m + j / 8, (rem + 7) / 8) & ((1u << rem) - 1u));
      if (k == 0) continue;
      // Masked loads: lanes outside the mask read as 0 and are never fetched, so the tail needs no special case.
      __m512 x = avx512::maskz_load<Dt>(k, t + j);
      __m512 y = avx512::maskz_load<De>(k, e + j);
      if constexpr (kBase) {
        const __m512 z = avx512::maskz_load<Db>(k, b + j);
        x = _mm512_sub_ps(x, z);
        y = _mm512_sub_ps(y, z);
      }
      f[u][0] = _mm512_fmadd_ps(x, y, f[u][0]);
      f[u][1] = _mm512_fmadd_ps(x, x, f[u][1]);
      f[u][2] = _mm512_fmadd_ps(y, y, f[u][2]);
    }
    for (int q = 0; q < 3; ++q) {
      for (int u = 0; u < 2; ++u) {
        sum[q] = _mm512_add_pd(sum[q], avx512::lo_pd(f[u][q]));
        sum[q] = _mm512_add_pd(sum[q], avx512::hi_pd(f[u][q]));
      }
    }
  }
  for (int q = 0; q < 3; ++q) acc[q] += _mm512_reduce_add_pd(sum[q]);
}

template <class Dt, class De, class Db, bool kBase>
void segment(const typename Dt::T* t, const typename De::T* e, const typename Db::T* b, const uint8_t* m, int64_t len,
             Isa isa, double acc[3]) {
  if (isa == Isa::kAvx512) seg_avx512<Dt, De, Db, kBase>(t, e, b, m, len, acc);
  else if (isa == Isa::kAvx2) seg_avx2<Dt, De, Db, kBase>(t, e, b, m, len, acc);
  else seg_portable<Dt, De, Db, kBase>(t, e, b, m, len, acc);
}

template <class Dt, class De, class Db, bool kBase>
void run(double sums[3], const void* tv, const void* ev, const void* bv, const uint8_t* mask, int64_t rows,
         int64_t cols) {
  const auto* t = static_cast<const typename Dt::T*>(tv);
  const auto* e = static_cast<const typename De::T*>(ev);
  const auto* b = static_cast<const typename Db::T*>(bv);
  const Isa isa = best_isa();
  const MaskedChunks chunks(rows, cols);
  // One partial per chunk, added in chunk order: the result does not depend on the schedule or the thread count.
  std::vector<double> part(static_cast<size_t>(chunks.count) * 3, 0.0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(rows * cols))
  for (int64_t c = 0; c < chunks.count; ++c) {
    double* acc = part.data() + c * 3;
    chunks.segments(c, [&](int64_t off, int64_t mask_off, int64_t len) {
      segment<Dt, De, Db, kBase>(t + off, e + off, kBase ? b + off : b, mask + mask_off, len, isa, acc);
    });
  }
  sums[0] = sums[1] = sums[2] = 0.0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int q = 0; q < 3; ++q) sums[q] += part[static_cast<size_t>(c * 3 + q)];
  }
}

}  // namespace

void masked_delta_cosine(double sums[3], const void* t, DType t_dtype, const void* e, DType e_dtype, const void* base,
                         DType base_dtype, const uint8_t* mask, int64_t rows, int64_t cols) {
  dispatch_dtype(t_dtype, [&](auto td) {
    dispatch_dtype(e_dtype, [&](auto ed) {
      using Dt = decltype(td);
      using De = decltype(ed);
      if (base == nullptr) {
        run<Dt, De, F32, false>(sums, t, e, nullptr, mask, rows, cols);
      } else {
        dispatch_dtype(base_dtype, [&](auto bd) { run<Dt, De, decltype(bd), true>(sums, t, e, base, mask, rows, cols); });
      }
    });
  });
}

}  // namespace nlsr
