#include "nlsr/masked_restore.h"

#include <cstdint>
#include <type_traits>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"

namespace nlsr {
namespace {

// Every segment below is `len` elements whose mask bits start at bit 0 of `m`.

// Target and source of the same dtype: a bitwise select on raw E-sized lanes (E = uint16_t or uint32_t).
template <class E>
void same_portable(E* o, const E* t, const E* s, const uint8_t* m, int64_t len) {
  for (int64_t j = 0; j < len; ++j) o[j] = (m[j >> 3] >> (j & 7)) & 1 ? s[j] : t[j];
}

// Source converted to target's dtype Dt on the way.
template <class Dt, class Ds>
void cast_portable(typename Dt::T* o, const typename Dt::T* t, const typename Ds::T* s, const uint8_t* m,
                   int64_t len) {
  for (int64_t j = 0; j < len; ++j) o[j] = (m[j >> 3] >> (j & 7)) & 1 ? Dt::from_f32(Ds::load(s + j)) : t[j];
}

template <class E, bool kStream>
NLSR_AVX512 void same_avx512(E* o, const E* t, const E* s, const uint8_t* m, int64_t len) {
  constexpr int64_t kLanes = 64 / sizeof(E);  // 32 bf16/fp16 or 16 fp32 per vector
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const __m512i vt = _mm512_loadu_si512(t + j);
    const __m512i vs = _mm512_loadu_si512(s + j);
    __m512i r;
    if constexpr (sizeof(E) == 2) {
      r = _mm512_mask_blend_epi16(static_cast<__mmask32>(load_bits(m + j / 8, 4)), vt, vs);
    } else {
      r = _mm512_mask_blend_epi32(static_cast<__mmask16>(load_bits(m + j / 8, 2)), vt, vs);
    }
    if constexpr (kStream) _mm512_stream_si512(reinterpret_cast<__m512i*>(o + j), r);
    else _mm512_storeu_si512(o + j, r);
  }
  if (j < len) {
    const int64_t rem = len - j;
    const uint32_t valid = static_cast<uint32_t>((uint64_t{1} << rem) - 1);
    const uint32_t k = static_cast<uint32_t>(load_bits(m + j / 8, (rem + 7) / 8)) & valid;
    if constexpr (sizeof(E) == 2) {
      const __m512i vt = _mm512_maskz_loadu_epi16(valid, t + j);
      const __m512i vs = _mm512_maskz_loadu_epi16(k, s + j);
      _mm512_mask_storeu_epi16(o + j, valid, _mm512_mask_blend_epi16(k, vt, vs));
    } else {
      const __m512i vt = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(valid), t + j);
      const __m512i vs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(k), s + j);
      _mm512_mask_storeu_epi32(o + j, static_cast<__mmask16>(valid), _mm512_mask_blend_epi32(k, vt, vs));
    }
  }
}

template <class Dt, class Ds, bool kStream>
NLSR_AVX512 void cast_avx512(typename Dt::T* o, const typename Dt::T* t, const typename Ds::T* s, const uint8_t* m,
                             int64_t len) {
  int64_t j = 0;
  for (; j < len; j += 16) {
    const int64_t rem = len - j;
    const bool full = rem >= 16;
    const __mmask16 valid = full ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
    const __mmask16 k = static_cast<__mmask16>(load_bits(m + j / 8, full ? 2 : (rem + 7) / 8)) & valid;
    const __m512 vs = avx512::maskz_load<Ds>(k, s + j);
    if constexpr (Dt::code == DType::kF32) {
      const __m512 r = _mm512_mask_blend_ps(k, _mm512_maskz_loadu_ps(valid, t + j), vs);
      if (kStream && full) _mm512_stream_ps(o + j, r);
      else _mm512_mask_storeu_ps(o + j, valid, r);
    } else {
      const __m256i c = Dt::code == DType::kBF16 ? avx512::to_bf16(vs) : avx512::to_f16(vs);
      const __m256i r = _mm256_mask_blend_epi16(k, _mm256_maskz_loadu_epi16(valid, t + j), c);
      if (kStream && full) _mm256_stream_si256(reinterpret_cast<__m256i*>(o + j), r);
      else _mm256_mask_storeu_epi16(o + j, valid, r);
    }
  }
}

