// Vector primitives over int8 weights (docs/kernels.md, "int8 weights"; scaling_sparse/quantize.py): each
// weight byte is widened to float32 in a register and multiply-added into float32 sums, never written back
// as float32. 512-bit vectors where the compiler targets AVX-512, 256-bit with AVX2 + FMA, scalar otherwise.
// Every sum runs in a fixed order (lane sums are added lane by lane at the end), independent of threads.
#ifndef SCALING_SPARSE_KERNELS_INT8_OPS_H_
#define SCALING_SPARSE_KERNELS_INT8_OPS_H_

#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>  // outside the namespace: its declarations belong to the global one
#endif

namespace scaling_sparse {
namespace int8 {

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Widen(const int8_t* p) {  // 16 int8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(float s) { return _mm512_set1_ps(s); }
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Widen(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(float s) { return _mm256_set1_ps(s); }
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
#else
using Vec = float;
constexpr int kLanes = 1;
inline Vec Widen(const int8_t* p) { return static_cast<float>(*p); }
inline Vec Load(const float* p) { return *p; }
inline void Store(float* p, Vec v) { *p = v; }
inline Vec Broadcast(float s) { return s; }
inline Vec Zero() { return 0.0f; }
inline Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec Add(Vec a, Vec b) { return a + b; }
inline Vec Mul(Vec a, Vec b) { return a * b; }
#endif

// The lanes of v added in lane order.
inline float SumLanes(Vec v) {
  float lanes[kLanes];
  Store(lanes, v);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace int8

// out[j] += s * v[j], j < n.
inline void Axpy(float s, const int8_t* __restrict v, float* __restrict out, int64_t n) {
  using namespace int8;
  const Vec sv = Broadcast(s);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) Store(out + j, Fma(sv, Widen(v + j), Load(out + j)));
  for (; j < n; ++j) out[j] += s * static_cast<float>(v[j]);
}

// out[j] += s[0] v[j] + s[1] v[ld + j] + s[2] v[2 ld + j] + s[3] v[3 ld + j]: four weight rows in flight,
// `out` loaded and stored once per four rows.
inline void Axpy4(const float* s, const int8_t* __restrict v, int64_t ld, float* __restrict out, int64_t n) {
  using namespace int8;
  const Vec s0 = Broadcast(s[0]), s1 = Broadcast(s[1]), s2 = Broadcast(s[2]), s3 = Broadcast(s[3]);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Vec o = Load(out + j);
    o = Fma(s0, Widen(v + j), o);
    o = Fma(s1, Widen(v + ld + j), o);
    o = Fma(s2, Widen(v + 2 * ld + j), o);
    o = Fma(s3, Widen(v + 3 * ld + j), o);
    Store(out + j, o);
  }
  for (; j < n; ++j) {
    out[j] = (((out[j] + s[0] * v[j]) + s[1] * v[ld + j]) + s[2] * v[2 * ld + j]) + s[3] * v[3 * ld + j];
  }
}

// sum_i x[i] q[i]: two vector accumulators, their lanes added in order, then the tail.
inline float Dot(const float* __restrict x, const int8_t* __restrict q, int64_t n) {
  using namespace int8;
  Vec a0 = Zero(), a1 = Zero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    a0 = Fma(Load(x + i), Widen(q + i), a0);
    a1 = Fma(Load(x + i + kLanes), Widen(q + i + kLanes), a1);
  }
  for (; i + kLanes <= n; i += kLanes) a0 = Fma(Load(x + i), Widen(q + i), a0);
  float total = SumLanes(Add(a0, a1));
  for (; i < n; ++i) total += x[i] * static_cast<float>(q[i]);
  return total;
}

// C[rows, n] += A[rows, k] . B[k, n] for int8 B, one strip of NV vectors of columns at column j: tiles of 4 rows
// x NV vectors kept in registers over all k, each widened weight vector used by the 4 rows.
template <int RT, int NV>
inline void GemmInt8Tile(const float* A, int64_t lda, const int8_t* B, int64_t ldb, float* C, int64_t ldc, int64_t k,
                         int64_t j) {
  using namespace int8;
  Vec acc[RT][NV];
  for (int i = 0; i < RT; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = Load(C + i * ldc + j + v * kLanes);
  }
  for (int64_t t = 0; t < k; ++t) {
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = Widen(B + t * ldb + j + v * kLanes);
    for (int i = 0; i < RT; ++i) {
      const Vec a = Broadcast(A[i * lda + t]);
      for (int v = 0; v < NV; ++v) acc[i][v] = Fma(a, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < RT; ++i) {
    for (int v = 0; v < NV; ++v) Store(C + i * ldc + j + v * kLanes, acc[i][v]);
  }
}

// Rows in tiles of 8 (AVX-512: 16 accumulators of 32 registers, so the multiply-adds, not the widening or the
// broadcasts, set the pace), then 4, then one at a time.
template <int NV>
inline void GemmInt8Strip(const float* A, int64_t lda, const int8_t* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t rows, int64_t k, int64_t j) {
  using namespace int8;
  int64_t r = 0;
  if constexpr (kLanes == 16) {
    for (; r + 8 <= rows; r += 8) GemmInt8Tile<8, NV>(A + r * lda, lda, B, ldb, C + r * ldc, ldc, k, j);
  }
  for (; r + 4 <= rows; r += 4) GemmInt8Tile<4, NV>(A + r * lda, lda, B, ldb, C + r * ldc, ldc, k, j);
  for (; r < rows; ++r) GemmInt8Tile<1, NV>(A + r * lda, lda, B, ldb, C + r * ldc, ldc, k, j);
}

// C[rows, n] += A[rows, k] . B[k, n] for int8 B (row-major, leading dimensions lda, ldb, ldc; the scales of B's
// columns are the caller's to apply): strips of two vectors of columns, then one vector, then single columns
// (fewer than a vector). Each C element's sum runs over k in order.
inline void GemmInt8(const float* A, int64_t lda, const int8_t* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                     int64_t k, int64_t n) {
  using int8::kLanes;
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) GemmInt8Strip<2>(A, lda, B, ldb, C, ldc, rows, k, j);
  for (; j + kLanes <= n; j += kLanes) GemmInt8Strip<1>(A, lda, B, ldb, C, ldc, rows, k, j);
  for (; j < n; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      float sum = C[r * ldc + j];
      for (int64_t t = 0; t < k; ++t) sum += A[r * lda + t] * static_cast<float>(B[t * ldb + j]);
      C[r * ldc + j] = sum;
    }
  }
}

}  // namespace scaling_sparse

#endif  // SCALING_SPARSE_KERNELS_INT8_OPS_H_
