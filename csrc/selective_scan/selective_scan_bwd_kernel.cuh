// CUDA backward of the selective scan.
//
// One block per (slice of slice_channels channels, batch b); the block walks the channels of its
// slice in order, and for each the chunks from last to first. Inside a chunk, for every state index
// n: recompute the forward from the chunk's checkpoint with the block scan (h_{t-1} per step, kept
// in registers), then run the reverse recurrence of the adjoint
//   K_t = conj(a_t) (K_{t+1} + e_t),  e_t = s g_t conj(C_t[n])   (s = 2 for complex A, else 1)
// as a reverse block scan of the pairs (conj(a_t), conj(a_t) e_t) starting from the carry K of the
// next chunk (kept in shared memory per n; initialised with dlast_state). From G_t = K_{t+1} + e_t:
//   dA[n]  += dt_t K_t conj(h_{t-1}),      ddt_t += Re(conj(A[n]) K_t conj(h_{t-1}))
//   ddt_t  += u_t Re(conj(B_t[n]) G_t),    du_t  += dt_t Re(conj(B_t[n]) G_t)
//   dB_t[n] = dt_t u_t G_t,                dC_t[n] = s g_t conj(h_t)
// Sums over time (dA, fixed dB/dC, dD, ddelta_bias) are block reductions in a fixed order, written
// per row; the sums of variable dB/dC over the channels of a slice are accumulated by the block in
// channel order into its own partial buffer. The host reduces rows and slices in a fixed order, so
// the gradients are bitwise reproducible (no floating-point atomics).
//
// Packed sequences (see the forward): the recomputation restarts where a sequence starts (h_{t-1}
// is then its initial state); the adjoint restarts where one ends, K_{t+1} replaced by the
// sequence's final-state gradient (pair (0, conj(a_t) (dlast + e_t))), and K_t is written out as
// the initial-state gradient where it starts.
//
// Traffic per row and step: u, delta, z, dout read and du, ddelta, dz written (7 x input dtype),
// checkpoints (N per chunk) and, for variable B/C, a read-modify-write of the slice's partial sums
// (2 x 2 x N x 4 bytes per channel and step, L2-resident only for short sequences): this RMW
// dominates at large N and bounds the kernel by DRAM bandwidth, like the atomics of mamba_ssm's
// backward. FLOPs per step: N * (2 exp-equivalents for the recomputation, ~25 FMA).
#pragma once

#include "common/cuda/reduce.h"
#include "selective_scan/selective_scan_fwd_kernel.cuh"

namespace ssmk::selective_scan {

// Sums each of kN values over the block; thread 0 receives the sums (fixed order).
template <int kThreads, int kN, typename T>
SSMK_DEVICE void block_sum_to_first(T (&v)[kN], T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kN; ++k) v[k] = ssmk::cuda::warp_reduce_sum(v[k]);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) scratch[warp * kN + k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      T s = scratch[k];
      for (int w = 1; w < kThreads / 32; ++w) s += scratch[w * kN + k];
      v[k] = s;
    }
  }
}

