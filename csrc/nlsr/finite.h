#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// Number of NaN / Inf entries of n contiguous elements of dtype (the input check of realign, io/finite.py).
int64_t count_nonfinite(const void* x, DType dtype, int64_t n);

}  // namespace nlsr
