#pragma once
// Element types of the torch-free core and exact scalar conversions.
//
// bf16 and fp16 travel as uint16_t bit patterns. Widening to fp32 is exact; narrowing rounds to nearest even,
// like torch's casts, so a kernel that computes in fp32 and casts once matches `tensor.to(dtype)` bit for bit
// (NaN becomes the canonical quiet NaN 0x7FC0 for bf16, sign|0x7E00 for fp16, as c10's scalar casts do).
#include <cstdint>
#include <cstring>

namespace nlsr {

// Dtype codes shared with Python (nlsr_fast/ops/_cpu.py).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  // Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit, then truncate.
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in fp32.
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return f32_from_bits(f32_bits(mag) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) return sign | (u > 0x7F800000u ? 0x7E00 : 0x7C00);  // NaN / inf
  if (u >= 0x477FF000u) return sign | 0x7C00;                                 // rounds past 65504: inf
  if (u < 0x38800000u) {
    // Result is subnormal (or zero): round u's value to a multiple of 2^-24.
    if (u <= 0x33000000u) return sign;  // <= 2^-25, half of the smallest subnormal: ties to even 0
    const uint32_t e = u >> 23;
    const uint32_t m = (u & 0x7FFFFFu) | 0x800000u;  // value = m * 2^(e - 150)
    const uint32_t shift = 126u - e;                  // in [14, 24]
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    r += (rem > half) || (rem == half && (r & 1u));  // may carry into the smallest normal: still right
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  uint32_t r = (u - 0x38000000u) >> 13;
  const uint32_t rem = u & 0x1FFFu;
  r += (rem > 0x1000u) || (rem == 0x1000u && (r & 1u));
  return sign | static_cast<uint16_t>(r);
}

// Type tags: the storage type and the scalar conversions of each dtype, for templates.
struct F32 {
  using T = float;
  static constexpr DType code = DType::kF32;
  static float load(const T* p) { return *p; }
  static T from_f32(float f) { return f; }
};
struct F16 {
  using T = uint16_t;
  static constexpr DType code = DType::kF16;
  static float load(const T* p) { return f16_to_f32(*p); }
  static T from_f32(float f) { return f32_to_f16(f); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr DType code = DType::kBF16;
  static float load(const T* p) { return bf16_to_f32(*p); }
  static T from_f32(float f) { return f32_to_bf16(f); }
};

// Calls fn(tag) with the tag of `code` (F32{}, F16{} or BF16{}); the caller's generic lambda instantiates per dtype.
template <class Fn>
decltype(auto) dispatch_dtype(DType code, Fn&& fn) {
  switch (code) {
    case DType::kF16: return fn(F16{});
    case DType::kBF16: return fn(BF16{});
    default: return fn(F32{});
  }
}

}  // namespace nlsr
