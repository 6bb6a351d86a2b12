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
#include "common/cuda/launch.h"
#include "common/cuda/reduce.h"

namespace ssmk::causal_conv1d {

struct BwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = kChunkSize;
  static constexpr int kPartials = kMaxWidth + 1;  // dw[0..W-1], dbias
};

template <typename input_t>
__global__ void __launch_bounds__(BwdTraits::kThreads) causal_conv1d_bwd_kernel(const CausalConv1dParams p,
                                                                                acc_type<input_t>* partials) {
  using acc_t = acc_type<input_t>;
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

  const auto* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + d * p.x_dim_stride;
  const auto* init = static_cast<const input_t*>(p.initial_states);
  const auto* dout = static_cast<const input_t*>(p.dout) + b * p.dout_batch_stride + d * p.dout_dim_stride;
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.seq_batch_stride : nullptr;

  for (int i = threadIdx.x; i < n + 2 * (W - 1); i += kThreads) {
    const int64_t pos = t0 - (W - 1) + i;
    acc_t v = acc_t(0);
    if (pos >= 0 && pos < L) {
      v = static_cast<acc_t>(x[pos * p.x_l_stride]);
    } else if (pos < 0 && init != nullptr) {
      v = static_cast<acc_t>(init[b * p.init_batch_stride + d * p.init_dim_stride + (W - 1 + pos) * p.init_l_stride]);
    }
    xs[i] = v;
  }
  const auto* weight = static_cast<const acc_t*>(p.weight) + d * W;
  acc_t w[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < W ? weight[k] : acc_t(0);
  const acc_t bias = p.bias ? static_cast<const acc_t*>(p.bias)[d] : acc_t(0);
  __syncthreads();

  // g on [t0, t0 + n + W - 1), recomputing the pre-activation.
  for (int i = threadIdx.x; i < n + W - 1; i += kThreads) {
    const int64_t t = t0 + i;
    acc_t g = acc_t(0);
    if (t < L) {
      acc_t pre = bias;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        if (k < W && (seq == nullptr || same_sequence(seq, p.seq_l_stride, t, tap_position(t, k, W)))) {
          pre += w[k] * xs[i + k];
        }
      }
      g = activation_backward(pre, static_cast<acc_t>(dout[t * p.dout_l_stride]), p.silu);
    }
    gs[i] = g;
  }
  __syncthreads();

  const auto* dfinal = static_cast<const input_t*>(p.dfinal_states);
  const int64_t final_begin = L - (W - 1);  // first position copied into final_states
  auto* dx = static_cast<input_t*>(p.dx) + row * L + t0;
  acc_t part[BwdTraits::kPartials];
#pragma unroll
  for (int k = 0; k < BwdTraits::kPartials; ++k) part[k] = acc_t(0);
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int64_t pos = t0 + j;
    acc_t acc = acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const int64_t t = pos + (W - 1) - k;  // output that reads `pos` through tap k
      if (k < W && t < L && (seq == nullptr || same_sequence(seq, p.seq_l_stride, t, pos))) {
        acc += w[k] * gs[j + (W - 1) - k];
      }
    }
    if (dfinal != nullptr && pos >= final_begin &&
        (seq == nullptr || same_sequence(seq, p.seq_l_stride, L - 1, pos))) {
      const int64_t jf = pos - final_begin;
      acc += static_cast<acc_t>(dfinal[b * p.dfinal_batch_stride + d * p.dfinal_dim_stride + jf * p.dfinal_l_stride]);
    }
    dx[j] = static_cast<input_t>(acc);
    // partial dw / dbias for output t0 + j
    const acc_t g = gs[j];
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      if (k < W && (seq == nullptr || same_sequence(seq, p.seq_l_stride, pos, tap_position(pos, k, W)))) {
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
      if (k < W && t >= 0 && t < L && (seq == nullptr || same_sequence(seq, p.seq_l_stride, t, pos))) {
        acc += w[k] * gs[t];  // chunk 0: gs index == position
      }
    }
    if (dfinal != nullptr && pos >= final_begin &&
        (seq == nullptr || same_sequence(seq, p.seq_l_stride, L - 1, pos))) {
      const int64_t jf = pos - final_begin;
      acc += static_cast<acc_t>(dfinal[b * p.dfinal_batch_stride + d * p.dfinal_dim_stride + jf * p.dfinal_l_stride]);
    }
    static_cast<input_t*>(p.dinitial_states)[row * (W - 1) + jj] = static_cast<input_t>(acc);
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

template <typename input_t>
void launch_bwd(const CausalConv1dParams& p, acc_type<input_t>* partials, cudaStream_t stream) {
  using acc_t = acc_type<input_t>;
  const int64_t nchunks = (p.seqlen + BwdTraits::kChunk - 1) / BwdTraits::kChunk;
  const int64_t blocks = p.batch * p.dim * nchunks;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "causal_conv1d: too many blocks (", blocks, ")");
  causal_conv1d_bwd_kernel<input_t><<<static_cast<unsigned>(blocks), BwdTraits::kThreads, 0, stream>>>(p, partials);
  SSMK_CUDA_CHECK_LAUNCH();
  causal_conv1d_bwd_reduce_kernel<acc_t><<<static_cast<unsigned>(p.dim), BwdTraits::kThreads, 0, stream>>>(
      partials, p.batch * nchunks, static_cast<int>(p.width), static_cast<acc_t*>(p.dweight),
      static_cast<acc_t*>(p.dbias));
  SSMK_CUDA_CHECK_LAUNCH();
}

}  // namespace ssmk::causal_conv1d
