// selective_scan and selective_state_update: typed kernel parameters and the kernel launchers of
// both devices. The host side (checks, allocation, the fill of these params, the reductions of
// the per-row gradients) is selective_scan_op.cpp.
#pragma once

#include <c10/util/complex.h>

#include <cstdint>
#include <type_traits>

#include "common/packed_seqs.h"
#include "common/types.h"
#include "selective_scan/selective_scan_math.h"

namespace ssmk {

// Strides are in elements (complex elements for complex tensors); sizes and offsets are 64-bit.
// W is the state type: acc_t<T> for real A, c10::complex<acc_t<T>> for complex A.
template <typename T, bool kComplex>
using selective_scan_state_t = std::conditional_t<kComplex, c10::complex<acc_t<T>>, acc_t<T>>;

// B or C: fixed ([D, N] W, contiguous) or variable ([B, G, N, L], T for real A and W for complex
// A, any strides; variable without groups is G = 1).
template <typename W, typename V>
struct SelectiveScanBC {
  bool variable;
  int64_t groups;         // G (variable only)
  const W* fixed;         // [D, N], or nullptr
  View<const V, 4> var;   // [B, G, N, L], or data nullptr
};

template <typename T, bool kComplex>
struct SelectiveScanCommon {
  using acc = acc_t<T>;
  using W = selective_scan_state_t<T, kComplex>;
  using BC = SelectiveScanBC<W, std::conditional_t<kComplex, W, T>>;
  int64_t batch, dim, seqlen, dstate, n_chunks;
  bool delta_softplus;
  View<const T, 3> u;      // [B, D, L]
  View<const T, 3> delta;  // [B, D, L]
  View<const T, 3> z;      // [B, D, L], or data nullptr
  const W* A;              // [D, N] contiguous
  BC B, C;
  const acc* D;                    // [D] contiguous, or nullptr
  const acc* delta_bias;           // [D] contiguous, or nullptr
  View<const W, 3> initial_state;  // [B, D, N] ([S, D, N] with cu_seqlens), or data nullptr
  // Packed sequences along L: the state restarts where one starts (from its initial state with
  // cu_seqlens, else zero) and its final state is read off where it ends (common/packed_seqs.h).
  PackedSeqs seqs;
};

template <typename T, bool kComplex>
struct SelectiveScanFwdParams : SelectiveScanCommon<T, kComplex> {
  using W = selective_scan_state_t<T, kComplex>;
  T* out;          // [B, D, L] contiguous
  W* last_state;   // [B, D, N] ([S, D, N] with cu_seqlens) contiguous
  W* checkpoints;  // [B, D, n_chunks, N] contiguous: the state before each chunk
};

// Channels are processed in slices of slice_channels consecutive channels (one CPU task or CUDA
// block each, channels in order), so the gradients of variable B/C, summed over the channels of a
// group, are reduced without atomics: each slice writes its own partial sum.
template <typename T, bool kComplex>
struct SelectiveScanBwdParams : SelectiveScanCommon<T, kComplex> {
  using acc = acc_t<T>;
  using W = selective_scan_state_t<T, kComplex>;
  const W* checkpoints;          // [B, D, n_chunks, N] contiguous: the forward's
  View<const T, 3> dout;         // [B, D, L]
  View<const W, 3> dlast_state;  // [B, D, N] ([S, D, N] with cu_seqlens), or data nullptr
  int64_t slice_channels, n_slices;  // n_slices = dim / slice_channels
  T* du;                  // [B, D, L] contiguous
  T* ddelta;              // [B, D, L] contiguous
  T* dz;                  // [B, D, L] contiguous, or nullptr
  W* dA_rows;             // [B, D, N]: per-row sums over time
  W* dB_rows;             // fixed B: [B, D, N]
  W* dC_rows;             // fixed C: [B, D, N]
  W* dB_partial;          // variable B, CUDA: [n_slices, B, N, L] (CPU: SelectiveScanCpuLayout)
  W* dC_partial;
  acc* dD_rows;           // [B, D]
  acc* ddelta_bias_rows;  // [B, D]
  W* dinitial_state;      // [B, D, N] ([S, D, N] with cu_seqlens) contiguous
};

// The CPU kernels' layout of A, B and C, prepared by the host so the inner loops run over
// contiguous arrays: NW = N (real) or 2N (complex: N real parts, then N imaginary parts).
// Row (b, d) at step t starts at row(b, d) + t * step (step = 0 for fixed B/C).
template <typename acc>
struct SelectiveScanCpuOperand {
  const acc* data;  // fixed: [D, NW]; variable: [B, G, L, NW]
  bool variable;
  int64_t groups, step;

  const acc* row(int64_t dim, int64_t seqlen, int64_t b, int64_t d, int64_t nw) const {
    if (!variable) return data + d * nw;
    const int64_t g = d / (dim / groups);
    return data + (b * groups + g) * seqlen * nw;
  }
};

template <typename acc>
struct SelectiveScanCpuLayout {
  int64_t nw;
  const acc* A;  // [D, NW]
  SelectiveScanCpuOperand<acc> B, C;
  // Backward, variable B/C: [n_slices, B, L, NW] partial sums (complex: (re, im) pairs).
  acc* dB_partial;
  acc* dC_partial;
};

template <typename T>
struct SelectiveStateUpdateParams {
  using acc = acc_t<T>;
  int64_t batch, nheads, headdim, dstate, groups, state_batch;
  bool dt_softplus;
  View<acc, 4> state;   // [B_state, H, P, N]
  View<const T, 3> x;   // [B, H, P]
  View<const T, 3> dt;  // [B, H, P]
  View<const T, 3> z;   // [B, H, P], or data nullptr
  const acc* A;         // [H, P, N] contiguous
  const acc* B;         // [B, G, N] contiguous
  const acc* C;         // [B, G, N] contiguous
  const acc* D;         // [H, P] contiguous, or nullptr
  const acc* dt_bias;   // [H, P] contiguous, or nullptr
  // [B] or nullptr; a negative index, or one >= state_batch, is a padding row (no state access,
  // zeros out).
  const int64_t* state_batch_indices;
  T* out;  // [B, H, P] contiguous
};

template <typename T, bool kComplex> void selective_scan_fwd_cpu(const SelectiveScanFwdParams<T, kComplex>& p,
                            const SelectiveScanCpuLayout<acc_t<T>>& lay);
template <typename T, bool kComplex> void selective_scan_bwd_cpu(const SelectiveScanBwdParams<T, kComplex>& p,
                            const SelectiveScanCpuLayout<acc_t<T>>& lay);
template <typename T> void selective_state_update_cpu(const SelectiveStateUpdateParams<T>& p);

#if defined(SSMK_WITH_CUDA)
template <typename T, bool kComplex> void selective_scan_fwd_cuda(const SelectiveScanFwdParams<T, kComplex>& p, const CudaContext& ctx);
template <typename T, bool kComplex> void selective_scan_bwd_cuda(const SelectiveScanBwdParams<T, kComplex>& p, const CudaContext& ctx);
template <typename T> void selective_state_update_cuda(const SelectiveStateUpdateParams<T>& p, const CudaContext& ctx);
#endif

}  // namespace ssmk
