// Vector primitives shared by the CPU decode kernels (docs/kernels.md): AVX2 + FMA where the compiler
// targets it (-march=native on such a machine), plain loops otherwise.
#ifndef SCALING_SPARSE_KERNELS_VECTOR_OPS_H_
#define SCALING_SPARSE_KERNELS_VECTOR_OPS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>  // outside the namespace: its declarations belong to the global one
#endif

namespace scaling_sparse {

// Calls f(std::integral_constant<int, rows>{}) for a run-time `rows` in 1..R (nothing for 0): register
// tiles are templates on their row count, and a strip's last tile has whatever rows are left.
template <int R, class F>
inline void WithRowCount(int64_t rows, F&& f) {
  if constexpr (R > 0) {
    if (rows == R) {
      f(std::integral_constant<int, R>{});
    } else {
      WithRowCount<R - 1>(rows, f);
    }
  }
}

// Asks for the cache line at p in the L2 cache (and L3), not L1: a hint, never a fault.
inline void PrefetchL2(const void* p) { __builtin_prefetch(p, 0, 2); }

#if defined(__AVX2__) && defined(__FMA__)

// Software prefetch distances (docs/kernels.md, "Prefetching and AVX-512"). The weights of a decode step were last
// read a whole model ago, so they come from memory; the hardware prefetchers ramp up too slowly on the
// short, strided runs these kernels read. Prefetches do not fault, so running past an array's end is safe.
constexpr int64_t kAxpyPrefetchFloats = 128;  // Axpy4: 512 bytes ahead in each of its four rows
constexpr int64_t kGemmPrefetchRows = 32;     // Gemm tiles: the row of B this many k steps ahead

// sum_i a[i] * b[i]: four 8-lane FMA chains, then the tail.
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float total = _mm_cvtss_f32(h);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out[j] += s * v[j], j < n.
inline void Axpy(float s, const float* __restrict v, float* __restrict out, int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(sv, _mm256_loadu_ps(v + j), _mm256_loadu_ps(out + j)));
    _mm256_storeu_ps(out + j + 8, _mm256_fmadd_ps(sv, _mm256_loadu_ps(v + j + 8), _mm256_loadu_ps(out + j + 8)));
    _mm256_storeu_ps(out + j + 16, _mm256_fmadd_ps(sv, _mm256_loadu_ps(v + j + 16), _mm256_loadu_ps(out + j + 16)));
    _mm256_storeu_ps(out + j + 24, _mm256_fmadd_ps(sv, _mm256_loadu_ps(v + j + 24), _mm256_loadu_ps(out + j + 24)));
  }
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(sv, _mm256_loadu_ps(v + j), _mm256_loadu_ps(out + j)));
  }
  for (; j < n; ++j) out[j] += s * v[j];
}

// out[j] += s[0] v[j] + s[1] v[ld + j] + s[2] v[2 ld + j] + s[3] v[3 ld + j], j < n: four rows at once,
// so four memory streams are in flight and `out` is loaded and stored once per four rows.
inline void Axpy4(const float* s, const float* __restrict v, int64_t ld, float* __restrict out, int64_t n) {
  const __m256 s0 = _mm256_set1_ps(s[0]), s1 = _mm256_set1_ps(s[1]), s2 = _mm256_set1_ps(s[2]),
               s3 = _mm256_set1_ps(s[3]);
  const float *v0 = v, *v1 = v + ld, *v2 = v + 2 * ld, *v3 = v + 3 * ld;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if ((j & 15) == 0) {  // each stream's line kAxpyPrefetchFloats ahead, once per 64-byte line
      _mm_prefetch(reinterpret_cast<const char*>(v0 + j + kAxpyPrefetchFloats), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v1 + j + kAxpyPrefetchFloats), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v2 + j + kAxpyPrefetchFloats), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v3 + j + kAxpyPrefetchFloats), _MM_HINT_T0);
    }
    __m256 o = _mm256_loadu_ps(out + j);
    o = _mm256_fmadd_ps(s0, _mm256_loadu_ps(v0 + j), o);
    o = _mm256_fmadd_ps(s1, _mm256_loadu_ps(v1 + j), o);
    o = _mm256_fmadd_ps(s2, _mm256_loadu_ps(v2 + j), o);
    o = _mm256_fmadd_ps(s3, _mm256_loadu_ps(v3 + j), o);
    _mm256_storeu_ps(out + j, o);
  }
  for (; j < n; ++j) out[j] = (((out[j] + s[0] * v0[j]) + s[1] * v1[j]) + s[2] * v2[j]) + s[3] * v3[j];
}

