// Weight-only int8 matmuls for decoding (docs/kernels.md, "int8 weights"; scaling_sparse/quantize.py), called
// from JAX through the XLA FFI (handler symbols ScalingSparseInt8MatmulInOut and ScalingSparseInt8MatmulOutIn).
//
//   InOut:  y[r, n] = scale[n] * sum_k x[r, k] q[k, n]     q [K, N]: dense kernels (a scale per output channel),
//                                                          the controller's factors, the convolutions
//   OutIn:  y[r, n] = scale[n] * sum_k x[r, k] q[n, k]     q [N, K]: the multiplicative output layer's
//                                                          unit-major kernel (a scale per row)
//
// XLA's CPU backend turns an int8 weight into a float32 copy before a dot, so an int8 model decoded by XLA
// writes and reads 5 bytes per weight per token instead of reading 1. These read each int8 weight once,
// widen it in registers and multiply-add it into float32 sums; the scale multiplies each sum once.
//
// The N outputs are split into `parts` column ranges (parallel.h), each computed whole by one task: every
// sum runs over k in order whatever `parts` is, so the results do not depend on the thread count. Sums of
// one output over k use one accumulator per SIMD lane (InOut: the lanes are outputs; OutIn: 16 lanes over
// k, added in lane order at the end), so the compiler vectorises them without reassociating anything.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int8_ops.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowTile = 4;     // rows of x sharing one pass over the weights
constexpr int64_t kColumnAlign = 64;  // column ranges start on a cache line of q's rows

// acc[i][j] += sum_t x[i][k0 + t] q[(k0 + t), j] over four k at once (four weight rows in flight), for
// `rows` (<= kRowTile) rows of x, columns j < n of q (leading dimension ld).
template <int R>
inline void AccumulateInOut(const float* x, int64_t ldx, const int8_t* __restrict q, int64_t ld, int64_t k,
                            float* __restrict acc, int64_t n) {
  int64_t t = 0;
  for (; t + 4 <= k; t += 4) {
    const int8_t* __restrict q0 = q + t * ld;
    const int8_t* __restrict q1 = q0 + ld;
    const int8_t* __restrict q2 = q1 + ld;
    const int8_t* __restrict q3 = q2 + ld;
    for (int i = 0; i < R; ++i) {
      const float s0 = x[i * ldx + t], s1 = x[i * ldx + t + 1], s2 = x[i * ldx + t + 2], s3 = x[i * ldx + t + 3];
      float* __restrict a = acc + i * n;
      for (int64_t j = 0; j < n; ++j) {
        a[j] += s0 * static_cast<float>(q0[j]) + s1 * static_cast<float>(q1[j]) + s2 * static_cast<float>(q2[j]) +
                s3 * static_cast<float>(q3[j]);
      }
    }
  }
  for (; t < k; ++t) {
    const int8_t* __restrict q0 = q + t * ld;
    for (int i = 0; i < R; ++i) {
      const float s0 = x[i * ldx + t];
      float* __restrict a = acc + i * n;
      for (int64_t j = 0; j < n; ++j) a[j] += s0 * static_cast<float>(q0[j]);
    }
  }
}

ffi::Error Check(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S8>& q, const ffi::Buffer<ffi::F32>& scale,
                 bool transposed, int64_t* rows, int64_t* k, int64_t* n) {
  const auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("int8_matmul: x and q must be 2-D");
  *rows = xd[0];
  *k = xd[1];
  *n = transposed ? qd[0] : qd[1];
  if ((transposed ? qd[1] : qd[0]) != *k || scale.element_count() != static_cast<size_t>(*n)) {
    return ffi::Error::InvalidArgument("int8_matmul: inconsistent shapes");
  }
  return ffi::Error::Success();
}

// Column ranges of `parts` tasks over n outputs, starting on multiples of kColumnAlign.
inline int64_t ColumnStart(int64_t n, int64_t parts, int64_t p) {
  if (p >= parts) return n;
  const int64_t start = n * p / parts;
  return std::min(n, (start + kColumnAlign - 1) / kColumnAlign * kColumnAlign);
}

ffi::Error Int8MatmulInOutImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                               ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t parts) {
  int64_t rows, k, n;
  if (ffi::Error e = Check(x, q, scale, false, &rows, &k, &n); e.failure()) return e;
  parts = std::max<int64_t>(1, std::min(parts, (n + kColumnAlign - 1) / kColumnAlign));
  const float* xs = x.typed_data();
  const int8_t* qs = q.typed_data();
  const float* ss = scale.typed_data();
  float* ys = y->typed_data();
  scaling_sparse::ForkJoin(pool, parts, [&](int64_t p) {
    const int64_t j0 = ColumnStart(n, parts, p), j1 = ColumnStart(n, parts, p + 1), cols = j1 - j0;
    if (cols <= 0) return;
    float* acc = scaling_sparse::Scratch(0, kRowTile * cols);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      const int64_t tile = std::min(kRowTile, rows - r0);
      std::fill(acc, acc + tile * cols, 0.0f);
      const float* xr = xs + r0 * k;
      switch (tile) {
        case 4: AccumulateInOut<4>(xr, k, qs + j0, n, k, acc, cols); break;
        case 3: AccumulateInOut<3>(xr, k, qs + j0, n, k, acc, cols); break;
        case 2: AccumulateInOut<2>(xr, k, qs + j0, n, k, acc, cols); break;
        default: AccumulateInOut<1>(xr, k, qs + j0, n, k, acc, cols); break;
      }
      for (int64_t i = 0; i < tile; ++i) {
        float* out = ys + (r0 + i) * n + j0;
        for (int64_t j = 0; j < cols; ++j) out[j] = acc[i * cols + j] * ss[j0 + j];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Int8MatmulOutInImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                               ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t parts) {
  int64_t rows, k, n;
  if (ffi::Error e = Check(x, q, scale, true, &rows, &k, &n); e.failure()) return e;
  parts = std::max<int64_t>(1, std::min(parts, n));
  const float* xs = x.typed_data();
  const int8_t* qs = q.typed_data();
  const float* ss = scale.typed_data();
  float* ys = y->typed_data();
  scaling_sparse::ForkJoin(pool, parts, [&](int64_t p) {
    const int64_t j0 = n * p / parts, j1 = n * (p + 1) / parts;
    for (int64_t j = j0; j < j1; ++j) {  // each weight row read once, used by every row of x (in cache)
      const int8_t* row = qs + j * k;
      if (j + 2 < j1) __builtin_prefetch(row + 2 * k, 0, 0);
      for (int64_t r = 0; r < rows; ++r) ys[r * n + j] = scaling_sparse::Dot(xs + r * k, row, k) * ss[j];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseInt8MatmulInOut, Int8MatmulInOutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q [K, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, N]
                                  .Attr<int64_t>("parts"));      // column ranges (tasks)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseInt8MatmulOutIn, Int8MatmulOutInImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q [N, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, N]
                                  .Attr<int64_t>("parts"));
