// causal_conv1d: typed kernel parameters and the kernel launchers of both devices.
//
// x is [B, D, L] with any strides; the weight and bias are read in the accumulation dtype and
// contiguous; the outputs are contiguous. The host side (checks, allocation, the fill of these
// params) is causal_conv1d_op.cpp.
#pragma once

#include <cstdint>

#include "causal_conv1d/causal_conv1d_math.h"
#include "common/types.h"

namespace ssmk {

template <typename T>
struct CausalConv1dCommon {
  using acc = acc_t<T>;
  int64_t batch, dim, seqlen, width;
  bool silu;
  View<const T, 3> x;                    // [B, D, L]
  const acc* weight;                     // [D, W] contiguous
  const acc* bias;                       // [D], or nullptr
  View<const T, 3> initial_states;       // [B, D, W-1], or data nullptr (zeros)
  View<const int32_t, 2> seq_idx;        // [B, L], or data nullptr
  // Packed sequences on the CPU (batch 1): [num_seqs + 1] offsets in host memory, or nullptr.
  // Each sequence then runs as its own row segment, with initial/final states (and their
  // gradients) [num_seqs, D, W-1].
  const int64_t* offsets;
  int64_t num_seqs;
};

template <typename T>
struct CausalConv1dFwdParams : CausalConv1dCommon<T> {
  T* out;           // [B, D, L] contiguous
  T* final_states;  // [B, D, W-1] contiguous
};

template <typename T>
struct CausalConv1dBwdParams : CausalConv1dCommon<T> {
  using acc = acc_t<T>;
  View<const T, 3> dout;           // [B, D, L]
  View<const T, 3> dfinal_states;  // [B, D, W-1], or data nullptr
  T* dx;                           // [B, D, L] contiguous
  T* dinitial_states;              // [B, D, W-1] contiguous, always written
  acc* dweight;                    // [D, W] contiguous
  acc* dbias;                      // [D], always written
};

// Decode step: x in dtype T, the state in its own dtype S.
template <typename T, typename S>
struct CausalConv1dUpdateParams {
  using acc = acc_t<T>;
  int64_t batch, dim, seqlen, width;
  bool silu;
  int64_t state_batch, state_len;
  View<const T, 3> x;                       // [B, D, L]
  View<S, 3> conv_state;                    // [B_state, D, S], updated in place
  View<const int32_t, 1> conv_state_indices;  // [B], or data nullptr; outside [0, B_state) = padding row
  const acc* weight;                        // [D, W] contiguous
  const acc* bias;                          // [D], or nullptr
  T* out;                                   // [B, D, L] contiguous
};

namespace causal_conv1d {

// The CUDA backward's workspace: per (channel, batch, chunk) partial sums of dweight[0..W-1]
// and dbias, [D, B * n_chunks, kBwdPartials] in the accumulation dtype.
constexpr int kBwdPartials = kMaxWidth + 1;

inline int64_t num_chunks(int64_t seqlen) { return (seqlen + kChunkSize - 1) / kChunkSize; }

}  // namespace causal_conv1d

template <typename T> void causal_conv1d_fwd_cpu(const CausalConv1dFwdParams<T>& p);
template <typename T> void causal_conv1d_bwd_cpu(const CausalConv1dBwdParams<T>& p);
template <typename T, typename S> void causal_conv1d_update_cpu(const CausalConv1dUpdateParams<T, S>& p);

#if defined(SSMK_WITH_CUDA)
template <typename T> void causal_conv1d_fwd_cuda(const CausalConv1dFwdParams<T>& p, const CudaContext& ctx);
template <typename T> void causal_conv1d_bwd_cuda(const CausalConv1dBwdParams<T>& p, acc_t<T>* partials, const CudaContext& ctx);
template <typename T, typename S> void causal_conv1d_update_cuda(const CausalConv1dUpdateParams<T, S>& p, const CudaContext& ctx);
#endif

}  // namespace ssmk
