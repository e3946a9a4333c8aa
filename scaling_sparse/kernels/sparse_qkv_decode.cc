// Sparse QKV's decode step for one new position (docs/semantics.md §2, docs/kernels.md) as one CPU
// kernel, called from JAX through the XLA FFI (handler symbol ScalingSparseQkvDecode).
//
// Per row of x [R, d] (R = batch; one new token each), with S modules of M units (d = S M):
//   h[s, m]    = sum_i x_i D[s, i] E[i, m] + bias[s M + m]          the multiplicative layer
//   H          = [history (kl-1 rows) ; h]                           [kl, S, M]
//   out_c[s]   = bias_c + sum_{i < kl, j < ks} H[i, s + j - (ks-1)/2] . K_c[i, j]   (zero past the edges)
// for c in (q, k, v), each K_c [kl, ks_c, M, M], and the new history H[1:]. The JAX path
// (SparseQKV.decode) runs this as ~25 XLA ops whose small matmuls each run on one core; here it is one
// fork of `parts` tasks in three phases (parallel.h ForkJoinPhases): the gated inputs (modules split),
// h (columns split), q, k, v (columns split; each convolution tap one matmul, no tap matrix built).
// Float32 only; results match the JAX path to rounding (tests/test_cpu_kernels.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

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
  for (int c = 0; c < 3; ++c) {
    const auto kd = kernels[c]->dimensions();
    if (kd.size() != 4 || kd[0] != kl || kd[2] != M || kd[3] != M || kd[1] % 2 != 1) {
      return ffi::Error::InvalidArgument("sparse_qkv_decode: conv kernels must be [kl, ks (odd), M, M]");
    }
    convs[c].ks = kd[1];
  }
  // Columns of h and of q, k, v split into `parts` tasks, in whole 16-column tiles where M allows (the
  // Gemm's fast path). A task reads only its columns of E and of the convolution kernels, so each core
  // streams half of the weights once; the rows (modules) are not split, so no module is computed twice.
  const int64_t tile = M % 16 == 0 ? 16 : 1, tiles = M / tile;
  parts = std::max<int64_t>(1, std::min(parts, tiles));
  auto columns = [&](int64_t p) { return std::make_pair(tiles * p / parts * tile, tiles * (p + 1) / parts * tile); };
  const float *pg = gates.typed_data(), *pe = kernel.typed_data(), *pb = bias.typed_data();
  // Shared by the tasks of one row: the calling thread's scratch slots 3 and 4, which no kernel's tasks use.
  float* gated = scaling_sparse::Scratch(3, S * d);  // [S, d]: x times each module's gates
  float* h = scaling_sparse::Scratch(4, S * M);      // [S, M]: the multiplicative layer's output
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x.typed_data() + row * d;
    const float* hr = history.typed_data() + row * hist * d;  // [hist, S, M]
    float* nh = new_history->typed_data() + row * hist * d;
    // Window position i < hist is history row i, position hist the new h; each [S, M].
    auto window = [&](int64_t i) -> const float* { return i < hist ? hr + i * d : h; };
    scaling_sparse::ForkJoinPhases(pool, parts, 3, [&](int phase, int64_t p) {
      if (phase == 0) {  // gated rows of this task's share of the modules; history rows 1.. move up by one
        const int64_t s0 = S * p / parts, s1 = S * (p + 1) / parts;
        for (int64_t s = s0; s < s1; ++s) {
          for (int64_t i = 0; i < d; ++i) gated[s * d + i] = xr[i] * pg[s * d + i];
        }
        for (int64_t i = 0; i + 1 < hist; ++i) {
          std::memcpy(nh + i * d + s0 * M, hr + (i + 1) * d + s0 * M, sizeof(float) * (s1 - s0) * M);
        }
        return;
      }
      const auto [c0, c1] = columns(p);
      if (phase == 1) {  // h[:, c0:c1] = bias + gated . E[:, c0:c1]; it is also the new history's last row
        for (int64_t s = 0; s < S; ++s) std::memcpy(h + s * M + c0, pb + s * M + c0, sizeof(float) * (c1 - c0));
        Gemm(gated, d, pe + c0, M, h + c0, M, S, d, c1 - c0);
        if (hist > 0) {
          for (int64_t s = 0; s < S; ++s) {
            std::memcpy(nh + (hist - 1) * d + s * M + c0, h + s * M + c0, sizeof(float) * (c1 - c0));
          }
        }
        return;
      }
      // phase 2: out[s, c0:c1] = bias_c + sum over window position i and neighbour j of
      // window(i)[s + j - half] . K_c[i, j][:, c0:c1]: for each (i, j) one matmul over the modules whose
      // neighbour exists (the others get zero from that tap), added in (i, j, m) order as the JAX path.
      for (const Conv& c : convs) {
        const int64_t half = (c.ks - 1) / 2;
        float* out = c.out + row * d;
        for (int64_t s = 0; s < S; ++s) std::memcpy(out + s * M + c0, c.bias + c0, sizeof(float) * (c1 - c0));
        for (int64_t i = 0; i < kl; ++i) {
          for (int64_t j = 0; j < c.ks; ++j) {
            const int64_t shift = j - half, lo = std::max<int64_t>(0, -shift), hi = std::min(S, S - shift);
            if (hi <= lo) continue;
            Gemm(window(i) + (lo + shift) * M, M, c.kernel + (i * c.ks + j) * M * M + c0, M, out + lo * M + c0, M,
                 hi - lo, M, c1 - c0);
          }
        }
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
