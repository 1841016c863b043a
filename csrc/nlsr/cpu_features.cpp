#include "nlsr/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace nlsr {

static Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  Isa isa = Isa::kPortable;
  // F16C (fp16 <-> fp32 in hardware) ships with every AVX2 CPU, but the fp16 paths need it, so check.
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    isa = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    isa = Isa::kAvx512;
#else
  Isa isa = Isa::kPortable;
#endif
  if (const char* cap = std::getenv("NLSR_FAST_ISA")) {
    Isa want = Isa::kAvx512;
    if (std::strcmp(cap, "portable") == 0) want = Isa::kPortable;
    else if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
  }
  return isa;
}

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace nlsr
