// Attention of one new position over the decode caches (docs/kernels.md) as one CPU kernel, called from
// JAX through the XLA FFI (handler symbol ScalingSparseCachedAttentionDecode).
//
// Per head row n (n = batch x heads, the caches' leading axis; layers/attention.py), with the query
// q [n, dh] at position `index` and the caches already holding this step's key and value:
//   s_j = scale q . k_t[:, j]            j <= index (later positions are masked out)
//   s_index = self_value                 with self_mask (LSH: the query itself only when nothing else is
//                                        visible, layers/lsh.py `_mask_scores`)
//   o   = sum_j softmax(s)_j v[j, :]
// The JAX path (`cached_attention`, `lsh.attend_cache`) runs this as two batched dots over all L cache
// positions plus the mask and the softmax's reductions: ~7 XLA ops, the dots batched over 16 heads of
// one row each. Masked positions are skipped here: in the JAX path their exp(mask - max) is exactly 0.
// The head rows are split into `parts` tasks (parallel.h); each row's sums do not depend on the split.
// Float32 only; sums run in this file's order, so results match the JAX path to rounding
// (tests/test_cpu_kernels.py).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "vector_ops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error CachedAttentionDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_t, ffi::Buffer<ffi::F32> v,
                                     ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> out, float scale,
                                     bool self_mask, float self_value, int64_t parts) {
  const auto qd = q.dimensions(), kd = k_t.dimensions(), vd = v.dimensions();
  if (qd.size() != 2 || kd.size() != 3 || vd.size() != 3) {
    return ffi::Error::InvalidArgument("cached_attention_decode: q [n, dh], k_t [n, dh, L], v [n, L, dh]");
  }
  const int64_t n = qd[0], dh = qd[1], L = kd[2];
  if (kd[0] != n || kd[1] != dh || vd[0] != n || vd[1] != L || vd[2] != dh || index.element_count() != 1) {
    return ffi::Error::InvalidArgument("cached_attention_decode: inconsistent shapes");
  }
  const int64_t pos = index.typed_data()[0];
  if (pos < 0 || pos >= L) {
    return ffi::Error::InvalidArgument("cached_attention_decode: index outside the cache");
  }
  const int64_t visible = pos + 1;
  parts = std::max<int64_t>(1, std::min(parts, n));
  scaling_sparse::ForkJoin(pool, parts, [&](int64_t p) {
    float* scores = scaling_sparse::Scratch(0, visible);
    for (int64_t row = n * p / parts; row < n * (p + 1) / parts; ++row) {
      const float* qr = q.typed_data() + row * dh;
      const float* kr = k_t.typed_data() + row * dh * L;  // [dh, L]: each feature's keys are contiguous
      const float* vr = v.typed_data() + row * L * dh;    // [L, dh]
      std::fill(scores, scores + visible, 0.0f);
      for (int64_t i = 0; i < dh; ++i) scaling_sparse::Axpy(qr[i], kr + i * L, scores, visible);
      float top = -INFINITY;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] *= scale;
        if (self_mask && j == pos) scores[j] = self_value;
        top = std::max(top, scores[j]);
      }
      const float total = scaling_sparse::ExpShiftedSum(scores, visible, top);
      // The JAX path divides the probabilities, then sums; so does this (same rounding of each weight).
      for (int64_t j = 0; j < visible; ++j) scores[j] /= total;
      float* o = out->typed_data() + row * dh;
      std::fill(o, o + dh, 0.0f);
      for (int64_t j = 0; j < visible; ++j) scaling_sparse::Axpy(scores[j], vr + j * dh, o, dh);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingSparseCachedAttentionDecode, CachedAttentionDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()        // XLA's intra-op pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [n, dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_t [n, dh, L] (this step written in)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [n, L, dh]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index: the query's position
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [n, dh]
                                  .Attr<float>("scale")
                                  .Attr<bool>("self_mask")
                                  .Attr<float>("self_value")
                                  .Attr<int64_t>("parts"));  // head rows split into this many tasks
