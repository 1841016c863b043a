#pragma once
#include <cstdint>

#include "nlsr/dtype.h"

namespace nlsr {

// Restoration of one tensor (docs/algorithm.md §6): out[i, j] = mask(i, j) ? cast(source[i, j]) : target[i, j].
// Entries where the mask is clear are copied bit for bit; masked entries are source's bits when the dtypes match,
// else source rounded to target's dtype (nearest even), exactly like source.to(target.dtype).
// Preconditions (checked in Python): target, source and out hold rows x cols contiguous elements (out and target
// of target_dtype); mask is a PackedMask buffer (rows, ceil(cols / 8)) uint8; out may be target or source itself
// (same index), no other overlap.
void masked_restore(void* out, const void* target, DType target_dtype, const void* source, DType source_dtype,
                    const uint8_t* mask, int64_t rows, int64_t cols);

}  // namespace nlsr
