// CUDA forward of the selective scan.
//
// One block per (channel d, batch b) row, kThreads threads, each owning kItems consecutive steps of
// a chunk of kChunkSize = kThreads * kItems steps (the CPU kernel's chunk). For every state index n
// the block scans the chunk's affine maps (a_t, b_t) with a block-wide associative scan, starting
// from the state carried from the previous chunk (kept in shared memory, one per n), and each
// thread accumulates y_t += Re(C_t[n] h_t[n]) for its steps. The state before each chunk is saved
// (checkpoints) for the backward.
//
// Traffic per row and step: u, delta (and z) read and out written in the input dtype, B_t and C_t
// (N values each, shared by the dim / groups channels of a group, mostly L2 hits), so at N = 16,
// bf16, variable B/C: 8 bytes/step from DRAM for u/delta/z/out plus (2 * 16 * 2) / (channels per
// L2-resident group) for B/C. FLOPs per step: N * (exp + ~6 FMA). At (8, 2048, 4096, 16) bf16 that
// is ~0.5 GB of compulsory traffic and ~10 GFLOP plus 0.5 G exp (MUFU): the kernel is bounded by
// the N block scans per chunk (2 barriers each) and the exp throughput rather than by DRAM; we
// expect ~50-70% of the copy bandwidth.
#pragma once

#include <c10/util/complex.h>

#include <type_traits>

#include "common/cuda/launch.h"
#include "common/cuda/scan.h"
#include "common/math.h"
#include "selective_scan/selective_scan.h"

