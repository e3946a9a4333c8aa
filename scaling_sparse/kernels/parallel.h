// Fork-join over XLA's intra-op thread pool for the CPU decode kernels (docs/kernels.md).
#ifndef SCALING_SPARSE_KERNELS_PARALLEL_H_
#define SCALING_SPARSE_KERNELS_PARALLEL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace scaling_sparse {

// Runs fn(0) .. fn(parts - 1), each once, on the pool and the calling thread, and returns when all are
// done. Whichever thread claims a part first runs it, so the caller never waits for a pool thread that
// has not started (no deadlock when the pool is busy or has one thread). The state is shared with the
// scheduled tasks: a task that starts after the call returned finds every part claimed and runs
// nothing, so fn may refer to the caller's stack.
inline void ForkJoin(xla::ffi::ThreadPool& pool, int64_t parts, std::function<void(int64_t)> fn) {
  struct State {
    std::function<void(int64_t)> run;
    std::unique_ptr<std::atomic<int>[]> claimed;
    std::atomic<int64_t> finished{0};
    bool Claim(int64_t p) { return claimed[p].exchange(1) == 0; }
    void RunPart(int64_t p) {
      run(p);
      finished.fetch_add(1, std::memory_order_release);
    }
  };
  if (parts <= 1) {
    if (parts == 1) fn(0);
    return;
  }
  auto state = std::make_shared<State>();
  state->run = std::move(fn);
  state->claimed.reset(new std::atomic<int>[parts]);
  for (int64_t p = 0; p < parts; ++p) state->claimed[p].store(0);
  for (int64_t p = 1; p < parts; ++p) {
    pool.Schedule([state, p] {
      if (state->Claim(p)) state->RunPart(p);
    });
  }
  for (int64_t p = 0; p < parts; ++p) {
    if (state->Claim(p)) state->RunPart(p);
  }
  while (state->finished.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// Reads one float of every cache line of part `part` of `parts` of [data, data + bytes), eight
// independent lines at a time. A kernel whose tasks all read the same weights (sparse QKV's E and
// convolution kernels) has each task pull a disjoint share from memory at full memory-level
// parallelism before computing, instead of every task stalling on the same lines one row at a time;
// software prefetches pulled much less (docs/kernels.md).
inline void TouchShare(const void* data, size_t bytes, int64_t part, int64_t parts) {
  const char* base = static_cast<const char*>(data);
  const size_t begin = bytes * part / parts & ~size_t{63}, end = bytes * (part + 1) / parts;
  float sink = 0.0f;
  for (size_t at = begin; at + 512 <= end; at += 512) {
    sink += *reinterpret_cast<const float*>(base + at) + *reinterpret_cast<const float*>(base + at + 64) +
            *reinterpret_cast<const float*>(base + at + 128) + *reinterpret_cast<const float*>(base + at + 192) +
            *reinterpret_cast<const float*>(base + at + 256) + *reinterpret_cast<const float*>(base + at + 320) +
            *reinterpret_cast<const float*>(base + at + 384) + *reinterpret_cast<const float*>(base + at + 448);
  }
  asm volatile("" : : "x"(sink));
}

// Per-thread scratch buffers, kept between calls: the kernels run once per layer per token, and a
// task's buffers (tens of KB) would otherwise be allocated and freed on every call. `slot` names one
// buffer of the calling thread; the contents are whatever the last user left.
inline float* Scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[8];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace scaling_sparse

#endif  // SCALING_SPARSE_KERNELS_PARALLEL_H_
