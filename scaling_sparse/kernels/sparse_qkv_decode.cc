// Sparse QKV's decode step for one new position (docs/semantics.md §2, docs/kernels.md) as one CPU
// kernel, called from JAX through the XLA FFI (handler symbol ScalingSparseQkvDecode).
//
// Per row of x [R, d] (R = batch; one new token each), with S modules of M units (d = S M):
//   h[s, m]    = sum_i x_i D[s, i] E[i, m] + bias[s M + m]          the multiplicative layer
//   H          = [history (kl-1 rows) ; h]                           [kl, S, M]
//   out_c[s]   = bias_c + sum_{i < kl, j < ks} H[i, s + j - (ks-1)/2] . K_c[i, j]   (zero past the edges)
// for c in (q, k, v), each K_c [kl, ks_c, M, M], and the new history H[1:]. The JAX path
// (SparseQKV.decode) runs this as ~25 XLA ops whose small matmuls each run on one core; here the
// modules are split into `parts` tasks (parallel.h). A task computes h for its modules and the
// (ks-1)/2 neighbours on each side (recomputed, so tasks need no barrier), then its rows of q, k, v.
// Float32 only; results match the JAX path to rounding (tests/test_cpu_kernels.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vector_ops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using scaling_sparse::Gemm;

struct Conv {
  const float* kernel;  // [kl, ks, M, M]
  const float* bias;    // [M]
  int64_t ks;
  float* out;  // [R, S M]
};

ffi::Error SparseQkvDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gates,
                               ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> history, ffi::Buffer<ffi::F32> kq, ffi::Buffer<ffi::F32> bq,
                               ffi::Buffer<ffi::F32> kk, ffi::Buffer<ffi::F32> bk, ffi::Buffer<ffi::F32> kv,
                               ffi::Buffer<ffi::F32> bv, ffi::ResultBuffer<ffi::F32> q, ffi::ResultBuffer<ffi::F32> k,
                               ffi::ResultBuffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> new_history,
                               int64_t parts) {
  const auto xd = x.dimensions(), gd = gates.dimensions(), ed = kernel.dimensions(), hd = history.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || ed.size() != 2 || hd.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_qkv_decode: x [R, d], gates [S, d], kernel [d, M], history [R, kl-1, S, M]");
  }
  const int64_t rows = xd[0], d = xd[1], S = gd[0], M = ed[1], hist = hd[1];
  const int64_t kl = hist + 1;
  if (gd[1] != d || ed[0] != d || S * M != d || hd[0] != rows || hd[2] != S || hd[3] != M ||
      bias.element_count() != static_cast<size_t>(d)) {
    return ffi::Error::InvalidArgument("sparse_qkv_decode: inconsistent shapes");
  }
  Conv convs[3] = {{kq.typed_data(), bq.typed_data(), 0, q->typed_data()},
                   {kk.typed_data(), bk.typed_data(), 0, k->typed_data()},
                   {kv.typed_data(), bv.typed_data(), 0, v->typed_data()}};
  const ffi::Buffer<ffi::F32>* kernels[3] = {&kq, &kk, &kv};
  int64_t halo = 0;
  for (int c = 0; c < 3; ++c) {
    const auto kd = kernels[c]->dimensions();
    if (kd.size() != 4 || kd[0] != kl || kd[2] != M || kd[3] != M || kd[1] % 2 != 1) {
      return ffi::Error::InvalidArgument("sparse_qkv_decode: conv kernels must be [kl, ks (odd), M, M]");
    }
    convs[c].ks = kd[1];
    halo = std::max(halo, (kd[1] - 1) / 2);
  }
  parts = std::max<int64_t>(1, std::min(parts, S));
  const float *pg = gates.typed_data(), *pe = kernel.typed_data(), *pb = bias.typed_data();
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x.typed_data() + row * d;
    const float* hr = history.typed_data() + row * hist * d;  // [hist, S, M]
    float* nh = new_history->typed_data() + row * hist * d;
    scaling_sparse::ForkJoin(pool, parts, [&](int64_t p) {
      const int64_t s0 = S * p / parts, s1 = S * (p + 1) / parts;
      const int64_t h0 = std::max<int64_t>(0, s0 - halo), h1 = std::min(S, s1 + halo);
      scaling_sparse::TouchShare(pe, sizeof(float) * d * M, p, parts);
      for (const Conv& c : convs) scaling_sparse::TouchShare(c.kernel, sizeof(float) * kl * c.ks * M * M, p, parts);
      // The multiplicative layer for modules [h0, h1): gated inputs [h1-h0, d] times E [d, M].
      float* gated = scaling_sparse::Scratch(0, (h1 - h0) * d);
      float* h = scaling_sparse::Scratch(1, (h1 - h0) * M);
      for (int64_t s = h0; s < h1; ++s) {
        for (int64_t i = 0; i < d; ++i) gated[(s - h0) * d + i] = xr[i] * pg[s * d + i];
        std::memcpy(h + (s - h0) * M, pb + s * M, sizeof(float) * M);
      }
      Gemm(gated, d, pe, M, h, M, h1 - h0, d, M);
      // Position i < hist of the window is history row i; position hist is the new h.
      auto window = [&](int64_t i, int64_t s) -> const float* {
        return i < hist ? hr + (i * S + s) * M : h + (s - h0) * M;
      };
      // The new history: rows 1.. of the window, for this task's modules.
      for (int64_t i = 0; i < hist; ++i) {
        for (int64_t s = s0; s < s1; ++s) std::memcpy(nh + (i * S + s) * M, window(i + 1, s), sizeof(float) * M);
      }
      for (const Conv& c : convs) {
        // taps [s1-s0, kl ks M]: for each output module, its (position, neighbour) inputs, zeros past the edges;
        // the kernel [kl, ks, M, M] read as [kl ks M, M] is then one matmul.
        const int64_t half = (c.ks - 1) / 2, width = kl * c.ks * M;
        float* taps = scaling_sparse::Scratch(2, (s1 - s0) * width);
        std::fill(taps, taps + (s1 - s0) * width, 0.0f);
        for (int64_t s = s0; s < s1; ++s) {
          for (int64_t i = 0; i < kl; ++i) {
            for (int64_t j = 0; j < c.ks; ++j) {
              const int64_t src = s + j - half;
              if (src < 0 || src >= S) continue;
              std::memcpy(taps + (s - s0) * width + (i * c.ks + j) * M, window(i, src), sizeof(float) * M);
            }
          }
        }
        float* out = c.out + row * d;
        for (int64_t s = s0; s < s1; ++s) std::memcpy(out + s * M, c.bias, sizeof(float) * M);
        Gemm(taps, width, c.kernel, M, out + s0 * M, M, s1 - s0, width, M);
      }
    });
  }
  return ffi::Error::Success();
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
                                  .Attr<int64_t>("parts"));  // modules split into this many tasks
