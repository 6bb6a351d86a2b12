// CUDA stage kernels of the ssd_scan forward (also run by the backward to rebuild the chunk
// buffers). The GEMMs between them are the tensor-core GEMMs called by the driver in ssd.h.
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

#include <ATen/cuda/CUDAContext.h>

#include "common/cuda/launch.h"
#include "common/cuda/reduce.h"
#include "ssd/ssd.h"

namespace ssmk::ssd::cuda_kernels {

constexpr int kThreads = 256;

template <typename input_t>
__global__ void __launch_bounds__(128) prep_kernel(const SsdParams p) {
  using acc_t = acc_type<input_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.nchunks * p.nheads) return;
  prep_task<input_t, acc_t>(p, i);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) build_gl_kernel(const SsdParams p) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  const int64_t total = p.batch * p.nchunks * p.nheads * Q * Q;
  const auto* cb = static_cast<const acc_t*>(p.cb);
  const auto* acs = static_cast<const acc_t*>(p.acs);
  auto* gl = static_cast<acc_t*>(p.gl);
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
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kThreads) scan_kernel(const SsdParams p) {
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t PN = p.headdim * p.dstate, nc = p.nchunks, H = p.nheads;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = j < PN;
  const auto* kdecay = static_cast<const acc_t*>(p.kdecay);
  auto* states = static_cast<acc_t*>(p.states);
  acc_t run = active && p.init ? static_cast<const acc_t*>(p.init)[bh * PN + j] : acc_t(0);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t idx = (b * nc + c) * H + h;
    const acc_t kd = kdecay[idx];
    if (active) {
      const acc_t s = states[idx * PN + j];
      states[idx * PN + j] = run;
      run = kd * run + s;
    }
  }
  if (active) static_cast<acc_t*>(p.final_states)[bh * PN + j] = run;
  if constexpr (kBackward) {
    auto* dstates = static_cast<acc_t*>(p.dstates);
    acc_t g = active && p.dfinal ? static_cast<const acc_t*>(p.dfinal)[bh * PN + j] : acc_t(0);
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t idx = (b * nc + c) * H + h;
      const acc_t kd = kdecay[idx];
      acc_t dot = 0;
      if (active) {
        const acc_t in = dstates[idx * PN + j];
        dstates[idx * PN + j] = g;
        dot = g * states[idx * PN + j];
        g = in + kd * g;
      }
      dot = ssmk::cuda::block_reduce_sum<kThreads>(dot, scratch);
      if (threadIdx.x == 0) static_cast<acc_t*>(p.ddecay)[idx * p.nsplit + blockIdx.y] = kd * dot;
    }
    if (active) static_cast<acc_t*>(p.dinit)[bh * PN + j] = g;
  }
}

template <typename input_t>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(const SsdParams p) {
  using acc_t = acc_type<input_t>;
  const int64_t Q = p.chunk, P = p.headdim, H = p.nheads, L = p.seqlen;
  const int64_t total = p.batch * L * H * P;
  const auto* yi = static_cast<const acc_t*>(p.y_intra);
  const auto* yT = static_cast<const acc_t*>(p.y_interT);
  const auto* r = static_cast<const acc_t*>(p.r);
  const auto* D = static_cast<const acc_t*>(p.D);
  const auto* x = static_cast<const input_t*>(p.x);
  const auto* z = static_cast<const input_t*>(p.z);
  auto* out = static_cast<input_t*>(p.out);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % P, h = (idx / P) % H, l = (idx / (P * H)) % L, b = idx / (P * H * L);
    const int64_t c = l / Q, t = l % Q, i = (b * p.nchunks + c) * H + h;
    acc_t y = yi[(i * Q + t) * P + q] + r[i * Q + t] * yT[(i * P + q) * Q + t];
    if (D) y += D[h * P + q] * static_cast<acc_t>(x[b * p.x_batch_stride + l * p.x_l_stride + h * p.x_h_stride + q * p.x_p_stride]);
    if (z) y *= ssmk::silu(static_cast<acc_t>(z[b * p.z_batch_stride + l * p.z_l_stride + h * p.z_h_stride + q * p.z_p_stride]));
    out[idx] = static_cast<input_t>(y);
  }
}

}  // namespace ssmk::ssd::cuda_kernels