// x[j] = exp(x[j] - shift) for j < n; returns their sum. The Cephes single-precision polynomial (the
// one XLA's CPU backend also vectorises, to ~1 ulp); arguments below -87.3 give exactly 0, as a masked
// score does on the JAX path.
inline float ExpShiftedSum(float* x, int64_t n, float shift) {
  const __m256 lo = _mm256_set1_ps(-87.3f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), sh = _mm256_set1_ps(shift);
  const __m256 p0 = _mm256_set1_ps(1.9875691500e-4f), p1 = _mm256_set1_ps(1.3981999507e-3f),
               p2 = _mm256_set1_ps(8.3334519073e-3f), p3 = _mm256_set1_ps(4.1665795894e-2f),
               p4 = _mm256_set1_ps(1.6666665459e-1f), p5 = _mm256_set1_ps(5.0000001201e-1f);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(x + j), sh);
    const __m256 masked = _mm256_cmp_ps(a, lo, _CMP_LT_OQ);
    const __m256 t = _mm256_min_ps(_mm256_max_ps(a, lo), _mm256_set1_ps(88.3f));
    const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(t, log2e, half));
    __m256 r = _mm256_fnmadd_ps(fx, c1, t);
    r = _mm256_fnmadd_ps(fx, c2, r);
    __m256 y = _mm256_fmadd_ps(p0, r, p1);
    y = _mm256_fmadd_ps(y, r, p2);
    y = _mm256_fmadd_ps(y, r, p3);
    y = _mm256_fmadd_ps(y, r, p4);
    y = _mm256_fmadd_ps(y, r, p5);
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_andnot_ps(masked, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
    _mm256_storeu_ps(x + j, y);
    total = _mm256_add_ps(total, y);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float sum = _mm_cvtss_f32(h);
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

#else  // portable: eight interleaved partial sums, which compilers vectorise

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float s, const float* __restrict v, float* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += s * v[j];
}

inline float ExpShiftedSum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

inline void Axpy4(const float* s, const float* __restrict v, int64_t ld, float* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = (((out[j] + s[0] * v[j]) + s[1] * v[ld + j]) + s[2] * v[2 * ld + j]) + s[3] * v[3 * ld + j];
}

#endif

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// C[MR rows, 32 columns] += A[MR, k] . B[k, 32] with 512-bit vectors (where the compiler targets AVX-512):
// 2 MR accumulators, MR = 8 uses 16 of the 32 registers; twice GemmTile's multiply-adds per instruction.
// Each C element's sum runs over k in order with one FMA per term, exactly as in GemmTile, so both give
// bit-identical results. B's row kGemmPrefetchRows ahead (two lines: 32 floats) is prefetched.
template <int MR>
inline void GemmTile32(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_loadu_ps(C + r * ldc);
    c1[r] = _mm512_loadu_ps(C + r * ldc + 16);
  }
  for (int64_t t = 0; t < k; ++t) {
    const float* ahead = B + (t + kGemmPrefetchRows) * ldb;
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(B + t * ldb), b1 = _mm512_loadu_ps(B + t * ldb + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + t]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, c1[r]);
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// C[MR rows, 16 columns] += A[MR, k] . B[k, 16]: 2 MR accumulators stay in registers while B's rows
// stream; MR = 6 uses 12 of the 16 vector registers, enough independent FMA chains to hide their latency.
template <int MR>
inline void GemmTile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k) {
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm256_loadu_ps(C + r * ldc);
    c1[r] = _mm256_loadu_ps(C + r * ldc + 8);
  }
  for (int64_t t = 0; t < k; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(B + (t + kGemmPrefetchRows) * ldb), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(B + t * ldb), b1 = _mm256_loadu_ps(B + t * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + t);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
  }
}
// One MR x W register tile: W = 32 the AVX-512 GemmTile32, W = 16 the AVX2 GemmTile.
template <int W, int MR>
inline void Tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k) {
#if defined(__AVX512F__)
  if constexpr (W == 32) {
    GemmTile32<MR>(A, lda, B, ldb, C, ldc, k);
    return;
  }
#endif
  if constexpr (W == 16) GemmTile<MR>(A, lda, B, ldb, C, ldc, k);
}

