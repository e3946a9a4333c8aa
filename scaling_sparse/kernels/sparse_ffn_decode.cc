// The sparse FFN's decode step (docs/semantics.md §1, docs/kernels.md) as one CPU kernel, called from
// JAX through the XLA FFI (jax.ffi.ffi_call; handler symbol ScalingSparseFfnDecode).
//
// Per row of x [R, d] (R = batch x new tokens; 1 when decoding one sequence):
//   low    = x . C1                      C1 [d, r]
//   logits = low . C2 + cb               C2 [r, f], cb [f], f = B N
//   k_b    = first argmax of logits over block b's N units (as jnp.argmax, layers/argmax.py)
//   y      = b2 + sum_b relu(x . W1[b N + k_b]) W2[b N + k_b]     W1, W2 [f, d] (unit-major)
// The JAX path (SparseFF.decode) runs this as ~12 XLA ops, one of which writes the 2 B gathered rows
// out before the dots read them again; here every weight byte is read once, and a unit whose ReLU is
// 0 does not read its W2 row (exact for finite weights: 0 * w adds nothing).
//
// The blocks are split into `parts` tasks (parallel.h), each computing its blocks' logits (its
// columns of C2), choices and share of y; the shares are added in part order, so the result depends
// on `parts`, not on which thread ran what. Sums run in this file's order, not XLA's, so results match
// the JAX path to rounding (tests/test_cpu_kernels.py).
//
// int8 weights (ScalingSparseFfnDecodeInt8; scaling_sparse/quantize.py): the same steps over int8 C1, C2, W1,
// W2 with float32 scales, one per output channel of C1 and C2 and one per row of W1 and W2; each scale
// multiplies a finished sum (C1's partial sums are added first), so every weight byte is read once as int8.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int8_ops.h"
#include "parallel.h"
#include "vector_ops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using scaling_sparse::Axpy;
using scaling_sparse::Dot;

// A weight store of the kernel: float32 values, or int8 values with a float32 scale per output channel
// (C1, C2) or per row (W1, W2); `scale` is null for float32.
template <class W>
struct Stored {
  const W* values;
  const float* scale;
};

// Blocks [b0, b1) of one row: logits, first-max choices into units[b], and sum_b relu(.) W2 rows into y.
template <class W>
void FfnBlocks(const float* x, const float* low, Stored<W> c2, const float* cb, Stored<W> w1, Stored<W> w2,
               int64_t d, int64_t r, int64_t f, int64_t n_elements, int64_t b0, int64_t b1, int32_t* units, float* y) {
  const int64_t col0 = b0 * n_elements, cols = (b1 - b0) * n_elements;
  float* logits = scaling_sparse::Scratch(0, cols);
  if (c2.scale) {
    std::fill(logits, logits + cols, 0.0f);
  } else {
    std::memcpy(logits, cb + col0, sizeof(float) * cols);
  }
  // Four rows of C2 per pass: four memory streams in flight (measured ~10% faster than one, docs/kernels.md).
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) scaling_sparse::Axpy4(low + k, c2.values + k * f + col0, f, logits, cols);
  for (; k < r; ++k) Axpy(low[k], c2.values + k * f + col0, logits, cols);
  if (c2.scale) {
    for (int64_t j = 0; j < cols; ++j) logits[j] = cb[col0 + j] + c2.scale[col0 + j] * logits[j];
  }
  for (int64_t b = b0; b < b1; ++b) {
    const float* block = logits + (b - b0) * n_elements;
    int64_t best = 0;
    for (int64_t n = 1; n < n_elements; ++n) {
      if (block[n] > block[best]) best = n;
    }
    units[b] = static_cast<int32_t>(best);
  }
  // The chosen rows lie far apart, so the hardware prefetcher cannot see them coming: each block's two
  // rows are prefetched kAhead blocks before they are read.
  auto prefetch_rows = [&](int64_t b) {
    const int64_t unit = b * n_elements + units[b];
    const char* a = reinterpret_cast<const char*>(w1.values + unit * d);
    const char* c = reinterpret_cast<const char*>(w2.values + unit * d);
    for (int64_t byte = 0; byte < d * static_cast<int64_t>(sizeof(W)); byte += 64) {
      __builtin_prefetch(a + byte, 0, 0);
      __builtin_prefetch(c + byte, 0, 0);
    }
  };
  constexpr int64_t kAhead = 2;
  for (int64_t b = b0; b < std::min(b0 + kAhead, b1); ++b) prefetch_rows(b);
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kAhead < b1) prefetch_rows(b + kAhead);
    const int64_t unit = b * n_elements + units[b];
    float h = Dot(x, w1.values + unit * d, d);
    if (w1.scale) h *= w1.scale[unit];
    if (h > 0.0f) Axpy(w2.scale ? h * w2.scale[unit] : h, w2.values + unit * d, y, d);
  }
}

