// CUDA fused single-kernel fftconv forward for power-of-two lengths whose row fits in shared
// memory: one block per (batch, channel) row runs load (u * pregate, any dtype -> float), the
// m = n/2-point forward FFT, the split / spectrum product / merge pass, the inverse FFT and the
// epilogue (D skip, activation, postgate), all in shared memory; each input is read once and the
// output written once (compulsory traffic only: (2 + gates) * L * elem bytes per row, plus the
// channel's spectrum 8(m + 1) bytes, L2-resident across the batch). The FFT is fftconv_fft.h's
// (the CPU hand path runs the same butterflies; the tests check it there): threads stride over the
// butterflies of a stage, __syncthreads between stages. Shared memory: two row buffers,
// 4 * buffer_size(m) floats (64 KiB + pad at n = 8192, 128 KiB at n = 16384; opt-in above 48 KiB).
//
// Companion kernels: the twiddle table (from table_turns, in double) and the kernel spectra
// hs[d] = H / (2n) (split re / im, m + 1 each), one block per channel with the same block FFT.
#pragma once

#include "common/cuda/launch.h"
#include "common/math.h"
#include "fftconv/fftconv.h"
#include "fftconv/fftconv_fft.h"

namespace ssmk::fftconv {

constexpr int kFusedThreads = 512;

// The m-point complex FFT of the block's row buffer (x) with y as the second buffer; returns true
// when the result is in y. Same stage order and flags as fft::fft_row.
template <typename T, bool kInv>
__device__ bool block_fft(const fft::Twiddles<T>& tw, T* xr, T* xi, T* yr, T* yi, bool zero_high, bool low_out) {
  const int64_t m = tw.m;
  int64_t len = m, s = 1, off = 0;
  bool in_y = false;
  if (fft::odd_log2(m)) {
    for (int64_t p = threadIdx.x; p < m / 2; p += blockDim.x) {
      if (zero_high) {
        fft::radix2_stage_at<T, kInv, true>(tw.re, tw.im, m, p, xr, xi, yr, yi);
      } else {
        fft::radix2_stage_at<T, kInv, false>(tw.re, tw.im, m, p, xr, xi, yr, yi);
      }
    }
    __syncthreads();
    in_y = true;
    off = m / 2;
    s = 2;
    len = m / 2;
  }
  while (len >= 4) {
    const T *tr = tw.re + off, *ti = tw.im + off;
    const T *ar = in_y ? yr : xr, *ai = in_y ? yi : xi;
    T *br = in_y ? xr : yr, *bi = in_y ? xi : yi;
    const bool zh = zero_high && s == 1, lo = low_out && len == 4;
    for (int64_t i = threadIdx.x; i < m / 4; i += blockDim.x) {
      if (zh) {
        fft::radix4_stage_at<T, kInv, true, false>(tr, ti, m, s, i, ar, ai, br, bi);
      } else if (lo) {
        fft::radix4_stage_at<T, kInv, false, true>(tr, ti, m, s, i, ar, ai, br, bi);
      } else {
        fft::radix4_stage_at<T, kInv, false, false>(tr, ti, m, s, i, ar, ai, br, bi);
      }
    }
    __syncthreads();
    in_y = !in_y;
    off += 3 * (len / 4);
    s *= 4;
    len /= 4;
  }
  return in_y;
}

// Element t < len of a real sequence into the row buffer: z[t / 2].re (t even) or .im (t odd).
template <typename T>
__device__ void store_real(int64_t m, int64_t t, T v, T* zr, T* zi) {
  (t % 2 ? zi : zr)[fft::pos(m, t / 2)] = v;
}

template <typename T>
__device__ T load_real(int64_t m, int64_t t, const T* zr, const T* zi) {
  return (t % 2 ? zi : zr)[fft::pos(m, t / 2)];
}

// table[i] = exp(-2 pi i turns(i)): re at tw[i], im at tw[size + i].
template <typename T>
__global__ void __launch_bounds__(256) fftconv_twiddle_kernel(int64_t m, T* tw) {
  const int64_t size = fft::table_size(m);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    double s, c;
    sincospi(2.0 * fft::table_turns(m, i), &s, &c);
    tw[i] = static_cast<T>(c);
    tw[size + i] = static_cast<T>(-s);
  }
}