namespace ssmk::selective_scan {

template <int kThreads_, int kItems_, typename input_t_, bool kComplex_>
struct ScanTraits {
  static constexpr int kThreads = kThreads_;
  static constexpr int kItems = kItems_;
  static constexpr int kWarps = kThreads / 32;
  static constexpr bool kComplex = kComplex_;
  static_assert(kThreads * kItems == kChunkSize, "a block processes one chunk per iteration");
  using input_t = input_t_;
  using acc_t = ssmk::acc_type<input_t>;
  using w_t = std::conditional_t<kComplex, c10::complex<acc_t>, acc_t>;
  using pair_t = ssmk::cuda::AffinePair<w_t>;
};

// B_t[n] or C_t[n] for channel d of batch b: fixed [D, N] in w_t, or variable [B, G, N, L] in the
// input dtype (real A) or w_t (complex A).
template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_bc(const void* ptr, bool variable, int64_t groups,
                                         int64_t batch_stride, int64_t group_stride, int64_t n_stride,
                                         int64_t l_stride, const SelectiveScanParams& p, int64_t b,
                                         int64_t d, int64_t n, int64_t t) {
  using w_t = typename Traits::w_t;
  if (!variable) return static_cast<const w_t*>(ptr)[d * p.dstate + n];
  const int64_t g = d / (p.dim / groups);
  const int64_t off = b * batch_stride + g * group_stride + n * n_stride + t * l_stride;
  if constexpr (Traits::kComplex) {
    return static_cast<const w_t*>(ptr)[off];
  } else {
    return static_cast<w_t>(static_cast<const typename Traits::input_t*>(ptr)[off]);
  }
}

template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_B(const SelectiveScanParams& p, int64_t b, int64_t d, int64_t n, int64_t t) {
  return load_bc<Traits>(p.B, p.B_variable, p.B_groups, p.B_batch_stride, p.B_group_stride, p.B_n_stride,
                         p.B_l_stride, p, b, d, n, t);
}

template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_C(const SelectiveScanParams& p, int64_t b, int64_t d, int64_t n, int64_t t) {
  return load_bc<Traits>(p.C, p.C_variable, p.C_groups, p.C_batch_stride, p.C_group_stride, p.C_n_stride,
                         p.C_l_stride, p, b, d, n, t);
}

// Shared-memory array of T without running T's constructor (c10::complex has a non-trivial one,
// which a __shared__ declaration does not allow).
#define SSMK_SHARED_ARRAY(T, NAME, COUNT)                                   \
  __shared__ alignas(alignof(T)) unsigned char NAME##_raw[(COUNT) * sizeof(T)]; \
  T* NAME = reinterpret_cast<T*>(NAME##_raw)

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) selective_scan_fwd_kernel(SelectiveScanParams p) {
  using input_t = typename Traits::input_t;
  using acc_t = typename Traits::acc_t;
  using w_t = typename Traits::w_t;
  using pair_t = typename Traits::pair_t;
  constexpr int kItems = Traits::kItems;
  constexpr acc_t kScale = acc_t(OutputScale<w_t>::value);

  SSMK_SHARED_ARRAY(pair_t, warp_totals, Traits::kWarps);
  SSMK_SHARED_ARRAY(w_t, state, kMaxDstate);

  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t N = p.dstate, L = p.seqlen, nc = p.n_chunks;
  const int64_t row = b * p.dim + d;
  const int tid = threadIdx.x;
  const auto* u_ptr = static_cast<const input_t*>(p.u) + b * p.u_batch_stride + d * p.u_dim_stride;
  const auto* delta_ptr = static_cast<const input_t*>(p.delta) + b * p.delta_batch_stride + d * p.delta_dim_stride;
  const auto* z_ptr = p.z ? static_cast<const input_t*>(p.z) + b * p.z_batch_stride + d * p.z_dim_stride : nullptr;
  const auto* A = static_cast<const w_t*>(p.A) + d * N;
  const acc_t Dd = p.D ? static_cast<const acc_t*>(p.D)[d] : acc_t(0);
  const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  auto* out = static_cast<input_t*>(p.out) + row * L;
  auto* ckpt = static_cast<w_t*>(p.checkpoints) + row * nc * N;

  for (int64_t n = tid; n < N; n += Traits::kThreads) {
    state[n] = p.initial_state
                   ? static_cast<const w_t*>(p.initial_state)[b * p.init_batch_stride + d * p.init_dim_stride +
                                                              n * p.init_n_stride]
                   : w_t(0);
  }
  __syncthreads();

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t_first = c * kChunkSize + static_cast<int64_t>(tid) * kItems;
    acc_t u[kItems], dt[kItems], y[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t_first + j;
      const bool valid = t < L;
      // Steps past the end get dt = 0: a = 1, b = 0, so the carried state passes unchanged.
      u[j] = valid ? static_cast<acc_t>(u_ptr[t * p.u_l_stride]) : acc_t(0);
      dt[j] = valid ? delta_transform(static_cast<acc_t>(delta_ptr[t * p.delta_l_stride]), bias, p.softplus)
                    : acc_t(0);
      y[j] = acc_t(0);
    }
    for (int64_t n = 0; n < N; ++n) {
      const w_t An = A[n];
      const w_t h0 = state[n];
      if (tid == 0) ckpt[c * N + n] = h0;
      w_t a[kItems], bb[kItems];
      pair_t agg = ssmk::cuda::affine_identity<w_t>();
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t_first + j;
        a[j] = discretize(dt[j], An);
        const w_t Bv = t < L ? load_B<Traits>(p, b, d, n, t) : w_t(0);
        bb[j] = Bv * (dt[j] * u[j]);
        agg = ssmk::cuda::affine_compose(agg, pair_t{a[j], bb[j]});
      }
      pair_t total;
      const pair_t pre = ssmk::cuda::block_exclusive_scan<Traits::kThreads, false>(agg, warp_totals, total);
      w_t h = pre.a * h0 + pre.b;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t_first + j;
        h = a[j] * h + bb[j];
        if (t < L) y[j] += real_part(load_C<Traits>(p, b, d, n, t) * h);
      }
      // Every thread read state[n] before the scan's barriers.
      if (tid == 0) state[n] = total.a * h0 + total.b;
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t_first + j;
      if (t < L) {
        const acc_t zv = z_ptr ? static_cast<acc_t>(z_ptr[t * p.z_l_stride]) : acc_t(0);
        out[t] = static_cast<input_t>(epilogue(kScale * y[j], u[j], Dd, zv, z_ptr != nullptr));
      }
    }
  }
  __syncthreads();
  auto* last = static_cast<w_t*>(p.last_state) + row * N;
  for (int64_t n = tid; n < N; n += Traits::kThreads) last[n] = state[n];
}

template <typename input_t, bool kComplex>
void launch_fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  using Traits = ScanTraits<256, 8, input_t, kComplex>;
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  selective_scan_fwd_kernel<Traits><<<grid, Traits::kThreads, 0, stream>>>(p);
  SSMK_CUDA_CHECK_LAUNCH();
}

}  // namespace ssmk::selective_scan