template <typename T>
SSMK_DEVICE void split_add(T (&v)[6], int k, T x) {
  v[2 * k] += x;
}
template <typename T>
SSMK_DEVICE void split_add(T (&v)[6], int k, c10::complex<T> x) {
  v[2 * k] += x.real();
  v[2 * k + 1] += x.imag();
}
template <typename W, typename T>
SSMK_DEVICE W join(const T (&v)[6], int k) {
  if constexpr (std::is_same_v<W, T>) {
    return v[2 * k];
  } else {
    return W(v[2 * k], v[2 * k + 1]);
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    selective_scan_bwd_kernel(SelectiveScanBwdParams<typename Traits::input_t, Traits::kComplex> p) {
  using input_t = typename Traits::input_t;
  using acc_t = typename Traits::acc_t;
  using w_t = typename Traits::w_t;
  using pair_t = typename Traits::pair_t;
  constexpr int kItems = Traits::kItems;
  constexpr int kThreads = Traits::kThreads;
  constexpr acc_t kScale = acc_t(OutputScale<w_t>::value);

  SSMK_SHARED_ARRAY(pair_t, warp_totals, Traits::kWarps);
  __shared__ acc_t scratch[Traits::kWarps * 6];
  SSMK_SHARED_ARRAY(w_t, carry, kMaxDstate);  // K at the end of the current chunk, per n
  SSMK_SHARED_ARRAY(w_t, dA_acc, kMaxDstate);
  SSMK_SHARED_ARRAY(w_t, dB_acc, kMaxDstate);
  SSMK_SHARED_ARRAY(w_t, dC_acc, kMaxDstate);

  const int64_t s = blockIdx.x, b = blockIdx.y;
  const int64_t N = p.dstate, L = p.seqlen, nc = p.n_chunks;
  const int tid = threadIdx.x;
  const auto& dlast = p.dlast_state;
  const bool packed = p.seqs.packed();
  w_t* dBp = p.B.variable ? p.dB_partial + (s * p.batch + b) * N * L : nullptr;
  w_t* dCp = p.C.variable ? p.dC_partial + (s * p.batch + b) * N * L : nullptr;

  for (int64_t d = s * p.slice_channels; d < (s + 1) * p.slice_channels; ++d) {
    const bool first_channel = d == s * p.slice_channels;
    const int64_t row = b * p.dim + d;
    const input_t* u_ptr = p.u.data + b * p.u.stride[0] + d * p.u.stride[1];
    const input_t* delta_ptr = p.delta.data + b * p.delta.stride[0] + d * p.delta.stride[1];
    const input_t* z_ptr = p.z.data ? p.z.data + b * p.z.stride[0] + d * p.z.stride[1] : nullptr;
    const input_t* dout_ptr = p.dout.data + b * p.dout.stride[0] + d * p.dout.stride[1];
    const w_t* A = p.A + d * N;
    const acc_t Dd = p.D ? p.D[d] : acc_t(0);
    const acc_t bias = p.delta_bias ? p.delta_bias[d] : acc_t(0);
    const w_t* ckpt = p.checkpoints + row * nc * N;
    input_t* du_out = p.du + row * L;
    input_t* ddelta_out = p.ddelta + row * L;
    input_t* dz_out = p.dz ? p.dz + row * L : nullptr;

    __syncthreads();  // the previous channel is done with the shared accumulators
    for (int64_t n = tid; n < N; n += kThreads) {
      carry[n] = dlast.data && !packed ? dlast.data[b * dlast.stride[0] + d * dlast.stride[1] + n * dlast.stride[2]]
                                       : w_t(0);
      dA_acc[n] = w_t(0);
      dB_acc[n] = w_t(0);
      dC_acc[n] = w_t(0);
    }
    acc_t dD_thr = 0, ddb_thr = 0;
    __syncthreads();

    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t t_first = c * kChunkSize + static_cast<int64_t>(tid) * kItems;
      acc_t u[kItems], dt[kItems], dtg[kItems], g[kItems], du[kItems], ddt[kItems], y[kItems];
      int64_t starts[kItems], ends[kItems];
      step_bounds<kItems>(p, b, t_first, starts, ends);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t_first + j;
        const bool valid = t < L;
        const acc_t delta = valid ? static_cast<acc_t>(delta_ptr[t * p.delta.stride[2]]) : acc_t(0);
        u[j] = valid ? static_cast<acc_t>(u_ptr[t * p.u.stride[2]]) : acc_t(0);
        dt[j] = valid ? delta_transform(delta, bias, p.delta_softplus) : acc_t(0);
        dtg[j] = delta_transform_grad(delta, bias, p.delta_softplus);
        const acc_t dout = valid ? static_cast<acc_t>(dout_ptr[t * p.dout.stride[2]]) : acc_t(0);
        const acc_t zv = (valid && z_ptr) ? static_cast<acc_t>(z_ptr[t * p.z.stride[2]]) : acc_t(0);
        g[j] = z_ptr ? dout * ssmk::silu(zv) : dout;
        du[j] = Dd * g[j];
        ddt[j] = acc_t(0);
        y[j] = acc_t(0);
      }
      for (int64_t n = 0; n < N; ++n) {
        const w_t An = A[n];
        const w_t h0 = ckpt[c * N + n];
        w_t a[kItems], bb[kItems], hp[kItems], h0s[kItems];
        pair_t agg = ssmk::cuda::affine_identity<w_t>();
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int64_t t = t_first + j;
          a[j] = discretize(dt[j], An);
          const w_t Bv = t < L ? load_B<Traits>(p, b, d, n, t) : w_t(0);
          bb[j] = Bv * (dt[j] * u[j]);
          h0s[j] = starts[j] != kNoBound ? sequence_state(p.initial_state, starts[j], d, n) : w_t(0);
          agg = ssmk::cuda::affine_compose(agg, starts[j] != kNoBound ? pair_t{w_t(0), a[j] * h0s[j] + bb[j]}
                                                                      : pair_t{a[j], bb[j]});
        }
        pair_t total;
        pair_t pre = ssmk::cuda::block_exclusive_scan<kThreads, false>(agg, warp_totals, total);
        w_t h = pre.a * h0 + pre.b;
        pair_t ragg = ssmk::cuda::affine_identity<w_t>();
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          hp[j] = starts[j] != kNoBound ? h0s[j] : h;
          h = a[j] * hp[j] + bb[j];
          const int64_t t = t_first + j;
          if (t < L) y[j] += real_part(load_C<Traits>(p, b, d, n, t) * h);
        }
#pragma unroll
        for (int j = kItems - 1; j >= 0; --j) {
          const int64_t t = t_first + j;
          const w_t e = t < L ? conj_of(load_C<Traits>(p, b, d, n, t)) * (kScale * g[j]) : w_t(0);
          const w_t ac = conj_of(a[j]);
          if (ends[j] != kNoBound) {
            ragg = ssmk::cuda::affine_compose(ragg, pair_t{w_t(0), ac * (sequence_state(dlast, ends[j], d, n) + e)});
          } else {
            ragg = ssmk::cuda::affine_compose(ragg, pair_t{ac, ac * e});
          }
        }
        const pair_t rpre = ssmk::cuda::block_exclusive_scan<kThreads, true>(ragg, warp_totals, total);
        w_t K = rpre.a * carry[n] + rpre.b;
        acc_t sums[6] = {0, 0, 0, 0, 0, 0};  // dA, fixed dB, fixed dC (re, im)
#pragma unroll
        for (int j = kItems - 1; j >= 0; --j) {
          const int64_t t = t_first + j;
          const bool valid = t < L;
          const w_t Cv = valid ? load_C<Traits>(p, b, d, n, t) : w_t(0);
          if (ends[j] != kNoBound) K = sequence_state(dlast, ends[j], d, n);
          const w_t G = K + conj_of(Cv) * (kScale * g[j]);
          K = conj_of(a[j]) * G;
          if (starts[j] >= 0) p.dinitial_state[(starts[j] * p.dim + d) * N + n] = K;
          const w_t dw = K * conj_of(hp[j]);
          split_add(sums, 0, dw * dt[j]);
          const w_t Bv = valid ? load_B<Traits>(p, b, d, n, t) : w_t(0);
          const acc_t bG = real_dot(Bv, G);
          ddt[j] += real_dot(An, dw) + u[j] * bG;
          du[j] += dt[j] * bG;
          const w_t dBv = G * (dt[j] * u[j]);
          const w_t hj = a[j] * hp[j] + bb[j];
          const w_t dCv = conj_of(hj) * (kScale * g[j]);
          if (valid) {
            if (dBp) {
              w_t* dst = dBp + n * L + t;
              *dst = first_channel ? dBv : *dst + dBv;
            } else {
              split_add(sums, 1, dBv);
            }
            if (dCp) {
              w_t* dst = dCp + n * L + t;
              *dst = first_channel ? dCv : *dst + dCv;
            } else {
              split_add(sums, 2, dCv);
            }
          }
        }
        block_sum_to_first<kThreads, 6>(sums, scratch);
        if (tid == 0) {
          // Every thread read carry[n] before the reduction's barriers.
          carry[n] = total.a * carry[n] + total.b;
          dA_acc[n] += join<w_t>(sums, 0);
          dB_acc[n] += join<w_t>(sums, 1);
          dC_acc[n] += join<w_t>(sums, 2);
        }
      }
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t_first + j;
        if (t < L) {
          const acc_t ddelta = ddt[j] * dtg[j];
          du_out[t] = static_cast<input_t>(du[j]);
          ddelta_out[t] = static_cast<input_t>(ddelta);
          if (dz_out) {
            const acc_t zv = static_cast<acc_t>(z_ptr[t * p.z.stride[2]]);
            const acc_t dout = static_cast<acc_t>(dout_ptr[t * p.dout.stride[2]]);
            dz_out[t] = static_cast<input_t>(dout * (kScale * y[j] + Dd * u[j]) * ssmk::silu_grad(zv));
          }
          dD_thr += g[j] * u[j];
          ddb_thr += ddelta;
        }
      }
    }
    acc_t row_sums[2] = {dD_thr, ddb_thr};
    block_sum_to_first<kThreads, 2>(row_sums, scratch);
    __syncthreads();  // thread 0's last updates of the shared accumulators are visible
    if (tid == 0) {
      p.dD_rows[row] = row_sums[0];
      p.ddelta_bias_rows[row] = row_sums[1];
    }
    for (int64_t n = tid; n < N; n += kThreads) {
      if (!packed) p.dinitial_state[row * N + n] = carry[n];
      p.dA_rows[row * N + n] = dA_acc[n];
      if (!p.B.variable) p.dB_rows[row * N + n] = dB_acc[n];
      if (!p.C.variable) p.dC_rows[row * N + n] = dC_acc[n];
    }
  }
}

}  // namespace ssmk::selective_scan
