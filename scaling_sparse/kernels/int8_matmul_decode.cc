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
// The N outputs are split into `parts` column ranges (parallel.h; a matrix too narrow for that splits its
// rows), each output computed whole by one task: every sum runs over k in order whatever `parts` is, so the
// results do not depend on the thread count. InOut keeps a register tile of rows x columns over all of k
// (each widened weight vector serves every row of the tile); OutIn keeps vector accumulators over k per row,
// added lane by lane at the end (int8_ops.h).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int8_ops.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kColumnAlign = 64;  // column ranges start on a cache line of q's rows

using scaling_sparse::int8::Vec;
using scaling_sparse::int8::kLanes;

// y[i, c] = scale[c] * sum_t x[i, t] q[t, c] for R rows and NV vectors of columns: the R x NV accumulators stay
// in registers over all k, each weight vector is widened once and used by the R rows. Sums run over t in order.
template <int R, int NV>
inline void TileInOut(const float* x, int64_t ldx, const int8_t* __restrict q, int64_t ld, int64_t k,
                      const float* scale, float* y, int64_t ldy) {
  namespace v8 = scaling_sparse::int8;
  Vec acc[R][NV];
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = v8::Zero();
  }
  for (int64_t t = 0; t < k; ++t) {
    const int8_t* row = q + t * ld;
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = v8::Widen(row + v * kLanes);
    for (int i = 0; i < R; ++i) {
      const Vec s = v8::Broadcast(x[i * ldx + t]);
      for (int v = 0; v < NV; ++v) acc[i][v] = v8::Fma(s, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < NV; ++v) v8::Store(y + i * ldy + v * kLanes, v8::Mul(acc[i][v], v8::Load(scale + v * kLanes)));
  }
}

// The same for `cols` (< one tile) columns, one at a time.
inline void ColumnsInOut(const float* x, int64_t ldx, int64_t rows, const int8_t* q, int64_t ld, int64_t k,
                         int64_t cols, const float* scale, float* y, int64_t ldy) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      float sum = 0.0f;
      for (int64_t t = 0; t < k; ++t) sum += x[i * ldx + t] * static_cast<float>(q[t * ld + c]);
      y[i * ldy + c] = sum * scale[c];
    }
  }
}

// Rows [0, R) of x against columns [j0, j1) of q [k, n]: tiles of NV vectors, then the rest.
template <int R, int NV>
inline void RowsInOut(const float* x, int64_t k, const int8_t* q, int64_t n, const float* scale, float* y,
                      int64_t j0, int64_t j1) {
  constexpr int64_t width = NV * kLanes;
  int64_t j = j0;
  for (; j + width <= j1; j += width) TileInOut<R, NV>(x, k, q + j, n, k, scale + j, y + j, n);
  if (j < j1) ColumnsInOut(x, k, R, q + j, n, k, j1 - j, scale + j, y + j, n);
}

// One row against at least this many columns streams the weights row by row (StreamInOut). Measured with a
// working set beyond the caches (48 matrices, 2026-12-07, while another job ran): [1024, 4096] 12.1 GB/s of
// int8 streamed against 5.5 in register tiles, [4096, 1024] 9.9 against 7.4, [9216, 40960] (a 17B FFN matrix)
// 14.8 against 5.0; the tiles read each row of q in 64-byte pieces a whole matrix apart (a page, and a TLB
// miss, per piece on wide matrices).
constexpr int64_t kStreamColumns = 256;

// y[j] = scale[j] * sum_t x[t] q[t, j] for columns [j0, j1) of one row of x, streaming q's rows in order (four at
// a time, int8_ops.h Axpy4) into float sums held in this thread's scratch.
inline void StreamInOut(const float* x, int64_t k, const int8_t* q, int64_t n, const float* scale, float* y,
                        int64_t j0, int64_t j1) {
  const int64_t cols = j1 - j0;
  float* acc = scaling_sparse::Scratch(0, cols);
  std::fill(acc, acc + cols, 0.0f);
  int64_t t = 0;
  for (; t + 4 <= k; t += 4) {
    if (t + 8 <= k) {  // the rows after next, one line per 64 columns
      for (int64_t c = 0; c < cols; c += 64) {
        for (int64_t u = 8; u < 12 && t + u < k; ++u) __builtin_prefetch(q + (t + u) * n + j0 + c, 0, 2);
      }
    }
    scaling_sparse::Axpy4(x + t, q + t * n + j0, n, acc, cols);
  }
  for (; t < k; ++t) scaling_sparse::Axpy(x[t], q + t * n + j0, acc, cols);
  for (int64_t c = 0; c < cols; ++c) y[j0 + c] = acc[c] * scale[j0 + c];
}

