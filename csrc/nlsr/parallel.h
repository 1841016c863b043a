#pragma once
// OpenMP helpers shared by the kernels: thread counts and the chunking of streaming passes.
//
// Streaming kernels cut their input into fixed chunks that threads take dynamically: on a shared machine a thread
// whose core is busy simply takes fewer chunks, instead of the whole op waiting for it at the end of a static
// split. Reductions keep one partial per chunk and add them in chunk order, so results do not depend on the
// schedule or the thread count.
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nlsr {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Below this many elements a kernel runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelMin = int64_t{1} << 15;

// Elements per chunk of a streaming pass: big enough that handing chunks out costs nothing, small enough that
// the last chunks balance the threads (256 chunks for an 8192 x 8192 matrix).
constexpr int64_t kChunkElems = int64_t{1} << 18;

// Threads to use for `work` elements.
inline int threads_for(int64_t work) { return work < kParallelMin ? 1 : max_threads(); }

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Part t of `parts` contiguous parts of [0, n) with boundaries rounded down to multiples of `grain`
// (the last part ends at n). Parts may be empty.
inline void part_bounds(int64_t n, int64_t parts, int64_t t, int64_t grain, int64_t* begin, int64_t* end) {
  auto at = [&](int64_t i) -> int64_t {
    if (i >= parts) return n;
    const int64_t b = static_cast<int64_t>((static_cast<__int128>(n) * i) / parts);
    return b / grain * grain;
  };
  *begin = at(t);
  *end = at(t + 1);
}

// A rows x cols matrix with a PackedMask (rows of ceil(cols / 8) bytes), cut into chunks of about kChunkElems
// elements made of segments whose mask bits start at bit 0 of a byte. When rows carry no padding bits
// (cols % 8 == 0, or one row) mask bit i is flat element i, and chunks are flat ranges starting at multiples of
// 64 elements (so 64-byte aligned data stays aligned); otherwise chunks are runs of whole rows.
struct MaskedChunks {
  int64_t rows, cols, row_bytes, per_chunk, count;
  bool flat;

  MaskedChunks(int64_t rows_, int64_t cols_) : rows(rows_), cols(cols_), row_bytes((cols_ + 7) / 8) {
    flat = cols % 8 == 0 || rows == 1;
    const int64_t units = flat ? rows * cols : rows;
    per_chunk = flat ? kChunkElems : std::max<int64_t>(1, kChunkElems / std::max<int64_t>(cols, 1));
    count = (units + per_chunk - 1) / per_chunk;
  }

  // Calls fn(element_offset, mask_byte_offset, length) for the segments of chunk c.
  template <class Fn>
  void segments(int64_t c, Fn&& fn) const {
    if (flat) {
      const int64_t lo = c * per_chunk, hi = std::min(rows * cols, lo + per_chunk);
      fn(lo, lo / 8, hi - lo);
    } else {
      const int64_t hi = std::min(rows, (c + 1) * per_chunk);
      for (int64_t i = c * per_chunk; i < hi; ++i) fn(i * cols, i * row_bytes, cols);
    }
  }
};

}  // namespace nlsr
