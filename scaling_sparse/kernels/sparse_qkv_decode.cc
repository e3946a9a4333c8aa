// Sparse QKV's decode step for one new position (docs/semantics.md §2, docs/kernels.md) as one CPU
// kernel, called from JAX through the XLA FFI (handler symbol ScalingSparseQkvDecode).
//
// Per row of x [R, d] (R = batch; one new token each), with S modules of M units (d = S M):
//   h[s, m]    = sum_i x_i D[s, i] E[i, m] + bias[s M + m]          the multiplicative layer
//   H          = [history (kl-1 rows) ; h]                           [kl, S, M]
//   out_c[s]   = bias_c + sum_{i < kl, j < ks} H[i, s + j - (ks-1)/2] . K_c[i, j]   (zero past the edges)
// for c in (q, k, v), each K_c [kl, ks_c, M, M], and the new history H[1:]. The JAX path
// (SparseQKV.decode) runs this as ~25 XLA ops whose small matmuls each run on one core; here it is one
// fork of `parts` tasks in two phases (parallel.h ForkJoinPhases):
//   0. each task gates its share of the inputs i (rows of E) and multiplies them by those rows of E, for
//      all modules and columns: a partial h. No task waits for another's gated inputs, and each reads a
//      contiguous share of E;
//   1. each task sums the partials (bias first, then the partials in task order: every task gets the same
//      h), builds the window H with zero rows past the edges, and computes its 16-column strips of q, k, v,
//      one register tile of (up to 16) modules per strip over every (position, neighbour) tap.
// The matmuls are vector_ops.h StreamStrip16 (16 modules per tile, the next chunk's weights prefetched
// while this one computes; Gemm in builds without AVX-512), Gemm where M is not a multiple of 16.
// Results match the JAX path to rounding (tests/test_cpu_kernels.py).
//
// int8 weights (ScalingSparseQkvDecodeInt8; scaling_sparse/quantize.py): D, E and the three convolution kernels
// int8, with float32 scales per module row of D, per column of E and per output channel of each kernel. The
// gated inputs take D's scale; E's and the kernels' scales multiply finished sums (then the biases are added);
// the matmuls are int8_ops.h GemmInt8 (each int8 weight widened in a register, read once).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "int8_ops.h"
#include "parallel.h"
#include "vector_ops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using scaling_sparse::Gemm;
using scaling_sparse::StreamStrip16;

template <class W>
struct Conv {
  const W* kernel;      // [kl, ks, M, M]
  const float* scale;   // [M] per output channel (int8), null for float32
  const float* bias;    // [M]
  int64_t ks;
  float* out;  // [R, S M]
};

// The multiplicative layer's weights: gates D [S, d] (int8: a scale per module row) and E [d, M] (a scale
// per column); scales null for float32.
template <class W>
struct Mult {
  const W* gates;
  const float* gates_scale;
  const W* kernel;
  const float* kernel_scale;
  const float* bias;
};

