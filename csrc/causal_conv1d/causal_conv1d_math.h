// Per-element math of the causal depthwise conv, shared by the CPU and CUDA kernels.
//
//   out[b, d, t] = act(bias[d] + sum_{k < W} weight[d, k] * x[b, d, t - (W - 1) + k])
//
// Positions p < 0 read initial_states[b, d, W - 1 + p] (or zero). With seq_idx, tap p feeds
// output t only when both lie in the same sequence; positions p < 0 belong to the sequence of
// position 0 (initial states continue the first sequence of the row).
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace ssmk::causal_conv1d {

constexpr int kMinWidth = 2;
constexpr int kMaxWidth = 8;
// Outputs per CUDA block and per CPU inner chunk of the forward.
constexpr int kChunkSize = 512;

SSMK_HOST_DEVICE int64_t tap_position(int64_t t, int k, int width) { return t - (width - 1) + k; }

template <typename T>
SSMK_HOST_DEVICE T activation(T pre, bool use_silu) {
  return use_silu ? ssmk::silu(pre) : pre;
}

// Gradient with respect to the pre-activation value.
template <typename T>
SSMK_HOST_DEVICE T activation_backward(T pre, T grad, bool use_silu) {
  return use_silu ? grad * ssmk::silu_grad(pre) : grad;
}

#if defined(__CUDACC__)
// The CUDA forward and backward kernels' copy of channel d's taps into registers w, zero past the
// width W so that loops unrolled over kMaxWidth read them all; returns the channel's bias (zero
// without one). weight: [D, W] contiguous.
template <typename acc_t>
SSMK_DEVICE acc_t load_taps(const acc_t* weight_all, const acc_t* bias_all, int64_t d, int W,
                            acc_t (&w)[kMaxWidth]) {
  const auto* weight = weight_all + d * W;
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < W ? weight[k] : acc_t(0);
  return bias_all ? bias_all[d] : acc_t(0);
}
#endif

SSMK_HOST_DEVICE bool same_sequence(const int32_t* seq_idx, int64_t stride, int64_t t, int64_t p) {
  return seq_idx[(p < 0 ? 0 : p) * stride] == seq_idx[t * stride];
}

}  // namespace ssmk::causal_conv1d
