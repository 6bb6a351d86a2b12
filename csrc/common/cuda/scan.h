// Block-wide scan of affine maps h -> a * h + b (pairs composed with an associative operation),
// forward or reverse in thread order, with a fixed combination order (bitwise reproducible).
// Each thread contributes the composition of its own items; the caller applies the exclusive
// prefix to its carried state and then walks its items sequentially.
#pragma once

#include <c10/util/complex.h>

#include "common/macros.h"

namespace ssmk::cuda {

template <typename T>
SSMK_DEVICE T shfl_up(T v, int delta) {
  return __shfl_up_sync(0xffffffffu, v, delta);
}
template <typename T>
SSMK_DEVICE T shfl_down(T v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
template <typename T>
SSMK_DEVICE c10::complex<T> shfl_up(c10::complex<T> v, int delta) {
  return c10::complex<T>(__shfl_up_sync(0xffffffffu, v.real(), delta),
                         __shfl_up_sync(0xffffffffu, v.imag(), delta));
}
template <typename T>
SSMK_DEVICE c10::complex<T> shfl_down(c10::complex<T> v, int delta) {
  return c10::complex<T>(__shfl_down_sync(0xffffffffu, v.real(), delta),
                         __shfl_down_sync(0xffffffffu, v.imag(), delta));
}

// Pair (a, b) for h -> a * h + b; compose(x, y) applies x first, then y.
template <typename W>
struct AffinePair {
  W a, b;
};

template <typename W>
SSMK_DEVICE AffinePair<W> affine_identity() {
  return AffinePair<W>{W(1), W(0)};
}

template <typename W>
SSMK_DEVICE AffinePair<W> affine_compose(const AffinePair<W>& x, const AffinePair<W>& y) {
  return AffinePair<W>{y.a * x.a, y.a * x.b + y.b};
}

template <typename W>
SSMK_DEVICE W affine_apply(const AffinePair<W>& p, W h) {
  return p.a * h + p.b;
}

// Exclusive scan over the threads of the block (thread order, or reverse thread order with
// kReverse). Returns the composition of the pairs of all threads before this one in scan order;
// `total` receives the composition over the whole block. `warp_totals` is shared memory for
// kThreads / 32 pairs. Must be called by every thread of the block; it begins with a barrier, so
// consecutive calls may reuse `warp_totals`, and shared memory written before the call is visible
// to every thread after it.
template <int kThreads, bool kReverse, typename W>
SSMK_DEVICE AffinePair<W> block_exclusive_scan(AffinePair<W> v, AffinePair<W>* warp_totals,
                                               AffinePair<W>& total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  AffinePair<W> inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    AffinePair<W> other;
    other.a = kReverse ? shfl_down(inc.a, off) : shfl_up(inc.a, off);
    other.b = kReverse ? shfl_down(inc.b, off) : shfl_up(inc.b, off);
    const bool valid = kReverse ? lane + off < 32 : lane >= off;
    if (valid) inc = affine_compose(other, inc);
  }
  AffinePair<W> ex;
  ex.a = kReverse ? shfl_down(inc.a, 1) : shfl_up(inc.a, 1);
  ex.b = kReverse ? shfl_down(inc.b, 1) : shfl_up(inc.b, 1);
  if (lane == (kReverse ? 31 : 0)) ex = affine_identity<W>();
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == (kReverse ? 0 : 31)) warp_totals[warp] = inc;
  __syncthreads();
  AffinePair<W> before = affine_identity<W>();
  AffinePair<W> all = affine_identity<W>();
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    const int w = kReverse ? kWarps - 1 - i : i;
    if (kReverse ? w > warp : w < warp) before = affine_compose(before, warp_totals[w]);
    all = affine_compose(all, warp_totals[w]);
  }
  total = all;
  return affine_compose(before, ex);
}

}  // namespace ssmk::cuda
