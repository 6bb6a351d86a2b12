// CUDA stage kernels of the ssd_scan backward (the GEMMs between them are the tensor-core GEMMs
// called by the host driver, ssd_op.cpp). One block of kThreads (8 warps) per (batch, chunk, head) task; every
// reduction has a fixed order, so gradients are bitwise reproducible.
//
// Cost per task (Q = chunk, P = headdim, float32 buffers):
//   wsum_kernel   reads dGL and the group's CB (GL = CB * decay is rebuilt), writes dGL * decay:
//                 12 Q^2 bytes, one exp per (t, s) with s <= t; memory-bound, expected ~60-70% of
//                 copy bandwidth (the upper triangle is written as zeros, the lower read and written).
//   final_kernel  reads xdt, dxdt, dy (Q P each), z^T, dy r^T, y_inter^T (P Q each), x, z, dout;
//                 writes dx, dz: ~40 Q P bytes; memory-bound; the P Q operands are read along Q
//                 by lanes that stride by Q (uncoalesced), so expect ~30-50% of copy bandwidth.
#pragma once

#include "common/cuda/reduce.h"
#include "ssd/ssd.h"

namespace ssmk::ssd::cuda_kernels {

constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / 32;
constexpr int kColsPerLane = kMaxChunk / 32;

// Warp w takes rows t = w, w + 8, ...; lane l takes columns s = l + 32 k. W = dGL * GL:
// dacs[t] = sum_s W[t, s] - sum_t' W[t', t]; dGL <- dGL * e^{Acs_t - Acs_s} (masked).
template <typename acc_t>
__global__ void __launch_bounds__(kBwdThreads) wsum_kernel(const SsdWsumParams<acc_t> p, acc_t* dgl_all) {
  __shared__ acc_t s_acs[kMaxChunk];
  __shared__ int32_t s_seg[kMaxChunk];
  __shared__ acc_t s_row[kMaxChunk];
  __shared__ acc_t s_col[kBwdWarps][kMaxChunk];
  const int Q = static_cast<int>(p.chunk);
  const int64_t i = blockIdx.x;
  const int64_t bc = i / p.nheads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t* acs = p.acs + i * Q;
  for (int t = threadIdx.x; t < Q; t += kBwdThreads) {
    s_acs[t] = acs[t];
    s_seg[t] = p.seg ? p.seg[bc * Q + t] : 0;
  }
  __syncthreads();
  acc_t* dgl = dgl_all + i * Q * Q;
  // GL = CB * decay is rebuilt here rather than read: W = dGL * CB * decay.
  const int64_t h = i % p.nheads;
  const acc_t* cb = p.cb + (bc * p.ngroups + h / (p.nheads / p.ngroups)) * Q * Q;
  acc_t col[kColsPerLane];
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) col[k] = 0;
  for (int t = warp; t < Q; t += kBwdWarps) {
    acc_t rs = 0;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int s = lane + 32 * k;
      if (s < Q) {
        const int64_t off = static_cast<int64_t>(t) * Q + s;
        const bool inside = s <= t && s_seg[s] == s_seg[t];
        const acc_t dd = inside ? dgl[off] * ssd_exp(s_acs[t] - s_acs[s]) : acc_t(0);
        const acc_t w = inside ? dd * cb[off] : acc_t(0);
        rs += w;
        col[k] += w;
        dgl[off] = dd;
      }
    }
    rs = ssmk::cuda::warp_reduce_sum(rs);
    if (lane == 0) s_row[t] = rs;
  }
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int s = lane + 32 * k;
    if (s < Q) s_col[warp][s] = col[k];
  }
  __syncthreads();
  acc_t* dacs = p.dacs + i * Q;
  for (int t = threadIdx.x; t < Q; t += kBwdThreads) {
    acc_t cs = 0;
#pragma unroll
    for (int w = 0; w < kBwdWarps; ++w) cs += s_col[w][t];
    dacs[t] = s_row[t] - cs;
  }
}

