#include "nlsr/lora_masked_cosine.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "nlsr/cpu_features.h"
#include "nlsr/parallel.h"
#include "nlsr/simd.h"

namespace nlsr {
namespace {

// Gram G = X X^T of a stacked matrix X (m rows, K columns), computed in K-blocks of kKb columns: each block is
// packed "k-major" into P (kKb x mp fp32, P[kk][p] = X[p][k0 + kk], rows p >= m zero), then 8 x 32 tiles of G
// (8 values of p broadcast, 32 of q in two vectors) accumulate over the block in fp32 registers and are added to
// the fp64 G. Only tiles touching the upper triangle are computed; the rest is mirrored at the end.
constexpr int64_t kKb = 256;
constexpr int64_t kTileP = 8, kTileQ = 32;

struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// ---- 8 x 32 tile: G[p0 .. p0+8, q0 .. q0+32] += sum_kk P[kk][p] * P[kk][q] ----

void tile_portable(const float* P, int64_t mp, int64_t kb, int64_t p0, int64_t q0, double* G) {
  float c[kTileP][kTileQ] = {};
  for (int64_t kk = 0; kk < kb; ++kk) {
    const float* row = P + kk * mp;
    for (int i = 0; i < kTileP; ++i) {
      const float a = row[p0 + i];
      for (int j = 0; j < kTileQ; ++j) c[i][j] += a * row[q0 + j];
    }
  }
  for (int i = 0; i < kTileP; ++i) {
    for (int j = 0; j < kTileQ; ++j) G[(p0 + i) * mp + q0 + j] += c[i][j];
  }
}

NLSR_AVX2 void tile_avx2(const float* P, int64_t mp, int64_t kb, int64_t p0, int64_t q0, double* G) {
  // Four 4 x 16 sub-tiles: 8 accumulators + 2 loads + 1 broadcast fit the 16 ymm registers.
  for (int64_t ps = p0; ps < p0 + kTileP; ps += 4) {
    for (int64_t qs = q0; qs < q0 + kTileQ; qs += 16) {
      __m256 c[4][2];
      for (int i = 0; i < 4; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
      for (int64_t kk = 0; kk < kb; ++kk) {
        const float* row = P + kk * mp;
        const __m256 v0 = _mm256_loadu_ps(row + qs), v1 = _mm256_loadu_ps(row + qs + 8);
        for (int i = 0; i < 4; ++i) {
          const __m256 a = _mm256_broadcast_ss(row + ps + i);
          c[i][0] = _mm256_fmadd_ps(a, v0, c[i][0]);
          c[i][1] = _mm256_fmadd_ps(a, v1, c[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        double* g = G + (ps + i) * mp + qs;
        for (int h = 0; h < 2; ++h) {
          const __m128 lo = _mm256_castps256_ps128(c[i][h]), hi = _mm256_extractf128_ps(c[i][h], 1);
          _mm256_storeu_pd(g + 8 * h, _mm256_add_pd(_mm256_loadu_pd(g + 8 * h), _mm256_cvtps_pd(lo)));
          _mm256_storeu_pd(g + 8 * h + 4, _mm256_add_pd(_mm256_loadu_pd(g + 8 * h + 4), _mm256_cvtps_pd(hi)));
        }
      }
    }
  }
}

NLSR_AVX512 void tile_avx512(const float* P, int64_t mp, int64_t kb, int64_t p0, int64_t q0, double* G) {
  __m512 c[kTileP][2];
  for (int i = 0; i < kTileP; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kb; ++kk) {
    const float* row = P + kk * mp;
    const __m512 v0 = _mm512_load_ps(row + q0), v1 = _mm512_load_ps(row + q0 + 16);
    for (int i = 0; i < kTileP; ++i) {
      const __m512 a = _mm512_set1_ps(row[p0 + i]);
      c[i][0] = _mm512_fmadd_ps(a, v0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, v1, c[i][1]);
    }
  }
  for (int i = 0; i < kTileP; ++i) {
    double* g = G + (p0 + i) * mp + q0;
    for (int h = 0; h < 2; ++h) {
      _mm512_storeu_pd(g + 16 * h, _mm512_add_pd(_mm512_loadu_pd(g + 16 * h), avx512::lo_pd(c[i][h])));
      _mm512_storeu_pd(g + 16 * h + 8, _mm512_add_pd(_mm512_loadu_pd(g + 16 * h + 8), avx512::hi_pd(c[i][h])));
    }
  }
}

// ---- packing: masked factor entries as fp32 into the k-major block P (already zeroed) ----

// A factor (rows x d, row-major, the Gram contracts over d): P[kk][p_off + p] = m(p, k0 + kk) * A[p][k0 + kk].
// k0 is a multiple of 8, so each row's mask bits for the block start on a byte boundary.
template <class D>
void pack_rows_portable(float* P, int64_t mp, const typename D::T* A, const uint8_t* mask, int64_t rows, int64_t d,
                        int64_t p_off, int64_t k0, int64_t kb, float scale) {
  const int64_t row_bytes = (d + 7) / 8;
  for (int64_t p = 0; p < rows; ++p) {
    const typename D::T* a = A + p * d + k0;
    const uint8_t* m = mask + p * row_bytes + k0 / 8;
    for (int64_t kk = 0; kk < kb; ++kk) {
      if ((m[kk >> 3] >> (kk & 7)) & 1) P[kk * mp + p_off + p] = D::load(a + kk) * scale;
    }
  }
}

template <class D>
NLSR_AVX512 void pack_rows_avx512(float* P, int64_t mp, const typename D::T* A, const uint8_t* mask, int64_t rows,
                                  int64_t d, int64_t p_off, int64_t k0, int64_t kb, float scale) {
  const int64_t row_bytes = (d + 7) / 8;
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(mp)));
  for (int64_t p = 0; p < rows; ++p) {
    const typename D::T* a = A + p * d + k0;
    const uint8_t* m = mask + p * row_bytes + k0 / 8;
    for (int64_t kk = 0; kk < kb; kk += 16) {
      const int64_t n = std::min<int64_t>(16, kb - kk);
      const __mmask16 k = static_cast<__mmask16>(load_bits(m + kk / 8, (n + 7) / 8) & ((1u << n) - 1u));
      if (k == 0) continue;
      // The transpose: lane l goes to P[kk + l][p_off + p]; only set lanes are written (P is zeroed).
      _mm512_mask_i32scatter_ps(P + kk * mp + p_off + p, k, stride, _mm512_mul_ps(avx512::maskz_load<D>(k, a + kk), s), 4);
    }
  }
}

// B factor (K x r, row-major, the Gram contracts over the K rows): P[kk][p_off + p] = m(k0 + kk, p) * B[k0 + kk][p].
template <class D>
void pack_cols_portable(float* P, int64_t mp, const typename D::T* B, const uint8_t* mask, int64_t r, int64_t p_off,
                        int64_t k0, int64_t kb, float scale) {
  const int64_t row_bytes = (r + 7) / 8;
  for (int64_t kk = 0; kk < kb; ++kk) {
    const typename D::T* b = B + (k0 + kk) * r;
    const uint8_t* m = mask + (k0 + kk) * row_bytes;
    float* dst = P + kk * mp + p_off;
    for (int64_t p = 0; p < r; ++p) {
      if ((m[p >> 3] >> (p & 7)) & 1) dst[p] = D::load(b + p) * scale;
    }
  }
}

template <class D>
NLSR_AVX512 void pack_cols_avx512(float* P, int64_t mp, const typename D::T* B, const uint8_t* mask, int64_t r,
                                  int64_t p_off, int64_t k0, int64_t kb, float scale) {
  const int64_t row_bytes = (r + 7) / 8;
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t kk = 0; kk < kb; ++kk) {
    const typename D::T* b = B + (k0 + kk) * r;
    const uint8_t* m = mask + (k0 + kk) * row_bytes;
    float* dst = P + kk * mp + p_off;
    for (int64_t p = 0; p < r; p += 16) {
      const int64_t n = std::min<int64_t>(16, r - p);
      const __mmask16 k = static_cast<__mmask16>(load_bits(m + p / 8, (n + 7) / 8) & ((1u << n) - 1u));
      _mm512_mask_storeu_ps(dst + p, k, _mm512_mul_ps(avx512::maskz_load<D>(k, b + p), s));
    }
  }
}


// Columns of K per chunk of the Gram: chunks are fixed (not one per thread), each sums into its own fp64 partial,
// and the partials are added in chunk order, so the result does not depend on the thread count (parallel.h).
// 2048 = 8 blocks of kKb: 14 chunks (7 MB of partials at m = 256) for a 70B MLP's K = 28672.
constexpr int64_t kGramChunk = 8 * kKb;

// Adds into g (mp x mp, fp64) the Gram of X's columns [lo, hi), block by block through the scratch P.
template <class Pack>
void gram_range(double* g, float* P, int64_t mp, int64_t lo, int64_t hi, Isa isa, const Pack& pack) {
  for (int64_t k0 = lo; k0 < hi; k0 += kKb) {
    const int64_t kb = std::min(kKb, hi - k0);
    std::memset(P, 0, static_cast<size_t>(kb * mp) * sizeof(float));
    pack(P, k0, kb, isa);
    for (int64_t q0 = 0; q0 < mp; q0 += kTileQ) {
      // Tiles whose rows reach the upper triangle of this column block: p0 < q0 + kTileQ.
      for (int64_t p0 = 0; p0 < q0 + kTileQ && p0 < mp; p0 += kTileP) {
        if (isa == Isa::kAvx512) tile_avx512(P, mp, kb, p0, q0, g);
        else if (isa == Isa::kAvx2) tile_avx2(P, mp, kb, p0, q0, g);
        else tile_portable(P, mp, kb, p0, q0, g);
      }
    }
  }
}

// G (mp x mp, fp64, zeroed) = X X^T over K columns; `pack` fills a zeroed block.
template <class Pack>
void gram(double* G, int64_t m, int64_t mp, int64_t K, const Pack& pack) {
  const Isa isa = best_isa();
  const int64_t chunks = (K + kGramChunk - 1) / kGramChunk;
  // Chunk 0 sums straight into G; chunk c > 0 into partial[c - 1], added to G in chunk order below. The partials
  // stay allocated per calling thread (7 MB for Llama-3-70B shapes): fresh pages for every call cost
  // about a sixth of the op in page faults.
  thread_local std::vector<double> partial;
  const size_t need = static_cast<size_t>(std::max<int64_t>(chunks - 1, 0) * mp * mp);
  if (partial.size() < need) partial.resize(need);
  double* partials = partial.data();
  const int nthreads = static_cast<int>(std::min<int64_t>(threads_for(m * K), chunks));
#pragma omp parallel num_threads(nthreads)
  {
    AlignedFloats P(static_cast<size_t>(kKb * mp));
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      double* g = G;
      if (c > 0) {
        g = partials + (c - 1) * mp * mp;
        std::fill(g, g + mp * mp, 0.0);
      }
      gram_range(g, P.p, mp, c * kGramChunk, std::min(K, (c + 1) * kGramChunk), isa, pack);
    }
  }
  for (int64_t c = 1; c < chunks; ++c) {
    const double* part = partials + (c - 1) * mp * mp;
    for (int64_t i = 0; i < mp * mp; ++i) G[i] += part[i];
  }
  // Mirror: entries below the computed tiles (p >= tile start of q + kTileQ) take G[q][p].
  for (int64_t p = 0; p < m; ++p) {
    for (int64_t q = 0; q < p; ++q) {
      if (p >= q / kTileQ * kTileQ + kTileQ) G[p * mp + q] = G[q * mp + p];
    }
  }
}

template <class D>
void pack_rows(float* P, int64_t mp, const void* A, const uint8_t* mask, int64_t rows, int64_t d, int64_t p_off,
               int64_t k0, int64_t kb, float scale, Isa isa) {
  const auto* a = static_cast<const typename D::T*>(A);
  if (isa == Isa::kAvx512) pack_rows_avx512<D>(P, mp, a, mask, rows, d, p_off, k0, kb, scale);
  else pack_rows_portable<D>(P, mp, a, mask, rows, d, p_off, k0, kb, scale);
}

template <class D>
void pack_cols(float* P, int64_t mp, const void* B, const uint8_t* mask, int64_t r, int64_t p_off, int64_t k0,
               int64_t kb, float scale, Isa isa) {
  const auto* b = static_cast<const typename D::T*>(B);
  if (isa == Isa::kAvx512) pack_cols_avx512<D>(P, mp, b, mask, r, p_off, k0, kb, scale);
  else pack_cols_portable<D>(P, mp, b, mask, r, p_off, k0, kb, scale);
}

}  // namespace

void lora_masked_cosine(double sums[3], const void* a_t, DType a_t_dtype, const void* a_e, DType a_e_dtype,
                        const void* b_t, DType b_t_dtype, const void* b_e, DType b_e_dtype, const uint8_t* mask_a,
                        const uint8_t* mask_b, int64_t r, int64_t d_in, int64_t d_out, float e_scale) {
  const int64_t m = 2 * r;
  const int64_t mp = (m + kTileQ - 1) / kTileQ * kTileQ;
  std::vector<double> ga(static_cast<size_t>(mp * mp), 0.0), gb(static_cast<size_t>(mp * mp), 0.0);
  // A side: rows of [A_t'; A_e'], contracted over d_in.
  gram(ga.data(), m, mp, d_in, [&](float* P, int64_t k0, int64_t kb, Isa isa) {
    dispatch_dtype(a_t_dtype, [&](auto d) { pack_rows<decltype(d)>(P, mp, a_t, mask_a, r, d_in, 0, k0, kb, 1.0f, isa); });
    dispatch_dtype(a_e_dtype, [&](auto d) { pack_rows<decltype(d)>(P, mp, a_e, mask_a, r, d_in, r, k0, kb, e_scale, isa); });
  });
  // B side: columns of [B_t' | B_e'], contracted over d_out.
  gram(gb.data(), m, mp, d_out, [&](float* P, int64_t k0, int64_t kb, Isa isa) {
    dispatch_dtype(b_t_dtype, [&](auto d) { pack_cols<decltype(d)>(P, mp, b_t, mask_b, r, 0, k0, kb, 1.0f, isa); });
    dispatch_dtype(b_e_dtype, [&](auto d) { pack_cols<decltype(d)>(P, mp, b_e, mask_b, r, r, k0, kb, e_scale, isa); });
  });
  // <B1 A1, B2 A2>_F = sum_pq (B1^T B2)[p, q] (A1 A2^T)[p, q]; the r x r blocks of the stacked Grams.
  double dot = 0, nt = 0, ne = 0;
  for (int64_t p = 0; p < r; ++p) {
    for (int64_t q = 0; q < r; ++q) {
      dot += gb[p * mp + r + q] * ga[p * mp + r + q];
      nt += gb[p * mp + q] * ga[p * mp + q];
      ne += gb[(r + p) * mp + r + q] * ga[(r + p) * mp + r + q];
    }
  }
  sums[0] = dot;
  sums[1] = nt;
  sums[2] = ne;
}

}  // namespace nlsr
