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
//
// Packed sequences: each thread finds, per chunk, which of its steps start or end a sequence (a
// binary search over the offsets read on the device, common/packed_seqs.h). A starting step's map
// becomes h -> 0 * h + (a h0 + b) with h0 the sequence's initial state (or zero), which the block
// scan composes like any other; an ending step writes its sequence's final state. The grid and the
// chunk loop are unchanged.
#pragma once

#include <c10/util/complex.h>

#include <type_traits>

#include "common/cuda/scan.h"
#include "common/math.h"
#include "common/packed_seqs.h"
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
  using acc_t = ssmk::acc_t<input_t>;
  using w_t = selective_scan_state_t<input_t, kComplex>;
  using Params = SelectiveScanCommon<input_t, kComplex>;
  using pair_t = ssmk::cuda::AffinePair<w_t>;
};

// B_t[n] or C_t[n] for channel d of batch b: fixed [D, N] in w_t, or variable [B, G, N, L] in the
// input dtype (real A) or w_t (complex A).
template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_bc(const typename Traits::Params::BC& op, const typename Traits::Params& p,
                                         int64_t b, int64_t d, int64_t n, int64_t t) {
  using w_t = typename Traits::w_t;
  if (!op.variable) return op.fixed[d * p.dstate + n];
  const int64_t g = d / (p.dim / op.groups);
  const int64_t off = b * op.var.stride[0] + g * op.var.stride[1] + n * op.var.stride[2] + t * op.var.stride[3];
  if constexpr (Traits::kComplex) {
    return op.var.data[off];
  } else {
    return static_cast<w_t>(op.var.data[off]);
  }
}

template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_B(const typename Traits::Params& p, int64_t b, int64_t d, int64_t n, int64_t t) {
  return load_bc<Traits>(p.B, p, b, d, n, t);
}

template <typename Traits>
SSMK_DEVICE typename Traits::w_t load_C(const typename Traits::Params& p, int64_t b, int64_t d, int64_t n, int64_t t) {
  return load_bc<Traits>(p.C, p, b, d, n, t);
}

// The packed-sequence bounds of a thread's steps t_first .. t_first + kItems - 1 of batch row b:
// start[j] / end[j] hold the sequence's index (-1 for seq_idx) where a sequence starts / ends at
// step j, kNoBound elsewhere.
constexpr int64_t kNoBound = -2;
template <int kItems, typename Params>
SSMK_DEVICE void step_bounds(const Params& p, int64_t b, int64_t t_first, int64_t (&start)[kItems],
                             int64_t (&end)[kItems]) {
  for_token_bounds<kItems>(p.seqs, b, t_first, p.seqlen, [&](int j, const TokenBounds& tb) {
    start[j] = tb.start ? tb.seq : kNoBound;
    end[j] = tb.end ? tb.seq : kNoBound;
  });
}

// State n of channel d of sequence seq in a [S, D, N] state view, or zero (seq < 0, or no state).
template <typename W>
SSMK_DEVICE W sequence_state(const View<const W, 3>& v, int64_t seq, int64_t d, int64_t n) {
  return v.data && seq >= 0 ? v.data[seq * v.stride[0] + d * v.stride[1] + n * v.stride[2]] : W(0);
}

// Shared-memory array of T without running T's constructor (c10::complex has a non-trivial one,
// which a __shared__ declaration does not allow).
#define SSMK_SHARED_ARRAY(T, NAME, COUNT)                                   \
  __shared__ alignas(alignof(T)) unsigned char NAME##_raw[(COUNT) * sizeof(T)]; \
  T* NAME = reinterpret_cast<T*>(NAME##_raw)

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    selective_scan_fwd_kernel(SelectiveScanFwdParams<typename Traits::input_t, Traits::kComplex> p) {
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
  const input_t* u_ptr = p.u.data + b * p.u.stride[0] + d * p.u.stride[1];
  const input_t* delta_ptr = p.delta.data + b * p.delta.stride[0] + d * p.delta.stride[1];
  const input_t* z_ptr = p.z.data ? p.z.data + b * p.z.stride[0] + d * p.z.stride[1] : nullptr;
  const w_t* A = p.A + d * N;
  const acc_t Dd = p.D ? p.D[d] : acc_t(0);
  const acc_t bias = p.delta_bias ? p.delta_bias[d] : acc_t(0);
  input_t* out = p.out + row * L;
  w_t* ckpt = p.checkpoints + row * nc * N;
  const auto& init = p.initial_state;

  const bool packed = p.seqs.packed();
  for (int64_t n = tid; n < N; n += Traits::kThreads) {
    state[n] = init.data && !packed ? init.data[b * init.stride[0] + d * init.stride[1] + n * init.stride[2]] : w_t(0);
  }
  __syncthreads();

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t_first = c * kChunkSize + static_cast<int64_t>(tid) * kItems;
    acc_t u[kItems], dt[kItems], y[kItems];
    int64_t starts[kItems], ends[kItems];
    step_bounds<kItems>(p, b, t_first, starts, ends);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t_first + j;
      const bool valid = t < L;
      // Steps past the end get dt = 0: a = 1, b = 0, so the carried state passes unchanged.
      u[j] = valid ? static_cast<acc_t>(u_ptr[t * p.u.stride[2]]) : acc_t(0);
      dt[j] = valid ? delta_transform(static_cast<acc_t>(delta_ptr[t * p.delta.stride[2]]), bias, p.delta_softplus)
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
        // A starting step: h = a h0 + b whatever came before (a is then 0 for the scan).
        if (starts[j] != kNoBound) {
          bb[j] = a[j] * sequence_state(init, starts[j], d, n) + bb[j];
          a[j] = w_t(0);
        }
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
        if (ends[j] >= 0) p.last_state[(ends[j] * p.dim + d) * N + n] = h;
      }
      // Every thread read state[n] before the scan's barriers.
      if (tid == 0) state[n] = total.a * h0 + total.b;
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t_first + j;
      if (t < L) {
        const acc_t zv = z_ptr ? static_cast<acc_t>(z_ptr[t * p.z.stride[2]]) : acc_t(0);
        out[t] = static_cast<input_t>(epilogue(kScale * y[j], u[j], Dd, zv, z_ptr != nullptr));
      }
    }
  }
  __syncthreads();
  if (packed) return;  // every sequence's final state is written where it ends
  w_t* last = p.last_state + row * N;
  for (int64_t n = tid; n < N; n += Traits::kThreads) last[n] = state[n];
}

}  // namespace ssmk::selective_scan
