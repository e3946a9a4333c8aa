// Vector primitives shared by the CPU decode kernels (docs/kernels.md): AVX2 + FMA where the compiler
// targets it (-march=native on such a machine), plain loops otherwise.
#ifndef SCALING_SPARSE_KERNELS_VECTOR_OPS_H_
#define SCALING_SPARSE_KERNELS_VECTOR_OPS_H_

#include <cstdint>

namespace scaling_sparse {

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

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

#endif

}  // namespace scaling_sparse

#endif  // SCALING_SPARSE_KERNELS_VECTOR_OPS_H_