template <class W>
ffi::Error FfnDecode(ffi::ThreadPool& pool, const float* x, int64_t rows, int64_t d, Stored<W> c1, int64_t r,
                     Stored<W> c2, int64_t f, const float* cb, Stored<W> w1, Stored<W> w2, const float* b2,
                     float* y, int32_t* units, int64_t n_elements, int64_t parts) {
  const int64_t blocks = f / n_elements;
  parts = std::max<int64_t>(1, std::min(parts, blocks));
  // The calling thread's scratch (slots the tasks, which use slots 0 and 1, leave alone): no allocation
  // per call.
  float* low_shares = scaling_sparse::Scratch(6, parts * r);
  float* shares = scaling_sparse::Scratch(7, parts * d);
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * d;
    int32_t* ur = units + row * blocks;
    std::fill(low_shares, low_shares + parts * r, 0.0f);
    std::fill(shares, shares + parts * d, 0.0f);
    // One fork, two phases (parallel.h ForkJoinPhases).
    scaling_sparse::ForkJoinPhases(pool, parts, 2, [&](int phase, int64_t p) {
      if (phase == 0) {
        // The controller's first matmul ([d] x [d, r]): each task reads its share of C1's rows (C1 is
        // ~0.4 MB at the medium size: one thread alone took ~25 us for it).
        const int64_t i0 = d * p / parts, i1 = d * (p + 1) / parts;
        float* share = low_shares + p * r;
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4) scaling_sparse::Axpy4(xr + i, c1.values + i * r, r, share, r);
        for (; i < i1; ++i) Axpy(xr[i], c1.values + i * r, share, r);
        return;
      }
      // Every task adds the shares in part order itself (r floats; no third phase for it).
      float* low = scaling_sparse::Scratch(1, r);
      std::fill(low, low + r, 0.0f);
      for (int64_t q = 0; q < parts; ++q) Axpy(1.0f, low_shares + q * r, low, r);
      if (c1.scale) {
        for (int64_t j = 0; j < r; ++j) low[j] *= c1.scale[j];
      }
      FfnBlocks(xr, low, c2, cb, w1, w2, d, r, f, n_elements, blocks * p / parts, blocks * (p + 1) / parts, ur,
                shares + p * d);
    });
    float* yr = y + row * d;
    std::memcpy(yr, b2, sizeof(float) * d);
    for (int64_t p = 0; p < parts; ++p) Axpy(1.0f, shares + p * d, yr, d);
  }
  return ffi::Error::Success();
}

// Shapes of either kernel's arguments; x [R, d], c1 [d, r], c2 [r, f], w1 and w2 [f, d], cb [f], b2 [d].
ffi::Error CheckShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> c1d, ffi::Span<const int64_t> c2d,
                       ffi::Span<const int64_t> w1d, ffi::Span<const int64_t> w2d, size_t cb_count, size_t b2_count,
                       int64_t n_elements) {
  if (xd.size() != 2 || c1d.size() != 2 || c2d.size() != 2 || w1d.size() != 2 || w2d.size() != 2) {
    return ffi::Error::InvalidArgument("sparse_ffn_decode: x, c1, c2, w1, w2 must be 2-D");
  }
  const int64_t d = xd[1], r = c1d[1], f = c2d[1];
  if (n_elements < 1 || f % n_elements != 0 || c1d[0] != d || c2d[0] != r || w1d[0] != f || w1d[1] != d ||
      w2d[0] != f || w2d[1] != d || cb_count != static_cast<size_t>(f) || b2_count != static_cast<size_t>(d)) {
    return ffi::Error::InvalidArgument("sparse_ffn_decode: inconsistent shapes");
  }
  return ffi::Error::Success();
}