template <class W>
ffi::Error QkvDecode(ffi::ThreadPool& pool, const float* x, int64_t rows, int64_t d, int64_t S, int64_t M,
                     int64_t hist, Mult<W> mult, const float* history, Conv<W> (&convs)[3], float* new_history,
                     int64_t parts) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  const int64_t kl = hist + 1;
  // Phase 1 splits the columns into 16-column strips (the tiles' width; single columns where M is not a
  // multiple of 16), phase 0 the inputs i into runs of whole 16s.
  // int8 (GemmInt8): strips of whole vectors wherever M allows, so no task gets a scalar remainder it could avoid.
  const bool strips16 = M % 16 == 0;
  const int64_t lanes = scaling_sparse::int8::kLanes;
  const int64_t tile = strips16 ? 16 : (kInt8 && M % lanes == 0 ? lanes : 1);
  const int64_t tiles = M / tile;
  parts = std::max<int64_t>(1, std::min(parts, tiles));
  auto columns = [&](int64_t p) { return std::make_pair(tiles * p / parts * tile, tiles * (p + 1) / parts * tile); };
  auto inputs = [&](int64_t p) { return p == parts ? d : d * p / parts / 16 * 16; };
  const W *pg = mult.gates, *pe = mult.kernel;
  const float* pb = mult.bias;
  // The window's zero rows on each side: the widest convolution's half width.
  int64_t pad = 0;
  for (const Conv<W>& c : convs) pad = std::max(pad, (c.ks - 1) / 2);
  const int64_t window_rows = S + 2 * pad;
  // Inputs per chunk of phase 0: each 16-column strip reuses the gated chunk (S x 128 floats, 8 KB at the
  // medium size) from L1 while its 128 rows of E stream in.
  constexpr int64_t kChunk = 128;
  // Shared by the tasks of one row: the partial h of each task [parts, S, M], in the calling thread's
  // scratch slot 4 (no kernel's tasks use it).
  float* partials = scaling_sparse::Scratch(4, parts * S * M);
  // C[S, n] += A[S, k] . B[k, n] (B's leading dimension M): StreamStrip16 over 16 columns or Gemm for float32
  // weights, GemmInt8 for int8 ones.
  auto matmul = [&](const float* a, int64_t lda, const W* b, float* c, int64_t k, int64_t n, const W* next) {
    if constexpr (kInt8) {
      if (next) {
        for (int64_t byte = 0; byte < k * M; byte += 64) scaling_sparse::PrefetchL2(next + byte);
      }
      scaling_sparse::GemmInt8(a, lda, b, M, c, M, S, k, n);
    } else if (strips16) {
      for (int64_t j = 0; j < n; j += 16) StreamStrip16(a, lda, b + j, M, c + j, M, S, k, next ? next + j : nullptr);
    } else {
      Gemm(a, lda, b, M, c, M, S, k, n);
    }
  };
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * d;
    const float* hr = history + row * hist * d;  // [hist, S, M]
    float* nh = new_history + row * hist * d;
    scaling_sparse::ForkJoinPhases(pool, parts, 2, [&](int phase, int64_t p) {
      if (phase == 0) {
        // gated[s, t] = x[i0 + t] D[s, i0 + t] (task-local), while E's first chunk is prefetched into L2.
        // The row stride is an odd number of 64-byte lines, so the S rows a tile reads fall in different L1
        // sets (rows a multiple of 4 KB apart would share one).
        const int64_t i0 = inputs(p), n = inputs(p + 1) - i0, lines = (n + 15) / 16;
        const int64_t lda = 16 * (lines % 2 == 0 ? lines + 1 : lines);
        float* gated = scaling_sparse::Scratch(2, S * lda);
        const char* first = reinterpret_cast<const char*>(pe + i0 * M);
        const int64_t first_lines = std::min(kChunk, n) * M * static_cast<int64_t>(sizeof(W)) / 64;
        int64_t line = 0;
        for (int64_t s = 0; s < S; ++s) {
          const float gate_scale = kInt8 ? mult.gates_scale[s] : 1.0f;
          for (int64_t t0 = 0; t0 < n; t0 += 16) {
            if (line < first_lines) scaling_sparse::PrefetchL2(first + 64 * line++);
            for (int64_t t = t0; t < std::min(t0 + 16, n); ++t) {
              if constexpr (kInt8) {
                gated[s * lda + t] = xr[i0 + t] * (gate_scale * static_cast<float>(pg[s * d + i0 + t]));
              } else {
                gated[s * lda + t] = xr[i0 + t] * pg[s * d + i0 + t];
              }
            }
          }
        }
        float* part = partials + p * S * M;
        std::memset(part, 0, sizeof(float) * S * M);
        for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
          const int64_t kk = std::min(kChunk, n - k0);
          const W* b = pe + (i0 + k0) * M;
          matmul(gated + k0, lda, b, part, kk, M, k0 + kk < n ? b + kk * M : nullptr);
        }
        // History rows 1.. move up by one (this task's share of the modules).
        const int64_t s0 = S * p / parts, s1 = S * (p + 1) / parts;
        for (int64_t i = 0; i + 1 < hist; ++i) {
          std::memcpy(nh + i * d + s0 * M, hr + (i + 1) * d + s0 * M, sizeof(float) * (s1 - s0) * M);
        }
        return;
      }
      // Phase 1: window [kl, S + 2 pad, M] (task-local): history rows, then h = bias + the partials (int8:
      // bias + E's column scale x the partials' sum).
      const auto [c0, c1] = columns(p);
      float* window = scaling_sparse::Scratch(5, kl * window_rows * M);
      for (int64_t i = 0; i < kl; ++i) {
        float* w = window + i * window_rows * M;
        std::memset(w, 0, sizeof(float) * pad * M);
        std::memset(w + (pad + S) * M, 0, sizeof(float) * pad * M);
        float* body = w + pad * M;
        if (i < hist) {
          std::memcpy(body, hr + i * d, sizeof(float) * d);
          continue;
        }
        if constexpr (kInt8) {
          std::memset(body, 0, sizeof(float) * d);
        } else {
          std::memcpy(body, pb, sizeof(float) * d);
        }
        for (int64_t q = 0; q < parts; ++q) {
          const float* part = partials + q * S * M;
          for (int64_t e = 0; e < d; ++e) body[e] += part[e];
        }
        if constexpr (kInt8) {
          for (int64_t e = 0; e < d; ++e) body[e] = pb[e] + mult.kernel_scale[e % M] * body[e];
        }
        if (hist > 0) {  // h is the new history's last row (this task's columns)
          for (int64_t s = 0; s < S; ++s) {
            std::memcpy(nh + (hist - 1) * d + s * M + c0, body + s * M + c0, sizeof(float) * (c1 - c0));
          }
        }
      }
      // out[s, c0:c1] = bias_c + sum over window position i and neighbour j of window(i)[s + j - half] .
      // K_c[i, j][:, c0:c1], the taps in (i, j) order and each over m in order, as the JAX path adds them;
      // past the edges the window's zero rows add exact zeros. The next tap's (or convolution's) weights
      // are prefetched while this one computes. int8: the taps' sum, then bias_c + scale_c x it.
      for (int c = 0; c < 3; ++c) {
        const Conv<W>& conv = convs[c];
        const int64_t half = (conv.ks - 1) / 2, taps = kl * conv.ks;
        float* out = conv.out + row * d;
        for (int64_t s = 0; s < S; ++s) {
          if constexpr (kInt8) {
            std::memset(out + s * M + c0, 0, sizeof(float) * (c1 - c0));
          } else {
            std::memcpy(out + s * M + c0, conv.bias + c0, sizeof(float) * (c1 - c0));
          }
        }
        for (int64_t n = 0; n < taps; ++n) {
          const int64_t i = n / conv.ks, j = n % conv.ks;
          const float* a = window + (i * window_rows + pad + j - half) * M;
          const W* b = conv.kernel + n * M * M;
          const W* next = n + 1 < taps ? b + M * M : (c + 1 < 3 ? convs[c + 1].kernel : nullptr);
          matmul(a, M, b + c0, out + c0, M, c1 - c0, next ? next + c0 : nullptr);
        }
        if constexpr (kInt8) {
          for (int64_t s = 0; s < S; ++s) {
            for (int64_t m = c0; m < c1; ++m) out[s * M + m] = conv.bias[m] + conv.scale[m] * out[s * M + m];
          }
        }
      }
    });
  }
  return ffi::Error::Success();
}

