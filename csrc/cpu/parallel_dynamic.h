// Dynamic work distribution over torch's intra-op threads.
//
// at::parallel_for hands each thread one equal slice. On the shared 2-vCPU machines this
// project runs on, one core is often ~2x slower than the other for stretches of time (seen as
// bimodal single-thread timings, run to run), so an equal split waits for the slow core and two
// threads buy nothing. Here every thread pulls fixed-size chunks from an atomic counter until
// none are left: a slow core simply takes fewer chunks. Chunks are disjoint and each index is
// handled by exactly one call, so results do not depend on who ran what.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fastadapt::cpu {

// fn(begin, end) over [0, n) in chunks of `chunk` (the last may be shorter), on up to
// at::get_num_threads() threads; inline when one chunk or one thread would do.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F& fn) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

}  // namespace fastadapt::cpu