ffi::Error SparseFfnDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c1,
                               ffi::Buffer<ffi::F32> c2, ffi::Buffer<ffi::F32> cb, ffi::Buffer<ffi::F32> w1,
                               ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y,
                               ffi::ResultBuffer<ffi::S32> units, int64_t n_elements, int64_t parts) {
  if (ffi::Error e = CheckShapes(x.dimensions(), c1.dimensions(), c2.dimensions(), w1.dimensions(), w2.dimensions(),
                                 cb.element_count(), b2.element_count(), n_elements);
      e.failure()) {
    return e;
  }
  using F = Stored<float>;
  return FfnDecode(pool, x.typed_data(), x.dimensions()[0], x.dimensions()[1], F{c1.typed_data(), nullptr},
                   c1.dimensions()[1], F{c2.typed_data(), nullptr}, c2.dimensions()[1], cb.typed_data(),
                   F{w1.typed_data(), nullptr}, F{w2.typed_data(), nullptr}, b2.typed_data(), y->typed_data(),
                   units->typed_data(), n_elements, parts);
}

ffi::Error SparseFfnDecodeInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> c1,
                                   ffi::Buffer<ffi::F32> c1_scale, ffi::Buffer<ffi::S8> c2,
                                   ffi::Buffer<ffi::F32> c2_scale, ffi::Buffer<ffi::F32> cb, ffi::Buffer<ffi::S8> w1,
                                   ffi::Buffer<ffi::F32> w1_scale, ffi::Buffer<ffi::S8> w2,
                                   ffi::Buffer<ffi::F32> w2_scale, ffi::Buffer<ffi::F32> b2,
                                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S32> units,
                                   int64_t n_elements, int64_t parts) {
  if (ffi::Error e = CheckShapes(x.dimensions(), c1.dimensions(), c2.dimensions(), w1.dimensions(), w2.dimensions(),
                                 cb.element_count(), b2.element_count(), n_elements);
      e.failure()) {
    return e;
  }
  const int64_t r = c1.dimensions()[1], f = c2.dimensions()[1];
  if (c1_scale.element_count() != static_cast<size_t>(r) || c2_scale.element_count() != static_cast<size_t>(f) ||
      w1_scale.element_count() != static_cast<size_t>(f) || w2_scale.element_count() != static_cast<size_t>(f)) {
    return ffi::Error::InvalidArgument("sparse_ffn_decode_int8: a scale per output channel of c1, c2, per row of w1, w2");
  }
  using Q = Stored<int8_t>;
  return FfnDecode(pool, x.typed_data(), x.dimensions()[0], x.dimensions()[1],
                   Q{c1.typed_data(), c1_scale.typed_data()}, r, Q{c2.typed_data(), c2_scale.typed_data()}, f,
                   cb.typed_data(), Q{w1.typed_data(), w1_scale.typed_data()}, Q{w2.typed_data(), w2_scale.typed_data()},
                   b2.typed_data(), y->typed_data(), units->typed_data(), n_elements, parts);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseFfnDecode, SparseFfnDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c1 [d, r]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c2 [r, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cb [f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1 [f, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2 [f, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 [d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, d]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // units [R, B]: the chosen unit per block
                                  .Attr<int64_t>("n_elements")
                                  .Attr<int64_t>("parts"));  // blocks split into this many tasks

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseFfnDecodeInt8, SparseFfnDecodeInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, d]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // c1 [d, r]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [r]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // c2 [r, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cb [f]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // w1 [f, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its row scales [f]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // w2 [f, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its row scales [f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 [d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, d]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // units [R, B]
                                  .Attr<int64_t>("n_elements")
                                  .Attr<int64_t>("parts"));
