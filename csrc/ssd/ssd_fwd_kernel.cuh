// CUDA stage kernels of the ssd_scan forward (also run by the backward to rebuild the chunk
// buffers). The GEMMs between them are the tensor-core GEMMs called by the host driver, ssd_op.cpp.
//
// Cost per (batch, chunk, head) task with Q = chunk, P = headdim, N = dstate (bytes for float32
// buffers; the GEMMs hold the FLOPs: 2 Q^2 N / Hg + 2 Q^2 P + 4 Q P N):
//   prep_kernel       one thread per task: reads Q dt, writes 5 Q floats. ~20 Q bytes; latency-
//                     bound but tiny (B nc H threads).
//   build_gl_kernel   one thread per (t, s): reads CB, writes GL: 8 Q^2 bytes, one exp each;
//                     memory-bound, expected ~70-80% of copy bandwidth.
//   scan_kernel       one thread per state element, sequential over chunks: 8 P N bytes per chunk
//                     forward (read S, write H_{c-1}), 16 P N backward; memory-bound.
//   epilogue_kernel   one thread per output: reads y_intra, y_inter^T (strided), x, z; writes out.
#pragma once

#include "common/cuda/reduce.h"
#include "ssd/ssd.h"

namespace ssmk::ssd::cuda_kernels {

constexpr int kThreads = kCudaThreads;

constexpr int kPrepThreads = 128;

template <typename input_t>
__global__ void __launch_bounds__(kPrepThreads) prep_kernel(const SsdPrepParams<input_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.nchunks * p.nheads) return;
  prep_task<input_t, acc_t>(p, i);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) build_gl_kernel(const SsdGlParams<acc_t> p, acc_t* gl) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  const int64_t total = p.batch * p.nchunks * p.nheads * Q * Q;
  const acc_t* cb = p.cb;
  const acc_t* acs = p.acs;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / (Q * Q);
    const int t = static_cast<int>((idx / Q) % Q), s = static_cast<int>(idx % Q);
    const int64_t h = i % p.nheads, bc = i / p.nheads;  // bc = b * nc + c
    const int32_t* sg = p.seg ? p.seg + bc * Q : nullptr;
    const acc_t dec = segment_decay(acs + i * Q, sg, t, s);
    gl[idx] = dec == acc_t(0) ? acc_t(0) : cb[((bc * p.ngroups + h / Hg) * Q + t) * Q + s] * dec;
  }
}

// grid (B * H, nsplit): thread j of split k owns state element k * kThreads + j of (b, h).
// Params: SsdScanParams<acc_t> (forward) or SsdScanBwdParams<acc_t> (kBackward).
template <typename acc_t, bool kBackward, typename Params>
__global__ void __launch_bounds__(kThreads) scan_kernel(const Params p) {
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t PN = p.headdim * p.dstate, nc = p.nchunks, H = p.nheads;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = j < PN;
  const acc_t* kdecay = p.kdecay;
  acc_t* states = p.states;
  // Packed sequences (chunk_seq): per-sequence states at (s * H + h); see SsdScanParams.
  const int32_t* cs = p.chunk_seq;
  const int64_t S = p.num_seqs;
  acc_t run = active && p.init && !cs ? p.init[bh * PN + j] : acc_t(0);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t idx = (b * nc + c) * H + h;
    if (cs && starts_sequence(cs, c)) {
      run = active && p.init && cs[c] < S ? p.init[(cs[c] * H + h) * PN + j] : acc_t(0);
    }
    const acc_t kd = kdecay[idx];
    if (active) {
      const acc_t s = states[idx * PN + j];
      states[idx * PN + j] = run;
      run = kd * run + s;
      if (cs && cs[c] < S && ends_sequence(cs, c, nc)) p.final_states[(cs[c] * H + h) * PN + j] = run;
    }
  }
  if (active && !cs) p.final_states[bh * PN + j] = run;
  if constexpr (kBackward) {
    acc_t* dstates = p.dstates;
    acc_t g = active && p.dfinal && !cs ? p.dfinal[bh * PN + j] : acc_t(0);
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t idx = (b * nc + c) * H + h;
      if (cs && ends_sequence(cs, c, nc)) {
        g = active && p.dfinal && cs[c] < S ? p.dfinal[(cs[c] * H + h) * PN + j] : acc_t(0);
      }
      const acc_t kd = kdecay[idx];
      acc_t dot = 0;
      if (active) {
        const acc_t in = dstates[idx * PN + j];
        dstates[idx * PN + j] = g;
        dot = g * states[idx * PN + j];
        g = in + kd * g;
        if (cs && cs[c] < S && starts_sequence(cs, c)) p.dinit[(cs[c] * H + h) * PN + j] = g;
      }
      dot = ssmk::cuda::block_reduce_sum<kThreads>(dot, scratch);
      if (threadIdx.x == 0) p.ddecay[idx * p.nsplit + blockIdx.y] = kd * dot;
    }
    if (active && !cs) p.dinit[bh * PN + j] = g;
  }
}

template <typename input_t>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(const SsdFwdParams<input_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t Q = p.chunk, P = p.headdim, H = p.nheads, L = p.seqlen;
  const int64_t total = p.batch * L * H * P;
  const acc_t* yi = p.y_intra;
  const acc_t* yT = p.y_interT;
  const acc_t* r = p.r;
  const acc_t* D = p.D;
  const input_t* x = p.x.data;
  const input_t* z = p.z.data;
  input_t* out = p.out;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % P, h = (idx / P) % H, l = (idx / (P * H)) % L, b = idx / (P * H * L);
    const int64_t c = l / Q, t = l % Q, i = (b * p.nchunks + c) * H + h;
    acc_t y = yi[(i * Q + t) * P + q] + r[i * Q + t] * yT[(i * P + q) * Q + t];
    if (D) y += D[h * P + q] * static_cast<acc_t>(x[b * p.x.stride[0] + l * p.x.stride[1] + h * p.x.stride[2] + q * p.x.stride[3]]);
    if (z) y *= ssmk::silu(static_cast<acc_t>(z[b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] + q * p.z.stride[3]]));
    out[idx] = static_cast<input_t>(y);
  }
}

}  // namespace ssmk::ssd::cuda_kernels