// All `rows` of one W-column strip for k steps: MR-row tiles, then one tile for the rows left over.
template <int W, int MR>
inline void TileStrip(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                      int64_t k) {
  int64_t i = 0;
  for (; i + MR <= rows; i += MR) Tile<W, MR>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, k);
  WithRowCount<MR - 1>(rows - i, [&](auto rest) {
    Tile<W, decltype(rest)::value>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, k);
  });
}
#endif

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// Streaming matmul tiles for the sparse QKV kernel (docs/kernels.md, "All modules in one register tile").
// C[MR rows, 16 columns] += A[MR, k] . B[k, 16]: one 512-bit accumulator per row, so every row of B is
// loaded once and used by all MR (<= 16) rows: the weights stream through once while the multiply-adds
// run, instead of being waited for by one row tile and then reused from cache by the next. Step t also
// prefetches B's row t + kGemmPrefetchRows into L1 and `next`'s row t into L2 (`next`: the same columns
// of the rows the caller will use after these k, or null), so the following chunk's weights arrive while
// this one computes. A's rows should not lie a multiple of 4 KB apart (they would share L1 sets). One FMA
// per term, in k order.
template <int MR>
inline void StreamTile16(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k,
                         const float* next) {
  __m512 c[MR];
  for (int r = 0; r < MR; ++r) c[r] = _mm512_loadu_ps(C + r * ldc);
  for (int64_t t = 0; t < k; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(B + (t + kGemmPrefetchRows) * ldb), _MM_HINT_T0);
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + t * ldb), _MM_HINT_T1);
    const __m512 b = _mm512_loadu_ps(B + t * ldb);
    for (int r = 0; r < MR; ++r) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[r * lda + t]), b, c[r]);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(C + r * ldc, c[r]);
}

#endif

// C[rows, 16 columns] += A[rows, k] . B[k, 16 columns]: StreamTile16 in blocks of 16 rows where the
// compiler targets AVX-512, else Gemm (the same sums in the same k order); `next` as in StreamTile16 (a
// prefetch hint only).
inline void StreamStrip16(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                          int64_t k, const float* next);

// C[rows, n] += A[rows, k] . B[k, n] (row-major, leading dimensions lda, ldb, ldc): the sparse QKV kernel's
// matmuls where StreamStrip16 does not apply (no AVX-512, or a module width not a multiple of 16). Small
// matmuls like these are bound by reading B from the outer caches: k runs in L1-sized chunks of B that
// every register tile reuses (the sparse QKV kernel went from ~90 to ~55 us per layer, docs/kernels.md); every tile prefetches
// B's row kGemmPrefetchRows ahead (it is the first row tile of a chunk, reading it from memory, that needs
// it); with AVX-512 the tiles are 8 x 32 (GemmTile32), else 6 x 16.
// Each C element's sum still runs over k in order, whatever the tiling.
inline void Gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                 int64_t k, int64_t n) {
  int64_t j_done = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // k in chunks whose rows of B fit the L1 cache: every tile reuses a chunk from L1, so B is read from
  // the outer caches once, not once per row tile.
  const int64_t kc = std::max<int64_t>(1, 16384 / (static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(n, 1)));
  j_done = n / 16 * 16;
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t kk = std::min(kc, k - k0);
    const float* b = B + k0 * ldb;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 32 <= j_done; j += 32) TileStrip<32, 8>(A + k0, lda, b + j, ldb, C + j, ldc, rows, kk);  // AVX-512 first
#endif
    for (; j < j_done; j += 16) TileStrip<16, 6>(A + k0, lda, b + j, ldb, C + j, ldc, rows, kk);
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {  // leftover columns (all columns without AVX2)
    for (int64_t t = 0; t < k; ++t) {
      for (int64_t jj = j_done; jj < n; ++jj) C[i * ldc + jj] += A[i * lda + t] * B[t * ldb + jj];
    }
  }
}

inline void StreamStrip16(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                          int64_t k, const float* next) {
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  for (int64_t i = 0; i < rows; i += 16) {
    WithRowCount<16>(std::min<int64_t>(16, rows - i), [&](auto mr) {
      StreamTile16<decltype(mr)::value>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, k, next);
    });
  }
#else
  (void)next;
  Gemm(A, lda, B, ldb, C, ldc, rows, k, 16);
#endif
}

}  // namespace scaling_sparse

#endif  // SCALING_SPARSE_KERNELS_VECTOR_OPS_H_
