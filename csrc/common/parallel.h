// at::parallel_for sized by work: small calls run in the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace ssmk::cpu {

// The least work (elementary steps: a row's elements, a product's multiply-adds) worth waking the
// thread pool for; at::internal::GRAIN_SIZE, ATen's own threshold for elementwise ops.
constexpr int64_t kParallelGrain = 32768;

// at::parallel_for over items [0, items), each of about `item_cost` steps: items are handed out
// in runs of at least kParallelGrain steps (and at least `min_grain` items), so a call below that
// runs in the calling thread. A pool wake-up costs microseconds on idle cores, and a time slice on
// busy ones: 3.2 ms for a 2 x 64 x 256 linear_scan on 2 cores at load average 3, against 41 us in
// the calling thread (docs/design-notes.md, "CPU: threads only for work worth a wake-up").
template <typename F>
void parallel_items(int64_t items, int64_t item_cost, const F& f, int64_t min_grain = 1) {
  const int64_t grain = std::max(min_grain, kParallelGrain / std::max<int64_t>(1, item_cost));
  at::parallel_for(0, items, std::max<int64_t>(1, grain), f);
}

}  // namespace ssmk::cpu
