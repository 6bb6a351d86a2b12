// Warp and block reductions with a fixed combination order (bitwise reproducible results).
#pragma once

#include "common/macros.h"

namespace ssmk::cuda {

template <typename T>
SSMK_DEVICE T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one T per warp.
// Must be called by all threads of the block.
template <int kThreads, typename T>
SSMK_DEVICE T block_reduce_sum(T v, T* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_reduce_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  return total;
}

}  // namespace ssmk::cuda
