// The sparse FFN's decode step (docs/semantics.md §1, docs/kernels.md) as one CPU kernel, called from
// JAX through the XLA FFI (jax.ffi.ffi_call; the handler symbol is ScalingSparseFfnDecode).
//
// Per row of x [R, d] (R = batch * new tokens, 1 when decoding one sequence):
//   low    = x . C1                      C1 [d, r]
//   logits = low . C2 + cb               C2 [r, f], cb [f], f = B * N
//   k_b    = first argmax of logits over block b's N units (as jnp.argmax / layers/argmax.py)
//   y      = b2 + sum_b relu(x . W1[b N + k_b]) W2[b N + k_b]     W1, W2 [f, d] (unit-major)
// The JAX path (SparseFF.decode) runs this as ~12 XLA ops, one of which writes the 2 B gathered rows
// out before the dots read them again; here every weight byte is read once, and a unit whose ReLU is
// 0 does not read its W2 row at all (exact for finite weights: 0 * w adds nothing).
//
// Float32 only. The sums run in a fixed order (8 interleaved partial sums over the contracted axis),
// not XLA's, so results match the JAX path to rounding (tests/test_cpu_kernels.py).

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// One row's work after the controller's first matmul, split by blocks into `parts`: part p computes
// the logits of its blocks (its columns of C2), their choices and its share of y. Parts run on XLA's
// intra-op thread pool and on the calling thread; whichever thread claims a part first runs it, so the
// call never waits on a pool thread that has not started. The shared state outlives the call (a pool
// task may start after it returned: it then finds every part claimed and touches nothing).
struct RowJob {
  const float *x, *low, *c2, *cb, *w1, *w2;
  int32_t* units;
  int64_t d, r, f, n_elements, blocks, parts;
  std::vector<float> partial_y;  // [parts, d]
  std::unique_ptr<std::atomic<int>[]> claimed;
  std::atomic<int64_t> finished{0};

  bool Claim(int64_t p) { return claimed[p].exchange(1) == 0; }

  void Run(int64_t p) {
    const int64_t b0 = blocks * p / parts, b1 = blocks * (p + 1) / parts;
    const int64_t col0 = b0 * n_elements, cols = (b1 - b0) * n_elements;
    std::vector<float> logits(cb + col0, cb + col0 + cols);
    for (int64_t k = 0; k < r; ++k) Axpy(low[k], c2 + k * f + col0, logits.data(), cols);
    for (int64_t b = b0; b < b1; ++b) {  // first maximal unit, as jnp.argmax
      const float* block = logits.data() + (b - b0) * n_elements;
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
      const char* a = reinterpret_cast<const char*>(w1 + unit * d);
      const char* c = reinterpret_cast<const char*>(w2 + unit * d);
      for (int64_t byte = 0; byte < d * static_cast<int64_t>(sizeof(float)); byte += 64) {
        __builtin_prefetch(a + byte, 0, 0);
        __builtin_prefetch(c + byte, 0, 0);
      }
    };
    constexpr int64_t kAhead = 2;
    for (int64_t b = b0; b < std::min(b0 + kAhead, b1); ++b) prefetch_rows(b);
    float* y = partial_y.data() + p * d;
    for (int64_t b = b0; b < b1; ++b) {
      if (b + kAhead < b1) prefetch_rows(b + kAhead);
      const int64_t unit = b * n_elements + units[b];
      const float h = Dot(x, w1 + unit * d, d);
      if (h > 0.0f) Axpy(h, w2 + unit * d, y, d);
    }
    finished.fetch_add(1, std::memory_order_release);
  }
};

ffi::Error SparseFfnDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c1,
                               ffi::Buffer<ffi::F32> c2, ffi::Buffer<ffi::F32> cb, ffi::Buffer<ffi::F32> w1,
                               ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y,
                               ffi::ResultBuffer<ffi::S32> units, int64_t n_elements, int64_t parts) {
  const auto xd = x.dimensions();
  const auto c1d = c1.dimensions();
  const auto c2d = c2.dimensions();
  const auto w1d = w1.dimensions();
  if (xd.size() != 2 || c1d.size() != 2 || c2d.size() != 2 || w1d.size() != 2 || w2.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("sparse_ffn_decode: x, c1, c2, w1, w2 must be 2-D");
  }
  const int64_t rows = xd[0], d = xd[1], r = c1d[1], f = c2d[1];
  if (n_elements < 1 || f % n_elements != 0 || c1d[0] != d || c2d[0] != r || w1d[0] != f || w1d[1] != d ||
      w2.dimensions()[0] != f || w2.dimensions()[1] != d || cb.element_count() != static_cast<size_t>(f) ||
      b2.element_count() != static_cast<size_t>(d)) {
    return ffi::Error::InvalidArgument("sparse_ffn_decode: inconsistent shapes");
  }
  const int64_t blocks = f / n_elements;
  parts = std::max<int64_t>(1, std::min(parts, blocks));
  std::vector<float> low(r);
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x.typed_data() + row * d;
    // The controller's first matmul ([d] x [d, r], small): C1's rows scaled by x, read once, in order.
    std::fill(low.begin(), low.end(), 0.0f);
    for (int64_t i = 0; i < d; ++i) Axpy(xr[i], c1.typed_data() + i * r, low.data(), r);
    auto job = std::make_shared<RowJob>();
    RowJob& j = *job;
    j.x = xr, j.low = low.data(), j.c2 = c2.typed_data(), j.cb = cb.typed_data();
    j.w1 = w1.typed_data(), j.w2 = w2.typed_data(), j.units = units->typed_data() + row * blocks;
    j.d = d, j.r = r, j.f = f, j.n_elements = n_elements, j.blocks = blocks, j.parts = parts;
    j.partial_y.assign(parts * d, 0.0f);
    j.claimed.reset(new std::atomic<int>[parts]);
    for (int64_t p = 0; p < parts; ++p) j.claimed[p].store(0);
    for (int64_t p = 1; p < parts; ++p) {
      pool.Schedule([job, p] {
        if (job->Claim(p)) job->Run(p);
      });
    }
    for (int64_t p = 0; p < parts; ++p) {
      if (j.Claim(p)) j.Run(p);
    }
    while (j.finished.load(std::memory_order_acquire) < parts) std::this_thread::yield();
    // y = b2 + the parts' shares, summed in part order (the same order whichever thread ran them).
    float* yr = y->typed_data() + row * d;
    std::memcpy(yr, b2.typed_data(), sizeof(float) * d);
    for (int64_t p = 0; p < parts; ++p) Axpy(1.0f, j.partial_y.data() + p * d, yr, d);
  }
  return ffi::Error::Success();
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