// Shapes of either kernel's arguments: x [R, d], gates [S, d], kernel [d, M], history [R, kl-1, S, M], biases
// [d] and [M], conv kernels [kl, ks (odd), M, M]. -> the convolutions' ks through `ks`.
ffi::Error CheckShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd, ffi::Span<const int64_t> ed,
                       ffi::Span<const int64_t> hd, size_t bias_count, const size_t (&conv_bias_counts)[3],
                       const ffi::Span<const int64_t> (&kds)[3], int64_t (&ks)[3]) {
  if (xd.size() != 2 || gd.size() != 2 || ed.size() != 2 || hd.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_qkv_decode: x [R, d], gates [S, d], kernel [d, M], history [R, kl-1, S, M]");
  }
  const int64_t rows = xd[0], d = xd[1], S = gd[0], M = ed[1], hist = hd[1];
  if (gd[1] != d || ed[0] != d || S * M != d || hd[0] != rows || hd[2] != S || hd[3] != M ||
      bias_count != static_cast<size_t>(d)) {
    return ffi::Error::InvalidArgument("sparse_qkv_decode: inconsistent shapes");
  }
  for (int c = 0; c < 3; ++c) {
    const auto& kd = kds[c];
    if (kd.size() != 4 || kd[0] != hist + 1 || kd[2] != M || kd[3] != M || kd[1] % 2 != 1 ||
        conv_bias_counts[c] != static_cast<size_t>(M)) {
      return ffi::Error::InvalidArgument("sparse_qkv_decode: conv kernels must be [kl, ks (odd), M, M], biases [M]");
    }
    ks[c] = kd[1];
  }
  return ffi::Error::Success();
}

