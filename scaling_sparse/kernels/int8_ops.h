// Vector primitives over int8 weights (docs/kernels.md, "int8 weights"; scaling_sparse/quantize.py): each
// weight byte is widened to float32 in registers and multiply-added into float32 sums. Plain loops the
// compiler vectorises under -march=native (sign-extend, convert, FMA); sums that reduce over the int8
// values keep one accumulator per lane, so no reassociation is needed to vectorise them.
#ifndef SCALING_SPARSE_KERNELS_INT8_OPS_H_
#define SCALING_SPARSE_KERNELS_INT8_OPS_H_

#include <cstdint>

namespace scaling_sparse {

// out[j] += s * v[j], j < n.
inline void Axpy(float s, const int8_t* __restrict v, float* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += s * static_cast<float>(v[j]);
}

// out[j] += s[0] v[j] + s[1] v[ld + j] + s[2] v[2 ld + j] + s[3] v[3 ld + j]: four weight rows in flight.
inline void Axpy4(const float* s, const int8_t* __restrict v, int64_t ld, float* __restrict out, int64_t n) {
  const float s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
  const int8_t* __restrict v0 = v;
  const int8_t* __restrict v1 = v + ld;
  const int8_t* __restrict v2 = v + 2 * ld;
  const int8_t* __restrict v3 = v + 3 * ld;
  for (int64_t j = 0; j < n; ++j) {
    out[j] += s0 * static_cast<float>(v0[j]) + s1 * static_cast<float>(v1[j]) + s2 * static_cast<float>(v2[j]) +
              s3 * static_cast<float>(v3[j]);
  }
}

// sum_i x[i] q[i]: 16 lane sums, added in lane order, then the tail.
inline float Dot(const float* __restrict x, const int8_t* __restrict q, int64_t n) {
  float lanes[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += x[i + l] * static_cast<float>(q[i + l]);
  }
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (; i < n; ++i) total += x[i] * static_cast<float>(q[i]);
  return total;
}

}  // namespace scaling_sparse

#endif  // SCALING_SPARSE_KERNELS_INT8_OPS_H_
