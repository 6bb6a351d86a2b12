// CUDA pointwise kernels of the fftconv backward (multi-pass path, around cuFFT through ATen).
//   grad_pre:     reads c (4L), u, pregate, postgate, dout; writes gpre zero-padded (4n),
//                 dpostgate, and one partial dD sum per (row, block) (fixed-order reduction)
//   dkf:          dH[d, f] = sum_b G[b, d, f] conj(V[b, d, f]), the batch summed in order:
//                 reads 16 B F per channel, 8B F FLOPs
//   grad_input:   dv = conv + D gpre; du = dv pregate; dpregate = dv u
#pragma once

#include "common/cuda/reduce.h"
#include "fftconv/fftconv_fwd_kernel.cuh"

namespace ssmk::fftconv {

// One block per (row, chunk of kThreads * kPerThread positions); partial[q * chunks + chunk]
// receives the chunk's sum of gpre * v.
constexpr int kPerThread = 4;

template <typename input_t>
__global__ void __launch_bounds__(kThreads) fftconv_grad_pre_kernel(FftconvBwdParams<input_t> p, RowMap m, int64_t rows,
                                                                     int64_t chunks, const acc_t<input_t>* c,
                                                                     acc_t<input_t>* gbuf, acc_t<input_t>* partial) {
  using acc_t = ssmk::acc_t<input_t>;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t L = p.seqlen, n = p.fft_size;
  const int64_t q = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t b = m.b(q), d = m.d(q);
  const acc_t* Dp = p.D;
  const acc_t Dd = Dp ? Dp[d] : acc_t(0);
  const bool need_c = p.activation != kActNone || p.postgate.data;
  acc_t sum = 0;
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t t = (chunk * kPerThread + j) * kThreads + threadIdx.x;
    if (t >= n) break;
    acc_t gpre = 0;
    if (t < L) {
      acc_t v = static_cast<acc_t>(p.u.data[b * p.u.stride[0] + d * p.u.stride[1] + t * p.u.stride[2]]);
      if (p.pregate.data) {
        v *= static_cast<acc_t>(p.pregate.data[b * p.pregate.stride[0] + d * p.pregate.stride[1] +
                                               t * p.pregate.stride[2]]);
      }
      const acc_t go = static_cast<acc_t>(p.dout.data[b * p.dout.stride[0] + d * p.dout.stride[1] +
                                                      t * p.dout.stride[2]]);
      if (need_c) {
        const acc_t pg = p.postgate.data ? static_cast<acc_t>(p.postgate.data[b * p.postgate.stride[0] +
                                                                              d * p.postgate.stride[1] +
                                                                              t * p.postgate.stride[2]])
                                         : acc_t(1);
        acc_t dpg;
        pointwise_grad(c[q * n + t], v, Dd, pg, go, p.activation, gpre, dpg);
        if (p.dpostgate) p.dpostgate[(b * p.dim + d) * L + t] = static_cast<input_t>(dpg);
      } else {
        gpre = go;
      }
      sum += gpre * v;
    }
    gbuf[q * n + t] = gpre;
  }
  sum = cuda::block_reduce_sum<kThreads>(sum, scratch);
  if (threadIdx.x == 0) partial[q * chunks + chunk] = sum;
}

// dkf[d, f] = sum_{b < B} G[(d - d0) * B + b, f] * conj(V[(d - d0) * B + b, f]).
template <typename input_t>
__global__ void __launch_bounds__(kThreads) fftconv_dkf_kernel(FftconvBwdParams<input_t> p, int64_t d0, int64_t nch,
                                                                const acc_t<input_t>* G,
                                                                const acc_t<input_t>* V) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t F = p.nfreq, total = nch * F, B = p.batch;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t dl = i / F, f = i % F;
    acc_t sr = 0, si = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = 2 * ((dl * B + b) * F + f);
      acc_t re, im;
      cmul_conj(G[o], G[o + 1], V[o], V[o + 1], re, im);
      sr += re;
      si += im;
    }
    acc_t* out = p.dkf + 2 * ((d0 + dl) * F + f);
    out[0] = sr;
    out[1] = si;
  }
}

template <typename input_t>
__global__ void __launch_bounds__(kThreads) fftconv_grad_input_kernel(FftconvBwdParams<input_t> p, RowMap m,
                                                                       int64_t rows,
                                                                       const acc_t<input_t>* conv,
                                                                       const acc_t<input_t>* gbuf) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t L = p.seqlen, n = p.fft_size, total = rows * L;
  const acc_t* Dp = p.D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [q, t, b, d] = m.at(i, L);
    const acc_t Dd = Dp ? Dp[d] : acc_t(0);
    const acc_t dv = conv[q * n + t] + Dd * gbuf[q * n + t];
    const int64_t o = (b * p.dim + d) * L + t;
    if (p.pregate.data) {
      const acc_t u = static_cast<acc_t>(p.u.data[b * p.u.stride[0] + d * p.u.stride[1] + t * p.u.stride[2]]);
      const acc_t g = static_cast<acc_t>(p.pregate.data[b * p.pregate.stride[0] + d * p.pregate.stride[1] +
                                                        t * p.pregate.stride[2]]);
      p.du[o] = static_cast<input_t>(dv * g);
      p.dpregate[o] = static_cast<input_t>(dv * u);
    } else {
      p.du[o] = static_cast<input_t>(dv);
    }
  }
}

}  // namespace ssmk::fftconv
