#pragma once
// Per-ISA vector helpers: load any dtype as fp32 lanes, store fp32 lanes as any dtype (round to nearest even).
//
// Every function that uses AVX2 / AVX-512 intrinsics carries a target attribute (NLSR_AVX2 / NLSR_AVX512), so the
// default build needs no -march flag; callers pick a path with best_isa() (cpu_features.h). A function may only
// inline helpers of its own ISA, so each kernel's hot loop is written once per ISA, in its own attributed function.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nlsr/dtype.h"

#define NLSR_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#define NLSR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")))

namespace nlsr {

// Outputs larger than this are written with non-temporal stores: they cannot stay in the last-level cache anyway,
// and streaming them skips the read-for-ownership, which is a third of the traffic of a two-input elementwise op.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Reads `nbytes` (<= 8) mask bytes as a little-endian integer without touching bytes past them.
inline uint64_t load_bits(const uint8_t* p, int64_t nbytes) {
  if (nbytes == 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  if (nbytes == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
  if (nbytes == 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint64_t v = 0;  // tails: byte by byte (a variable-size memcpy would be a library call)
  for (int64_t i = 0; i < nbytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

namespace avx512 {

// 16 elements of dtype D as fp32 lanes.
template <class D>
NLSR_AVX512 inline __m512 load(const typename D::T* p);
template <>
NLSR_AVX512 inline __m512 load<F32>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
NLSR_AVX512 inline __m512 load<BF16>(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <>
NLSR_AVX512 inline __m512 load<F16>(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lanes whose bit in `k` is clear are 0 and their memory is not touched (safe at the end of a buffer).
template <class D>
NLSR_AVX512 inline __m512 maskz_load(__mmask16 k, const typename D::T* p);
template <>
NLSR_AVX512 inline __m512 maskz_load<F32>(__mmask16 k, const float* p) {
  return _mm512_maskz_loadu_ps(k, p);
}
template <>
NLSR_AVX512 inline __m512 maskz_load<BF16>(__mmask16 k, const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <>
NLSR_AVX512 inline __m512 maskz_load<F16>(__mmask16 k, const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// fp32 -> bf16 bit patterns, round to nearest even, NaN -> 0x7FC0 (the scalar f32_to_bf16 of dtype.h).
NLSR_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

NLSR_AVX512 inline __m256i to_f16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// Store 16 fp32 lanes as dtype D; `stream` uses a non-temporal store and needs p aligned to the vector size
// (64 bytes for fp32, 32 for 16-bit dtypes).
template <class D, bool kStream>
NLSR_AVX512 inline void store(typename D::T* p, __m512 v) {
  if constexpr (D::code == DType::kF32) {
    if constexpr (kStream) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  } else {
    const __m256i h = D::code == DType::kBF16 ? to_bf16(v) : to_f16(v);
    if constexpr (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
}

template <class D>
NLSR_AVX512 inline void mask_store(typename D::T* p, __mmask16 k, __m512 v) {
  if constexpr (D::code == DType::kF32) {
    _mm512_mask_storeu_ps(p, k, v);
  } else {
    const __m256i h = D::code == DType::kBF16 ? to_bf16(v) : to_f16(v);
    _mm256_mask_storeu_epi16(p, k, h);
  }
}

// Lane-wise sum of 16 fp32 lanes widened to fp64: acc_lo += lanes 0-7, acc_hi += lanes 8-15, as products a*b.
NLSR_AVX512 inline __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
NLSR_AVX512 inline __m512d hi_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

}  // namespace avx512

namespace avx2 {

// 8 elements of dtype D as fp32 lanes.
template <class D>
NLSR_AVX2 inline __m256 load(const typename D::T* p);
template <>
NLSR_AVX2 inline __m256 load<F32>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
NLSR_AVX2 inline __m256 load<BF16>(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <>
NLSR_AVX2 inline __m256 load<F16>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

NLSR_AVX2 inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // Values are <= 0xFFFF, so the unsigned-saturating pack is a plain narrowing.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

NLSR_AVX2 inline __m128i to_f16(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// Store 8 fp32 lanes as dtype D; `stream` needs p aligned to the vector size (32 bytes fp32, 16 bytes 16-bit).
template <class D, bool kStream>
NLSR_AVX2 inline void store(typename D::T* p, __m256 v) {
  if constexpr (D::code == DType::kF32) {
    if constexpr (kStream) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
  } else {
    const __m128i h = D::code == DType::kBF16 ? to_bf16(v) : to_f16(v);
    if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
}

// Lane mask (all-ones / zero per 32-bit lane) from 8 mask bits, bit i -> lane i.
NLSR_AVX2 inline __m256i lanes_from_bits(uint32_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), sel), sel);
}

}  // namespace avx2

}  // namespace nlsr
