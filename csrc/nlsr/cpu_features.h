#pragma once
// Run-time ISA detection: kernels compile AVX2 / AVX-512 paths with target attributes and pick one here.
namespace nlsr {
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
// The best ISA this CPU supports; NLSR_FAST_ISA=portable|avx2|avx512 caps it (for tests of every path).
Isa best_isa();
const char* isa_name(Isa isa);
}  // namespace nlsr
