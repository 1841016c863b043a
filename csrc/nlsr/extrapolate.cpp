#include "nlsr/extrapolate.h"

#include <algorithm>
#include <cstdint>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"

namespace nlsr {
namespace {

template <class Do, class Da, class Db>
void run_portable(typename Do::T* o, const typename Da::T* a, const typename Db::T* b, int64_t n, float c1,
                  float c0) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = c1 * Da::load(a + i);
    const float y = c0 * Db::load(b + i);
    o[i] = Do::from_f32(x - y);
  }
}

template <class Do, class Da, class Db, bool kStream>
NLSR_AVX2 void run_avx2(typename Do::T* o, const typename Da::T* a, const typename Db::T* b, int64_t n, float c1,
                        float c0) {
  const __m256 v1 = _mm256_set1_ps(c1);
  const __m256 v0 = _mm256_set1_ps(c0);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_mul_ps(v1, avx2::load<Da>(a + i));
    const __m256 x1 = _mm256_mul_ps(v1, avx2::load<Da>(a + i + 8));
    const __m256 y0 = _mm256_mul_ps(v0, avx2::load<Db>(b + i));
    const __m256 y1 = _mm256_mul_ps(v0, avx2::load<Db>(b + i + 8));
    avx2::store<Do, kStream>(o + i, _mm256_sub_ps(x0, y0));
    avx2::store<Do, kStream>(o + i + 8, _mm256_sub_ps(x1, y1));
  }
  run_portable<Do, Da, Db>(o + i, a + i, b + i, n - i, c1, c0);
}

template <class Do, class Da, class Db, bool kStream>
NLSR_AVX512 void run_avx512(typename Do::T* o, const typename Da::T* a, const typename Db::T* b, int64_t n,
                            float c1, float c0) {
  const __m512 v1 = _mm512_set1_ps(c1);
  const __m512 v0 = _mm512_set1_ps(c0);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_mul_ps(v1, avx512::load<Da>(a + i));
    const __m512 x1 = _mm512_mul_ps(v1, avx512::load<Da>(a + i + 16));
    const __m512 y0 = _mm512_mul_ps(v0, avx512::load<Db>(b + i));
    const __m512 y1 = _mm512_mul_ps(v0, avx512::load<Db>(b + i + 16));
    avx512::store<Do, kStream>(o + i, _mm512_sub_ps(x0, y0));
    avx512::store<Do, kStream>(o + i + 16, _mm512_sub_ps(x1, y1));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 x = _mm512_mul_ps(v1, avx512::maskz_load<Da>(k, a + i));
    const __m512 y = _mm512_mul_ps(v0, avx512::maskz_load<Db>(k, b + i));
    avx512::mask_store<Do>(o + i, k, _mm512_sub_ps(x, y));
  }
}

template <class Do, class Da, class Db>
void run(void* out, const void* aligned, const void* base, int64_t n, float c1, float c0) {
  auto* o = static_cast<typename Do::T*>(out);
  const auto* a = static_cast<const typename Da::T*>(aligned);
  const auto* b = static_cast<const typename Db::T*>(base);
  const Isa isa = best_isa();
  // Chunks start at multiples of kChunkElems elements, so a 64-byte aligned output stays aligned for streaming.
  const bool stream = n * static_cast<int64_t>(sizeof(typename Do::T)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(o) % 64 == 0;
  const int64_t chunks = (n + kChunkElems - 1) / kChunkElems;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(n))
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunkElems, len = std::min(n - lo, kChunkElems);
    if (isa == Isa::kAvx512) {
      if (stream) run_avx512<Do, Da, Db, true>(o + lo, a + lo, b + lo, len, c1, c0);
      else run_avx512<Do, Da, Db, false>(o + lo, a + lo, b + lo, len, c1, c0);
    } else if (isa == Isa::kAvx2) {
      if (stream) run_avx2<Do, Da, Db, true>(o + lo, a + lo, b + lo, len, c1, c0);
      else run_avx2<Do, Da, Db, false>(o + lo, a + lo, b + lo, len, c1, c0);
    } else {
      run_portable<Do, Da, Db>(o + lo, a + lo, b + lo, len, c1, c0);
    }
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  }
}

}  // namespace

void extrapolate(void* out, DType out_dtype, const void* aligned, DType aligned_dtype, const void* base,
                 DType base_dtype, int64_t n, double alpha) {
  // The reference rounds 1 + alpha (a Python float) and alpha to fp32 once; so do we.
  const float c1 = static_cast<float>(1.0 + alpha);
  const float c0 = static_cast<float>(alpha);
  dispatch_dtype(out_dtype, [&](auto od) {
    dispatch_dtype(aligned_dtype, [&](auto ad) {
      dispatch_dtype(base_dtype, [&](auto bd) {
        run<decltype(od), decltype(ad), decltype(bd)>(out, aligned, base, n, c1, c0);
      });
    });
  });
}

}  // namespace nlsr