// hs[d] = rfft(h_d, n) / (2n), split re / im ([D, 2, m + 1]); one block per channel.
template <typename T>
__global__ void __launch_bounds__(kFusedThreads) fftconv_fused_spectrum_kernel(FftconvParams p, const T* tw_base,
                                                                               T* hs) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = p.fft_size, m = n / 2, F = m + 1, bsz = fft::buffer_size(m), d = blockIdx.x;
  const fft::Twiddles<T> tw(tw_base, tw_base + fft::table_size(m), m);
  T *xr = smem, *xi = smem + bsz, *yr = smem + 2 * bsz, *yi = smem + 3 * bsz;
  const auto* k = static_cast<const T*>(p.k) + d * p.klen;
  const auto* kr = p.k_rev ? static_cast<const T*>(p.k_rev) + d * p.klen_rev : nullptr;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    T h = t < p.kc ? k[t] : T(0);
    if (kr && t == 0) h += kr[0];
    if (kr && t > 0 && n - t < p.kr) h += kr[n - t];
    store_real(m, t, h, xr, xi);
  }
  __syncthreads();
  const bool in_y = block_fft<T, false>(tw, xr, xi, yr, yi, false, false);
  const T *zr = in_y ? yr : xr, *zi = in_y ? yi : xi;
  T *hr = hs + 2 * d * F, *hi = hr + F;
  const T scale = T(1) / T(4 * n);
  for (int64_t k2 = threadIdx.x; k2 <= m / 2; k2 += blockDim.x) {
    fft::split_at<T>(tw, k2, fft::pos(m, k2), k2 == 0 ? 0 : fft::pos(m, m - k2), zr, zi, hr, hi);
  }
  __syncthreads();
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    hr[f] *= scale;
    hi[f] *= scale;
  }
}

// The fused forward: one block per row (row = b * D + d).
template <typename input_t>
__global__ void __launch_bounds__(kFusedThreads) fftconv_fused_fwd_kernel(FftconvParams p, const float* tw_base,
                                                                          const float* hs) {
  using T = float;
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = p.fft_size, m = n / 2, F = m + 1, L = p.seqlen, bsz = fft::buffer_size(m);
  const int64_t b = blockIdx.x / p.dim, d = blockIdx.x % p.dim;
  const fft::Twiddles<T> tw(tw_base, tw_base + fft::table_size(m), m);
  T *xr = smem, *xi = smem + bsz, *yr = smem + 2 * bsz, *yi = smem + 3 * bsz;
  const auto* u = static_cast<const input_t*>(p.u) + b * p.u_batch_stride + d * p.u_dim_stride;
  const auto* g = p.pregate ? static_cast<const input_t*>(p.pregate) + b * p.pre_batch_stride + d * p.pre_dim_stride
                            : nullptr;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    T v = 0;
    if (t < L) {
      v = static_cast<T>(u[t * p.u_l_stride]);
      if (g) v *= static_cast<T>(g[t * p.pre_l_stride]);
    }
    store_real(m, t, v, xr, xi);
  }
  __syncthreads();
  const bool half = L <= m;
  bool in_y = block_fft<T, false>(tw, xr, xi, yr, yi, half, false);
  T *ar = in_y ? yr : xr, *ai = in_y ? yi : xi, *br = in_y ? xr : yr, *bi = in_y ? xi : yi;
  const T *hr = hs + 2 * d * F, *hi = hr + F;
  for (int64_t k = threadIdx.x; k <= m / 2; k += blockDim.x) {
    if (k == 0) {
      fft::conv_pair_at<T, false, false>(tw, 0, 0, 0, ar, ai, hr, hi);
    } else {
      fft::conv_pair_at<T, false, true>(tw, k, fft::pos(m, k), fft::pos(m, m - k), ar, ai, hr, hi);
    }
  }
  __syncthreads();
  in_y = block_fft<T, true>(tw, ar, ai, br, bi, false, half);
  const T *cr = in_y ? br : ar, *ci = in_y ? bi : ai;
  const auto* q = p.postgate ? static_cast<const input_t*>(p.postgate) + b * p.post_batch_stride +
                                   d * p.post_dim_stride
                             : nullptr;
  const T Dd = p.D ? static_cast<const T*>(p.D)[d] : T(0);
  input_t* out = static_cast<input_t*>(p.out) + (b * p.dim + d) * L;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    T v = static_cast<T>(u[t * p.u_l_stride]);
    if (g) v *= static_cast<T>(g[t * p.pre_l_stride]);
    const T pg = q ? static_cast<T>(q[t * p.post_l_stride]) : T(1);
    out[t] = static_cast<input_t>(epilogue(load_real(m, t, cr, ci), v, Dd, pg, p.activation));
  }
}

// Shared memory of the fused kernels for an FFT length n (float).
inline int64_t fused_smem_bytes(int64_t n) { return 4 * fft::buffer_size(n / 2) * int64_t(sizeof(float)); }

}  // namespace ssmk::fftconv