// y[i, j + u] = scale[j + u] * sum_t x[i, t] q[j + u, t] for R rows of x and U weight rows: R x U pairs of two
// vector accumulators over k (lanes added in order at the end); each x vector loaded once for the U weight rows,
// each weight vector widened once for the R rows.
template <int R, int U>
inline void DotRows(const float* x, int64_t ldx, const int8_t* __restrict q, int64_t k, const float* scale, float* y,
                    int64_t ldy) {
  namespace v8 = scaling_sparse::int8;
  Vec acc[R][U];
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < U; ++u) acc[i][u] = v8::Zero();
  }
  int64_t t = 0;
  for (; t + kLanes <= k; t += kLanes) {
    Vec w[U];
    for (int u = 0; u < U; ++u) w[u] = v8::Widen(q + u * k + t);
    for (int i = 0; i < R; ++i) {
      const Vec a = v8::Load(x + i * ldx + t);
      for (int u = 0; u < U; ++u) acc[i][u] = v8::Fma(a, w[u], acc[i][u]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < U; ++u) {
      float total = v8::SumLanes(acc[i][u]);
      for (int64_t s = t; s < k; ++s) total += x[i * ldx + s] * static_cast<float>(q[u * k + s]);
      y[i * ldy + u] = total * scale[u];
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
  // Tasks split the columns; a matrix too narrow for that (a sparse-QKV module, 64 wide) splits its row
  // groups of 4 instead. Each output is still one task's sum over k in order.
  const int64_t column_parts = std::max<int64_t>(1, std::min(parts, (n + kColumnAlign - 1) / kColumnAlign));
  const int64_t row_groups = (rows + 3) / 4;
  const int64_t row_parts = column_parts == 1 ? std::max<int64_t>(1, std::min(parts, row_groups)) : 1;
  const float* xs = x.typed_data();
  const int8_t* qs = q.typed_data();
  const float* ss = scale.typed_data();
  float* ys = y->typed_data();
  scaling_sparse::ForkJoin(pool, column_parts * row_parts, [&](int64_t p) {
    const int64_t cp = p % column_parts, rp = p / column_parts;
    const int64_t j0 = ColumnStart(n, column_parts, cp), j1 = ColumnStart(n, column_parts, cp + 1);
    const int64_t r1 = std::min(rows, 4 * (row_groups * (rp + 1) / row_parts));
    int64_t r = 4 * (row_groups * rp / row_parts);
    if (j1 <= j0) return;
    // A single row of x over a wide column range (a decode step through a big matrix): the weights stream
    // row by row, four rows of q at a time, into float sums of the range (L1/L2-resident), so memory is read
    // in order, page by page. Otherwise register tiles (several rows share each widened weight vector).
    if (rows == 1 && j1 - j0 >= kStreamColumns) {
      StreamInOut(xs, k, qs, n, ss, ys, j0, j1);
      return;
    }
    for (; r + 4 <= r1; r += 4) RowsInOut<4, 2>(xs + r * k, k, qs, n, ss, ys + r * n, j0, j1);
    for (; r + 2 <= r1; r += 2) RowsInOut<2, 2>(xs + r * k, k, qs, n, ss, ys + r * n, j0, j1);
    for (; r < r1; ++r) RowsInOut<1, 4>(xs + r * k, k, qs, n, ss, ys + r * n, j0, j1);
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
    // Four weight rows at a time against four rows of x (each read once, widened once for every row of x).
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const int8_t* w = qs + j * k;
      if (j + 8 <= j1) __builtin_prefetch(w + 8 * k, 0, 0);
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) DotRows<4, 4>(xs + r * k, k, w, k, ss + j, ys + r * n + j, n);
      for (; r < rows; ++r) DotRows<1, 4>(xs + r * k, k, w, k, ss + j, ys + r * n + j, n);
    }
    for (; j < j1; ++j) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) DotRows<4, 1>(xs + r * k, k, qs + j * k, k, ss + j, ys + r * n + j, n);
      for (; r < rows; ++r) DotRows<1, 1>(xs + r * k, k, qs + j * k, k, ss + j, ys + r * n + j, n);
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
