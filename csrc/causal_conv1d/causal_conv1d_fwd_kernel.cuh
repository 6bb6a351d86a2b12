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
#include "common/cuda/launch.h"

namespace ssmk::causal_conv1d {

struct FwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = kChunkSize;
};

template <typename input_t>
__global__ void __launch_bounds__(FwdTraits::kThreads) causal_conv1d_fwd_kernel(const CausalConv1dParams p) {
  using acc_t = acc_type<input_t>;
  constexpr int kChunk = FwdTraits::kChunk;
  __shared__ acc_t xs[kChunk + kMaxWidth - 1];

  const int64_t nchunks = (p.seqlen + kChunk - 1) / kChunk;
  const int64_t chunk = blockIdx.x % nchunks;
  const int64_t row = blockIdx.x / nchunks;
  const int64_t b = row / p.dim, d = row % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t t0 = chunk * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), p.seqlen - t0));

  const auto* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + d * p.x_dim_stride;
  const auto* init = static_cast<const input_t*>(p.initial_states);
  // xs[i] = input at position t0 - (W-1) + i
  for (int i = threadIdx.x; i < n + W - 1; i += FwdTraits::kThreads) {
    const int64_t pos = t0 - (W - 1) + i;
    acc_t v = acc_t(0);
    if (pos >= 0) {
      v = static_cast<acc_t>(x[pos * p.x_l_stride]);
    } else if (init != nullptr) {
      v = static_cast<acc_t>(init[b * p.init_batch_stride + d * p.init_dim_stride + (W - 1 + pos) * p.init_l_stride]);
    }
    xs[i] = v;
  }
  const auto* weight = static_cast<const acc_t*>(p.weight) + d * W;
  acc_t w[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < W ? weight[k] : acc_t(0);
  const acc_t bias = p.bias ? static_cast<const acc_t*>(p.bias)[d] : acc_t(0);
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.seq_batch_stride : nullptr;
  __syncthreads();

  auto* out = static_cast<input_t*>(p.out) + row * p.seqlen + t0;
  for (int j = threadIdx.x; j < n; j += FwdTraits::kThreads) {
    acc_t acc = bias;
    const int64_t t = t0 + j;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      if (k < W && (seq == nullptr || same_sequence(seq, p.seq_l_stride, t, tap_position(t, k, W)))) {
        acc += w[k] * xs[j + k];
      }
    }
    out[j] = static_cast<input_t>(activation(acc, p.silu));
  }

  if (chunk == nchunks - 1 && threadIdx.x < W - 1) {
    const int j = threadIdx.x;
    const int64_t pos = p.seqlen - (W - 1) + j;
    acc_t v = acc_t(0);
    if (seq == nullptr || same_sequence(seq, p.seq_l_stride, p.seqlen - 1, pos)) {
      if (pos >= 0) {
        v = static_cast<acc_t>(x[pos * p.x_l_stride]);
      } else if (init != nullptr) {
        v = static_cast<acc_t>(init[b * p.init_batch_stride + d * p.init_dim_stride + (W - 1 + pos) * p.init_l_stride]);
      }
    }
    static_cast<input_t*>(p.final_states)[row * (W - 1) + j] = static_cast<input_t>(v);
  }
}

template <typename input_t>
void launch_fwd(const CausalConv1dParams& p, cudaStream_t stream) {
  const int64_t nchunks = (p.seqlen + FwdTraits::kChunk - 1) / FwdTraits::kChunk;
  const int64_t blocks = p.batch * p.dim * nchunks;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d: too many blocks (", blocks, ")");
  causal_conv1d_fwd_kernel<input_t><<<static_cast<unsigned>(blocks), FwdTraits::kThreads, 0, stream>>>(p);
  SSMK_CUDA_CHECK_LAUNCH();
}

// Decode step: one thread per (batch row, channel); the state row is read and rewritten once.
template <typename input_t, typename state_t>
__global__ void causal_conv1d_update_kernel(const CausalConv1dUpdateParams p) {
  using acc_t = acc_type<input_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.batch * p.dim) return;
  const int64_t b = r / p.dim, d = r % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t L = p.seqlen, S = p.state_len;
  auto* out = static_cast<input_t*>(p.out) + r * L;
  const int64_t sb = p.state_indices ? p.state_indices[b * p.indices_stride] : b;
  if (sb < 0 || sb >= p.state_batch) {
    for (int64_t t = 0; t < L; ++t) out[t] = static_cast<input_t>(0.0f);
    return;
  }
  auto* state = static_cast<state_t*>(p.conv_state) + sb * p.state_batch_stride + d * p.state_dim_stride;
  const auto* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + d * p.x_dim_stride;
  const auto* weight = static_cast<const acc_t*>(p.weight) + d * W;
  acc_t w[kMaxWidth], win[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) {
    w[k] = k < W ? weight[k] : acc_t(0);
    // win[k] for k < W-1: the last W-1 state entries (oldest first)
    win[k] = k < W - 1 ? static_cast<acc_t>(state[(S - (W - 1) + k) * p.state_l_stride]) : acc_t(0);
  }
  const acc_t bias = p.bias ? static_cast<const acc_t*>(p.bias)[d] : acc_t(0);
  // Register arrays are indexed with unrolled constants only (no local-memory spill).
  for (int64_t t = 0; t < L; ++t) {
    const acc_t xt = static_cast<acc_t>(x[t * p.x_l_stride]);
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
    state[j * p.state_l_stride] = src < S ? state[src * p.state_l_stride] : static_cast<state_t>(x[(src - S) * p.x_l_stride]);
  }
}

template <typename input_t, typename state_t>
void launch_update(const CausalConv1dUpdateParams& p, cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t blocks = (p.batch * p.dim + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  causal_conv1d_update_kernel<input_t, state_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  SSMK_CUDA_CHECK_LAUNCH();
}

}  // namespace ssmk::causal_conv1d
