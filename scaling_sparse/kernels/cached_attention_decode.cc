// One new position's cache update and attention over the decode caches (docs/kernels.md) as one CPU
// kernel, called from JAX through the XLA FFI (handler symbol ScalingSparseCachedAttentionDecode).
//
// Per head row n (n = batch x heads, the caches' leading axis; layers/attention.py), with the query
// q [n, dh] at position `index`: first this step's key and value are written into the caches
// (k_t[:, :, index] = k_new, v[:, index, :] = v_new, what `update_cache` does with two
// dynamic_update_slice ops), then
//   s_j = scale q . k_t[:, j]            j <= index (later positions are masked out)
//   s_index = self_value                 with self_mask (LSH: the query itself only when nothing else is
//                                        visible, layers/lsh.py `_mask_scores`)
//   o   = sum_j softmax(s)_j v[j, :]
// The JAX path (`cached_attention`, `lsh.attend_cache`) runs this as two batched dots over all L cache
// positions plus the mask and the softmax's reductions: ~7 XLA ops, the dots batched over 16 heads of
// one row each. The caches are outputs aliased to their inputs (`input_output_aliases`): with the
// decoder's donated caches XLA updates them in place, and only the written column and row are touched.
// Masked positions are skipped here: in the JAX path their exp(mask - max) is exactly 0.
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

ffi::Error CachedAttentionDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                                     ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_t_in,
                                     ffi::Buffer<ffi::F32> v_in, ffi::Buffer<ffi::S32> index,
                                     ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_t,
                                     ffi::ResultBuffer<ffi::F32> v, float scale, bool self_mask, float self_value,
                                     int64_t parts) {
  const auto qd = q.dimensions(), kd = k_t->dimensions(), vd = v->dimensions();
  if (qd.size() != 2 || kd.size() != 3 || vd.size() != 3) {
    return ffi::Error::InvalidArgument("cached_attention_decode: q [n, dh], k_t [n, dh, L], v [n, L, dh]");
  }
  const int64_t n = qd[0], dh = qd[1], L = kd[2];
  if (kd[0] != n || kd[1] != dh || vd[0] != n || vd[1] != L || vd[2] != dh || index.element_count() != 1 ||
      k_new.element_count() != n * dh || v_new.element_count() != n * dh) {
    return ffi::Error::InvalidArgument("cached_attention_decode: inconsistent shapes");
  }
  const int64_t pos = index.typed_data()[0];
  if (pos < 0 || pos >= L) {
    return ffi::Error::InvalidArgument("cached_attention_decode: index outside the cache");
  }
  // The results alias the inputs (kernels/cpu.py), so XLA hands them over holding the caches' contents, in
  // the inputs' own buffers where it can; should a build ever pass separate buffers, copy the caches over.
  if (k_t->typed_data() != k_t_in.typed_data()) {
    std::copy(k_t_in.typed_data(), k_t_in.typed_data() + k_t_in.element_count(), k_t->typed_data());
  }
  if (v->typed_data() != v_in.typed_data()) {
    std::copy(v_in.typed_data(), v_in.typed_data() + v_in.element_count(), v->typed_data());
  }
  const int64_t visible = pos + 1;
  parts = std::max<int64_t>(1, std::min(parts, n));
  scaling_sparse::ForkJoin(pool, parts, [&](int64_t p) {
    float* scores = scaling_sparse::Scratch(0, visible);
    for (int64_t row = n * p / parts; row < n * (p + 1) / parts; ++row) {
      const float* qr = q.typed_data() + row * dh;
      float* kr = k_t->typed_data() + row * dh * L;  // [dh, L]: each feature's keys are contiguous
      float* vr = v->typed_data() + row * L * dh;    // [L, dh]
      const float* kn = k_new.typed_data() + row * dh;
      std::copy(v_new.typed_data() + row * dh, v_new.typed_data() + (row + 1) * dh, vr + pos * dh);
      for (int64_t i = 0; i < dh; ++i) kr[i * L + pos] = kn[i];
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new [n, dh]: this step's key
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new [n, dh]: this step's value
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_t [n, dh, L]: the key cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [n, L, dh]: the value cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index: the query's position
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [n, dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k_t with k_new written in (aliases k_t)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v with v_new written in (aliases v)
                                  .Attr<float>("scale")
                                  .Attr<bool>("self_mask")
                                  .Attr<float>("self_value")
                                  .Attr<int64_t>("parts"));  // head rows split into this many tasks