ffi::Error SparseQkvDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gates,
                               ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> history, ffi::Buffer<ffi::F32> kq, ffi::Buffer<ffi::F32> bq,
                               ffi::Buffer<ffi::F32> kk, ffi::Buffer<ffi::F32> bk, ffi::Buffer<ffi::F32> kv,
                               ffi::Buffer<ffi::F32> bv, ffi::ResultBuffer<ffi::F32> q, ffi::ResultBuffer<ffi::F32> k,
                               ffi::ResultBuffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> new_history,
                               int64_t parts) {
  int64_t ks[3];
  const size_t conv_bias_counts[3] = {bq.element_count(), bk.element_count(), bv.element_count()};
  const ffi::Span<const int64_t> kds[3] = {kq.dimensions(), kk.dimensions(), kv.dimensions()};
  if (ffi::Error e = CheckShapes(x.dimensions(), gates.dimensions(), kernel.dimensions(), history.dimensions(),
                                 bias.element_count(), conv_bias_counts, kds, ks);
      e.failure()) {
    return e;
  }
  Conv<float> convs[3] = {{kq.typed_data(), nullptr, bq.typed_data(), ks[0], q->typed_data()},
                          {kk.typed_data(), nullptr, bk.typed_data(), ks[1], k->typed_data()},
                          {kv.typed_data(), nullptr, bv.typed_data(), ks[2], v->typed_data()}};
  return QkvDecode<float>(pool, x.typed_data(), x.dimensions()[0], x.dimensions()[1], gates.dimensions()[0],
                          kernel.dimensions()[1], history.dimensions()[1],
                          {gates.typed_data(), nullptr, kernel.typed_data(), nullptr, bias.typed_data()},
                          history.typed_data(), convs, new_history->typed_data(), parts);
}

ffi::Error SparseQkvDecodeInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> gates,
                                   ffi::Buffer<ffi::F32> gates_scale, ffi::Buffer<ffi::S8> kernel,
                                   ffi::Buffer<ffi::F32> kernel_scale, ffi::Buffer<ffi::F32> bias,
                                   ffi::Buffer<ffi::F32> history, ffi::Buffer<ffi::S8> kq, ffi::Buffer<ffi::F32> sq,
                                   ffi::Buffer<ffi::F32> bq, ffi::Buffer<ffi::S8> kk, ffi::Buffer<ffi::F32> sk,
                                   ffi::Buffer<ffi::F32> bk, ffi::Buffer<ffi::S8> kv, ffi::Buffer<ffi::F32> sv,
                                   ffi::Buffer<ffi::F32> bv, ffi::ResultBuffer<ffi::F32> q,
                                   ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> v,
                                   ffi::ResultBuffer<ffi::F32> new_history, int64_t parts) {
  int64_t ks[3];
  const size_t conv_bias_counts[3] = {bq.element_count(), bk.element_count(), bv.element_count()};
  const ffi::Span<const int64_t> kds[3] = {kq.dimensions(), kk.dimensions(), kv.dimensions()};
  if (ffi::Error e = CheckShapes(x.dimensions(), gates.dimensions(), kernel.dimensions(), history.dimensions(),
                                 bias.element_count(), conv_bias_counts, kds, ks);
      e.failure()) {
    return e;
  }
  const int64_t S = gates.dimensions()[0], M = kernel.dimensions()[1];
  if (gates_scale.element_count() != static_cast<size_t>(S) || kernel_scale.element_count() != static_cast<size_t>(M) ||
      sq.element_count() != static_cast<size_t>(M) || sk.element_count() != static_cast<size_t>(M) ||
      sv.element_count() != static_cast<size_t>(M)) {
    return ffi::Error::InvalidArgument("sparse_qkv_decode_int8: a scale per gate row, per kernel column, per "
                                       "output channel of each convolution");
  }
  Conv<int8_t> convs[3] = {{kq.typed_data(), sq.typed_data(), bq.typed_data(), ks[0], q->typed_data()},
                           {kk.typed_data(), sk.typed_data(), bk.typed_data(), ks[1], k->typed_data()},
                           {kv.typed_data(), sv.typed_data(), bv.typed_data(), ks[2], v->typed_data()}};
  return QkvDecode<int8_t>(pool, x.typed_data(), x.dimensions()[0], x.dimensions()[1], S, M, history.dimensions()[1],
                           {gates.typed_data(), gates_scale.typed_data(), kernel.typed_data(),
                            kernel_scale.typed_data(), bias.typed_data()},
                           history.typed_data(), convs, new_history->typed_data(), parts);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseQkvDecode, SparseQkvDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates D [S, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel E [d, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // history [R, kl-1, S, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_q kernel [kl, 3, M, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_q bias [M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_k kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_k bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_v kernel [kl, 1, M, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_v bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // q [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new history [R, kl-1, S, M]
                                  .Attr<int64_t>("parts"));  // tasks: inputs (phase 0), columns (phase 1)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseQkvDecodeInt8, SparseQkvDecodeInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, d]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // gates D [S, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // their row scales [S]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // kernel E [d, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its column scales [M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // history [R, kl-1, S, M]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // conv_q kernel [kl, 3, M, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its output-channel scales [M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_q bias [M]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // conv_k kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_k bias
                                  .Arg<ffi::Buffer<ffi::S8>>()   // conv_v kernel [kl, 1, M, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv_v bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // q [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v [R, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new history [R, kl-1, S, M]
                                  .Attr<int64_t>("parts"));
