// CUDA backward of causal_conv1d.
//
// Block per (batch, channel, chunk), as in the forward. With g[t] = dout[t] * act'(pre[t]):
//   dx[p] = sum_k w[k] g[p + W-1-k]  (+ dfinal for the last W-1 positions),
//   dinit[j] = same sum for positions j-(W-1) < 0 (first chunk only),
//   dw[k] = sum_{b,t} g[t] x[t-W+1+k],  dbias = sum_{b,t} g[t].
// The chunk needs g on [t0, t0+n+W-1) and so x on [t0-W+1, t0+n+W-1): both staged in shared
// memory. dw/dbias partial sums per block go to a workspace [D, B * n_chunks, W+1] and a second
// kernel reduces them per channel in a fixed order (bitwise reproducible, no atomics).
// Bytes per element: read x and dout, write dx (3 * sizeof(input_t)); the pre-activation is
// recomputed rather than stored.
#pragma once

#include "causal_conv1d/causal_conv1d.h"
#include "common/cuda/reduce.h"

namespace ssmk::causal_conv1d {

struct BwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = kChunkSize;
  static constexpr int kPartials = kBwdPartials;  // dw[0..W-1], dbias
};

template <typename input_t>
__global__ void __launch_bounds__(BwdTraits::kThreads) causal_conv1d_bwd_kernel(const CausalConv1dBwdParams<input_t> p,
                                                                                acc_t<input_t>* partials) {
  using acc_t = ssmk::acc_t<input_t>;
  constexpr int kChunk = BwdTraits::kChunk;
  constexpr int kThreads = BwdTraits::kThreads;
  __shared__ acc_t xs[kChunk + 2 * (kMaxWidth - 1)];  // position t0 - (W-1) + i
  __shared__ acc_t gs[kChunk + kMaxWidth - 1];        // position t0 + i (zero past the end)
  __shared__ acc_t scratch[kThreads / 32];

  const int64_t nchunks = (p.seqlen + kChunk - 1) / kChunk;
  const int64_t chunk = blockIdx.x % nchunks;
  const int64_t row = blockIdx.x / nchunks;
  const int64_t b = row / p.dim, d = row % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t L = p.seqlen;
  const int64_t t0 = chunk * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), L - t0));

  const auto* x = p.x.data + b * p.x.stride[0] + d * p.x.stride[1];
  const auto* init = p.initial_states.data;
  const auto* dout = p.dout.data + b * p.dout.stride[0] + d * p.dout.stride[1];
  const int32_t* seq = p.seq_idx.data ? p.seq_idx.data + b * p.seq_idx.stride[0] : nullptr;

  for (int i = threadIdx.x; i < n + 2 * (W - 1); i += kThreads) {
    const int64_t pos = t0 - (W - 1) + i;
    acc_t v = acc_t(0);
    if (pos >= 0 && pos < L) {
      v = static_cast<acc_t>(x[pos * p.x.stride[2]]);
    } else if (pos < 0 && init != nullptr) {
      v = static_cast<acc_t>(init[b * p.initial_states.stride[0] + d * p.initial_states.stride[1] + (W - 1 + pos) * p.initial_states.stride[2]]);
    }
    xs[i] = v;
  }
  acc_t w[kMaxWidth];
  const acc_t bias = load_taps(p.weight, p.bias, d, W, w);
  __syncthreads();

  // g on [t0, t0 + n + W - 1), recomputing the pre-activation.
  for (int i = threadIdx.x; i < n + W - 1; i += kThreads) {
    const int64_t t = t0 + i;
    acc_t g = acc_t(0);
    if (t < L) {
      acc_t pre = bias;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        if (k < W && (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], t, tap_position(t, k, W)))) {
          pre += w[k] * xs[i + k];
        }
      }
      g = activation_backward(pre, static_cast<acc_t>(dout[t * p.dout.stride[2]]), p.silu);
    }
    gs[i] = g;
  }
  __syncthreads();

  const auto* dfinal = p.dfinal_states.data;
  const int64_t final_begin = L - (W - 1);  // first position copied into final_states
  auto* dx = p.dx + row * L + t0;
  acc_t part[BwdTraits::kPartials];
#pragma unroll
  for (int k = 0; k < BwdTraits::kPartials; ++k) part[k] = acc_t(0);
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int64_t pos = t0 + j;
    acc_t acc = acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const int64_t t = pos + (W - 1) - k;  // output that reads `pos` through tap k
      if (k < W && t < L && (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], t, pos))) {
        acc += w[k] * gs[j + (W - 1) - k];
      }
    }
    if (dfinal != nullptr && pos >= final_begin &&
        (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], L - 1, pos))) {
      const int64_t jf = pos - final_begin;
      acc += static_cast<acc_t>(dfinal[b * p.dfinal_states.stride[0] + d * p.dfinal_states.stride[1] + jf * p.dfinal_states.stride[2]]);
    }
    dx[j] = static_cast<input_t>(acc);
    // partial dw / dbias for output t0 + j
    const acc_t g = gs[j];
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      if (k < W && (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], pos, tap_position(pos, k, W)))) {
        part[k] += g * xs[j + k];
      }
    }
    part[kMaxWidth] += g;
  }

  if (chunk == 0 && threadIdx.x < W - 1) {
    const int jj = threadIdx.x;
    const int64_t pos = jj - (W - 1);  // negative: a history slot
    acc_t acc = acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const int64_t t = pos + (W - 1) - k;
      if (k < W && t >= 0 && t < L && (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], t, pos))) {
        acc += w[k] * gs[t];  // chunk 0: gs index == position
      }
    }
    if (dfinal != nullptr && pos >= final_begin &&
        (seq == nullptr || same_sequence(seq, p.seq_idx.stride[1], L - 1, pos))) {
      const int64_t jf = pos - final_begin;
      acc += static_cast<acc_t>(dfinal[b * p.dfinal_states.stride[0] + d * p.dfinal_states.stride[1] + jf * p.dfinal_states.stride[2]]);
    }
    p.dinitial_states[row * (W - 1) + jj] = static_cast<input_t>(acc);
  }

  acc_t* out = partials + ((d * p.batch + b) * nchunks + chunk) * BwdTraits::kPartials;
#pragma unroll
  for (int k = 0; k < BwdTraits::kPartials; ++k) {
    const acc_t total = ssmk::cuda::block_reduce_sum<kThreads>(part[k], scratch);
    if (threadIdx.x == 0) out[k] = total;
  }
}

// One block per channel: sums the [B * n_chunks, W+1] partials of that channel in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(BwdTraits::kThreads) causal_conv1d_bwd_reduce_kernel(
    const acc_t* partials, int64_t count, int width, acc_t* dweight, acc_t* dbias) {
  constexpr int kThreads = BwdTraits::kThreads;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t d = blockIdx.x;
  const acc_t* src = partials + d * count * BwdTraits::kPartials;
  acc_t sums[BwdTraits::kPartials];
#pragma unroll
  for (int k = 0; k < BwdTraits::kPartials; ++k) sums[k] = acc_t(0);
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
#pragma unroll
    for (int k = 0; k < BwdTraits::kPartials; ++k) sums[k] += src[i * BwdTraits::kPartials + k];
  }
#pragma unroll
  for (int k = 0; k < BwdTraits::kPartials; ++k) {
    const acc_t total = ssmk::cuda::block_reduce_sum<kThreads>(sums[k], scratch);
    if (threadIdx.x == 0) {
      if (k < width) dweight[d * width + k] = total;
      if (k == kMaxWidth) dbias[d] = total;
    }
  }
}

}  // namespace ssmk::causal_conv1d
