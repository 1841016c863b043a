#include "nlsr/finite.h"

#include <algorithm>

namespace nlsr {
namespace {

// Non-finite <=> every exponent bit set, so the largest masked exponent says whether any entry is: a max reduction
// the compiler vectorises (one pass, no temporary); the rare hit is counted in a second loop.
template <class E>
int64_t count(const E* v, int64_t n, E exp_mask) {
  E top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max<E>(top, v[i] & exp_mask);
  if (top != exp_mask) return 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (v[i] & exp_mask) == exp_mask;
  return bad;
}

}  // namespace

int64_t count_nonfinite(const void* x, DType dtype, int64_t n) {
  if (dtype == DType::kF32) return count(static_cast<const uint32_t*>(x), n, uint32_t{0x7F800000u});
  const auto mask = static_cast<uint16_t>(dtype == DType::kBF16 ? 0x7F80 : 0x7C00);
  return count(static_cast<const uint16_t*>(x), n, mask);
}

}  // namespace nlsr
