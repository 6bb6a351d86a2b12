// Warp and block scans of affine pairs (a, b), the elements of first-order linear recurrences
// h -> a * h + b (Blelloch 1990, "Prefix sums and their applications", section 1.4). Combining an
// earlier pair with a later one gives (a2 * a1, a2 * b1 + b2); the operator is associative but
// not commutative, so the scans take the order of the elements from the caller: ascending lanes
// and warps, or descending ones (`descending`), for recurrences that run backwards in memory.
// The combination order is fixed, so results are bitwise reproducible.
//
// T: float, double, c10::complex<float> or c10::complex<double>.
#pragma once

#include <c10/util/complex.h>

#include "common/macros.h"

namespace ssmk::cuda {

SSMK_DEVICE float shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
SSMK_DEVICE double shfl(double v, int src) { return __shfl_sync(0xffffffffu, v, src); }
template <typename T>
SSMK_DEVICE c10::complex<T> shfl(c10::complex<T> v, int src) {
  return c10::complex<T>(shfl(v.real(), src), shfl(v.imag(), src));
}

template <typename T>
struct AffinePair {
  T a, b;
};

template <typename T>
SSMK_DEVICE AffinePair<T> affine_identity() {
  return AffinePair<T>{T(1), T(0)};
}

// `earlier` applied first, then `later`.
template <typename T>
SSMK_DEVICE AffinePair<T> affine_compose(const AffinePair<T>& earlier, const AffinePair<T>& later) {
  return AffinePair<T>{later.a * earlier.a, later.a * earlier.b + later.b};
}

template <typename T>
SSMK_DEVICE T affine_apply(const AffinePair<T>& p, T h) {
  return p.a * h + p.b;
}

// Position of this lane in scan order.
SSMK_DEVICE int scan_lane(bool descending) {
  const int lane = threadIdx.x % 32;
  return descending ? 31 - lane : lane;
}

// Inclusive scan over the 32 lanes in scan order (Hillis-Steele, 5 shuffle rounds).
template <typename T>
SSMK_DEVICE AffinePair<T> warp_inclusive_scan(AffinePair<T> v, bool descending) {
  const int lane = threadIdx.x % 32;
  const int rank = scan_lane(descending);
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int src = descending ? lane + d : lane - d;
    const int src_clamped = src < 0 ? 0 : (src > 31 ? 31 : src);
    const AffinePair<T> prev{shfl(v.a, src_clamped), shfl(v.b, src_clamped)};
    if (rank >= d) v = affine_compose(prev, v);
  }
  return v;
}

// Exclusive scan over the block in scan order: returns the composition of the pairs of all
// threads before this one (the identity for the first) and sets `total` to the composition of
// all threads. `scratch` holds kThreads / 32 pairs in shared memory. Called by every thread.
template <int kThreads, typename T>
SSMK_DEVICE AffinePair<T> block_exclusive_scan(AffinePair<T> v, AffinePair<T>* scratch, AffinePair<T>& total,
                                               bool descending) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int rank = scan_lane(descending);
  const int warp_rank = descending ? kWarps - 1 - warp : warp;
  const AffinePair<T> incl = warp_inclusive_scan(v, descending);
  // Exclusive within the warp: the inclusive value of the previous lane in scan order.
  const int src = descending ? (lane == 31 ? 31 : lane + 1) : (lane == 0 ? 0 : lane - 1);
  AffinePair<T> excl{shfl(incl.a, src), shfl(incl.b, src)};
  if (rank == 0) excl = affine_identity<T>();
  __syncthreads();  // scratch may still be read by a previous call
  if (rank == 31) scratch[warp_rank] = incl;
  __syncthreads();
  AffinePair<T> prefix = affine_identity<T>();
  total = affine_identity<T>();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const AffinePair<T> s = scratch[w];
    if (w < warp_rank) prefix = affine_compose(prefix, s);
    total = affine_compose(total, s);
  }
  return affine_compose(prefix, excl);
}

}  // namespace ssmk::cuda
