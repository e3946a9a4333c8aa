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

// A spin-wait hint (the x86 `pause` instruction) where there is one.
inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs fn(phase, part) for every part of phase 0, then for every part of phase 1, and so on, on the pool
// and the calling thread, and returns when all are done. No part of a phase starts before every part of
// the one before has finished, so a phase may read what the previous one wrote (one fork for several
// dependent steps, instead of one per step). A thread claims whichever part of the current phase is
// still free and runs it; a thread that finds them all claimed waits only for parts another thread is
// running, never for a pool thread that has not started (no deadlock when the pool is busy or has one
// thread). The state is shared with the scheduled tasks: a task that starts after the call returned
// finds every part claimed and runs nothing, so fn may refer to the caller's stack.
inline void ForkJoinPhases(xla::ffi::ThreadPool& pool, int64_t parts, int phases,
                           std::function<void(int, int64_t)> fn) {
  struct Phase {
    std::atomic<int64_t> next{0};      // the next part no thread has claimed
    std::atomic<int64_t> finished{0};  // parts done
  };
  struct State {
    std::function<void(int, int64_t)> run;
    int64_t parts = 0;
    int phases = 0;
    std::unique_ptr<Phase[]> phase_state;
    void Work() {
      for (int phase = 0; phase < phases; ++phase) {
        Phase& at = phase_state[phase];
        for (int64_t p; (p = at.next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
          run(phase, p);
          at.finished.fetch_add(1, std::memory_order_release);
        }
        for (int spins = 0; at.finished.load(std::memory_order_acquire) < parts; ++spins) {
          if (spins < 4096) {
            Pause();
          } else {
            std::this_thread::yield();
          }
        }
      }
    }
  };
  if (parts <= 1) {
    for (int phase = 0; phase < phases && parts == 1; ++phase) fn(phase, 0);
    return;
  }
  auto state = std::make_shared<State>();
  state->run = std::move(fn);
  state->parts = parts;
  state->phases = phases;
  state->phase_state.reset(new Phase[phases]);
  for (int64_t p = 1; p < parts; ++p) pool.Schedule([state] { state->Work(); });
  state->Work();
}

// Runs fn(0) .. fn(parts - 1), each once: ForkJoinPhases with one phase.
inline void ForkJoin(xla::ffi::ThreadPool& pool, int64_t parts, std::function<void(int64_t)> fn) {
  ForkJoinPhases(pool, parts, 1, [&fn](int, int64_t p) { fn(p); });
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
