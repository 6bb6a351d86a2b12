// CUDA forward and decode-step kernels of causal_conv1d.
//
// Forward: one block per (batch, channel, chunk of kChunkSize outputs) — the same chunks as the
// CPU kernel. The chunk and its W-1 history are staged in shared memory in the accumulation type,
// so each input is read from global memory once (plus W-1 halo elements per chunk).
// Bytes per output: one input read + one output write (2 * sizeof(input_t)); FLOPs: 2W (+ SiLU).
// Memory bound: the floor is the copy bandwidth; with contiguous rows the loads and stores are
// coalesced, channel-last inputs are gathered (correct, slower).
#pragma once

#include "causal_conv1d/causal_conv1d.h"

namespace ssmk::causal_conv1d {

struct FwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = kChunkSize;
};

template <typename input_t>
__global__ void __launch_bounds__(FwdTraits::kThreads) causal_conv1d_fwd_kernel(const CausalConv1dFwdParams<input_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  constexpr int kChunk = FwdTraits::kChunk;
  __shared__ acc_t xs[kChunk + kMaxWidth - 1];

  const int64_t nchunks = (p.seqlen + kChunk - 1) / kChunk;
  const int64_t chunk = blockIdx.x % nchunks;
  const int64_t row = blockIdx.x / nchunks;
  const int64_t b = row / p.dim, d = row % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t t0 = chunk * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), p.seqlen - t0));

  const auto* x = p.x.data + b * p.x.stride[0] + d * p.x.stride[1];
  const auto* init = p.initial_states.data;
  // xs[i] = input at position t0 - (W-1) + i
  for (int i = threadIdx.x; i < n + W - 1; i += FwdTraits::kThreads) {
    const int64_t pos = t0 - (W - 1) + i;
    acc_t v = acc_t(0);
    if (pos >= 0) {
      v = static_cast<acc_t>(x[pos * p.x.stride[2]]);
    } else if (init != nullptr) {
      v = static_cast<acc_t>(init[b * p.initial_states.stride[0] + d * p.initial_states.stride[1] + (W - 1 + pos) * p.initial_states.stride[2]]);
    }
    xs[i] = v;
  }
  acc_t w[kMaxWidth];
  const acc_t bias = load_taps(p.weight, p.bias, d, W, w);
  const int32_t* seq = p.seq_idx.data ? p.seq_idx.data + b * p.seq_idx.stride[0] : nullptr;
  __syncthreads();

  auto* out = p.out + row * p.seqlen + t0;
  for (int j = threadIdx.x; j < n; j += FwdTraits::kThreads) {
    acc_t acc = bias;
    const int64_t t = t0 + j;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      if (k < W && (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], t, tap_position(t, k, W)))) {
        acc += w[k] * xs[j + k];
      }
    }
    out[j] = static_cast<input_t>(activation(acc, p.silu));
  }

  if (chunk == nchunks - 1 && threadIdx.x < W - 1) {
    const int j = threadIdx.x;
    const int64_t pos = p.seqlen - (W - 1) + j;
    acc_t v = acc_t(0);
    if (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], p.seqlen - 1, pos)) {
      if (pos >= 0) {
        v = static_cast<acc_t>(x[pos * p.x.stride[2]]);
      } else if (init != nullptr) {
        v = static_cast<acc_t>(init[b * p.initial_states.stride[0] + d * p.initial_states.stride[1] + (W - 1 + pos) * p.initial_states.stride[2]]);
      }
    }
    p.final_states[row * (W - 1) + j] = static_cast<input_t>(v);
  }
}

// Decode step: one thread per (batch row, channel); the state row is read and rewritten once.
template <typename input_t, typename state_t>
__global__ void causal_conv1d_update_kernel(const CausalConv1dUpdateParams<input_t, state_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.batch * p.dim) return;
  const int64_t b = r / p.dim, d = r % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t L = p.seqlen, S = p.state_len;
  auto* out = p.out + r * L;
  const int64_t sb = p.conv_state_indices.data ? p.conv_state_indices.data[b * p.conv_state_indices.stride[0]] : b;
  if (sb < 0 || sb >= p.state_batch) {
    for (int64_t t = 0; t < L; ++t) out[t] = static_cast<input_t>(0.0f);
    return;
  }
  auto* state = p.conv_state.data + sb * p.conv_state.stride[0] + d * p.conv_state.stride[1];
  const auto* x = p.x.data + b * p.x.stride[0] + d * p.x.stride[1];
  const auto* weight = p.weight + d * W;
  acc_t w[kMaxWidth], win[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) {
    w[k] = k < W ? weight[k] : acc_t(0);
    // win[k] for k < W-1: the last W-1 state entries (oldest first)
    win[k] = k < W - 1 ? static_cast<acc_t>(state[(S - (W - 1) + k) * p.conv_state.stride[2]]) : acc_t(0);
  }
  const acc_t bias = p.bias ? p.bias[d] : acc_t(0);
  // Register arrays are indexed with unrolled constants only (no local-memory spill).
  for (int64_t t = 0; t < L; ++t) {
    const acc_t xt = static_cast<acc_t>(x[t * p.x.stride[2]]);
    acc_t acc = bias;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const acc_t v = k < W - 1 ? win[k] : xt;
      if (k < W) acc += w[k] * v;
    }
#pragma unroll
    for (int k = 0; k < kMaxWidth - 1; ++k) {
      win[k] = k < W - 2 ? win[k + 1] : (k == W - 2 ? xt : win[k]);
    }
    out[t] = static_cast<input_t>(activation(acc, p.silu));
  }
  // Shift the state left by L and append the inputs (ascending j reads ahead of writes).
  for (int64_t j = 0; j < S; ++j) {
    const int64_t src = j + L;
    state[j * p.conv_state.stride[2]] = src < S ? state[src * p.conv_state.stride[2]] : static_cast<state_t>(x[(src - S) * p.x.stride[2]]);
  }
}

}  // namespace ssmk::causal_conv1d