template <typename input_t>
__global__ void __launch_bounds__(kBwdThreads) final_kernel(const SsdBwdParams<input_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  __shared__ acc_t s_da[kMaxChunk];
  __shared__ acc_t s_de[kMaxChunk];
  __shared__ acc_t s_xdx[kMaxChunk];
  const int64_t Q = p.chunk, P = p.headdim, H = p.nheads, L = p.seqlen;
  const int64_t i = blockIdx.x;
  const int64_t h = i % H, c = (i / H) % p.nchunks, b = i / (H * p.nchunks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nvalid = L - c * Q < Q ? L - c * Q : Q;
  const auto [xdt, dxdt, dy, zT, dyrT, yT, e, r, dtv, dacs] = p.task_slices(i);
  const input_t* x = p.x.data + b * p.x.stride[0] + h * p.x.stride[2];
  const acc_t* D = p.D;

  // Per position t: the state term de_t, the inter term dy_t . y_inter_t and x_t . d(dt x)_t.
  for (int64_t t = warp; t < Q; t += kBwdWarps) {
    const acc_t et = e[t];
    acc_t de = 0, inter = 0, xdx = 0;
    for (int64_t q = lane; q < P; q += 32) {
      const acc_t zv = zT[q * Q + t];
      de += xdt[t * P + q] * zv;
      inter += dyrT[q * Q + t] * yT[q * Q + t];
      if (t < nvalid) {
        xdx += static_cast<acc_t>(x[(c * Q + t) * p.x.stride[1] + q * p.x.stride[3]]) * (dxdt[t * P + q] + et * zv);
      }
    }
    de = ssmk::cuda::warp_reduce_sum(de);
    inter = ssmk::cuda::warp_reduce_sum(inter);
    xdx = ssmk::cuda::warp_reduce_sum(xdx);
    if (lane == 0) {
      s_da[t] = dacs[t] + inter - de * et;
      s_de[t] = de * et;
      s_xdx[t] = xdx;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Fixed-order sums: the state term and the scan term land on the last position, then the
    // reverse cumulative sum (per sequence) gives d a_t.
    acc_t sum_de = 0;
    for (int64_t t = 0; t < Q; ++t) sum_de += s_de[t];
    acc_t ddecay = 0;
    for (int64_t s = 0; s < p.nsplit; ++s) ddecay += p.ddecay[i * p.nsplit + s];
    s_da[Q - 1] += sum_de + ddecay;
    reverse_segment_cumsum(s_da, p.seg ? p.seg + (b * p.nchunks + c) * Q : nullptr, Q);
    acc_t dA = 0;
    for (int64_t t = 0; t < nvalid; ++t) dA += dtv[t] * s_da[t];
    p.dA_part[i] = dA;
  }
  __syncthreads();
  const acc_t a = p.A[h];
  const acc_t bias = p.dt_bias ? p.dt_bias[h] : acc_t(0);
  const acc_t lo = static_cast<acc_t>(p.dt_limit[0]), hi = static_cast<acc_t>(p.dt_limit[1]);
  const input_t* dt = p.dt.data + b * p.dt.stride[0] + h * p.dt.stride[2];
  for (int64_t t = threadIdx.x; t < nvalid; t += kBwdThreads) {
    const int64_t l = c * Q + t;
    const acc_t raw = static_cast<acc_t>(dt[l * p.dt.stride[1]]);
    p.ddt[(b * L + l) * H + h] =
        (s_xdx[t] + a * s_da[t]) * dt_process_grad(raw, bias, p.softplus, p.clamp, lo, hi);
  }
  // dx, dD and dz: thread q walks the positions of column q (coalesced rows of dx).
  const input_t* z = p.z.data;
  const input_t* dout = p.dout.data;
  const acc_t* yi = p.y_intra;
  for (int64_t q = threadIdx.x; q < P; q += kBwdThreads) {
    const acc_t dq = D ? D[h * P + q] : acc_t(0);
    acc_t dD = 0;
    for (int64_t t = 0; t < nvalid; ++t) {
      const int64_t l = c * Q + t;
      const acc_t xv = static_cast<acc_t>(x[l * p.x.stride[1] + q * p.x.stride[3]]);
      const acc_t dyv = dy[t * P + q];
      const acc_t dxd = dxdt[t * P + q] + e[t] * zT[q * Q + t];
      const int64_t o = ((b * L + l) * H + h) * P + q;
      p.dx[o] = static_cast<input_t>(dtv[t] * dxd + dq * dyv);
      dD += xv * dyv;
      if (z) {
        const acc_t y = yi[(i * Q + t) * P + q] + r[t] * yT[q * Q + t] + dq * xv;
        const acc_t zv = static_cast<acc_t>(z[b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] + q * p.z.stride[3]]);
        const acc_t go = static_cast<acc_t>(dout[b * p.dout.stride[0] + l * p.dout.stride[1] + h * p.dout.stride[2] + q * p.dout.stride[3]]);
        p.dz[o] = static_cast<input_t>(go * y * ssmk::silu_grad(zv));
      }
    }
    if (p.dD_part) p.dD_part[i * P + q] = dD;
  }
}

}  // namespace ssmk::ssd::cuda_kernels