template <class E>
NLSR_AVX2 void same_avx2(E* o, const E* t, const E* s, const uint8_t* m, int64_t len) {
  constexpr int64_t kLanes = 32 / sizeof(E);  // 16 bf16/fp16 or 8 fp32 per vector
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const __m256i vt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j));
    const __m256i vs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j));
    __m256i sel;
    if constexpr (sizeof(E) == 2) {
      // 16 mask bits -> 16 lanes of 0 / 0xFFFF.
      const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                            static_cast<int16_t>(0x8000));
      const __m256i k = _mm256_set1_epi16(static_cast<int16_t>(load_bits(m + j / 8, 2)));
      sel = _mm256_cmpeq_epi16(_mm256_and_si256(k, bit), bit);
    } else {
      sel = avx2::lanes_from_bits(m[j / 8]);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), _mm256_blendv_epi8(vt, vs, sel));
  }
  // j is a multiple of 8, so the tail's mask bits start on a byte boundary.
  same_portable<E>(o + j, t + j, s + j, m + j / 8, len - j);
}

template <class Dt, class Ds>
NLSR_AVX2 void cast_avx2(typename Dt::T* o, const typename Dt::T* t, const typename Ds::T* s, const uint8_t* m,
                         int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const uint32_t byte = m[j / 8];
    if (byte == 0) {
      // Nothing restored in these 8: copy target (also avoids converting source lanes that are not needed).
      for (int l = 0; l < 8; ++l) o[j + l] = t[j + l];
      continue;
    }
    const __m256 vs = avx2::load<Ds>(s + j);
    const __m256i sel = avx2::lanes_from_bits(byte);
    if constexpr (Dt::code == DType::kF32) {
      _mm256_storeu_ps(o + j, _mm256_blendv_ps(_mm256_loadu_ps(t + j), vs, _mm256_castsi256_ps(sel)));
    } else {
      const __m128i c = Dt::code == DType::kBF16 ? avx2::to_bf16(vs) : avx2::to_f16(vs);
      // 32-bit lane mask -> 16-bit lane mask.
      const __m128i sel16 = _mm_packs_epi32(_mm256_castsi256_si128(sel), _mm256_extracti128_si256(sel, 1));
      const __m128i vt = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + j));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j), _mm_blendv_epi8(vt, c, sel16));
    }
  }
  cast_portable<Dt, Ds>(o + j, t + j, s + j, m + j / 8, len - j);
}

template <class Dt, class Ds>
void segment(typename Dt::T* o, const typename Dt::T* t, const typename Ds::T* s, const uint8_t* m, int64_t len,
             Isa isa, bool stream) {
  if constexpr (Dt::code == Ds::code) {
    using E = std::conditional_t<sizeof(typename Dt::T) == 2, uint16_t, uint32_t>;
    auto* oe = reinterpret_cast<E*>(o);
    const auto* te = reinterpret_cast<const E*>(t);
    const auto* se = reinterpret_cast<const E*>(s);
    if (isa == Isa::kAvx512) {
      if (stream) same_avx512<E, true>(oe, te, se, m, len);
      else same_avx512<E, false>(oe, te, se, m, len);
    } else if (isa == Isa::kAvx2) {
      same_avx2<E>(oe, te, se, m, len);
    } else {
      same_portable<E>(oe, te, se, m, len);
    }
  } else {
    if (isa == Isa::kAvx512) {
      if (stream) cast_avx512<Dt, Ds, true>(o, t, s, m, len);
      else cast_avx512<Dt, Ds, false>(o, t, s, m, len);
    } else if (isa == Isa::kAvx2) {
      cast_avx2<Dt, Ds>(o, t, s, m, len);
    } else {
      cast_portable<Dt, Ds>(o, t, s, m, len);
    }
  }
}

template <class Dt, class Ds>
void run(void* out, const void* target, const void* source, const uint8_t* mask, int64_t rows, int64_t cols) {
  auto* o = static_cast<typename Dt::T*>(out);
  const auto* t = static_cast<const typename Dt::T*>(target);
  const auto* s = static_cast<const typename Ds::T*>(source);
  const Isa isa = best_isa();
  const MaskedChunks chunks(rows, cols);
  // Flat chunks start at multiples of kChunkElems elements: a 64-byte aligned output stays aligned for streaming.
  const bool stream = chunks.flat &&
                      rows * cols * static_cast<int64_t>(sizeof(typename Dt::T)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(o) % 64 == 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(rows * cols))
  for (int64_t c = 0; c < chunks.count; ++c) {
    chunks.segments(c, [&](int64_t off, int64_t mask_off, int64_t len) {
      segment<Dt, Ds>(o + off, t + off, s + off, mask + mask_off, len, isa, stream);
    });
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  }
}

}  // namespace

void masked_restore(void* out, const void* target, DType target_dtype, const void* source, DType source_dtype,
                    const uint8_t* mask, int64_t rows, int64_t cols) {
  dispatch_dtype(target_dtype, [&](auto td) {
    dispatch_dtype(source_dtype, [&](auto sd) {
      run<decltype(td), decltype(sd)>(out, target, source, mask, rows, cols);
    });
  });
}

}  // namespace nlsr
