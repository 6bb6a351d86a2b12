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

#include "common/cuda/reduce.h"
#include "common/math.h"
#include "fftconv/fftconv.h"
#include "fftconv/fftconv_fft.h"

namespace ssmk::fftconv {

constexpr int kFusedThreads = 512;

template <typename T, bool kInv>
__device__ bool block_fft(const fft::Twiddles<T>& tw, T* xr, T* xi, T* yr, T* yi, bool zero_high, bool low_out) {
  return fft::fft_strided<T, kInv>(tw, xr, xi, yr, yi, zero_high, low_out, threadIdx.x, blockDim.x);
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
template <typename input_t>
__global__ void __launch_bounds__(kFusedThreads) fftconv_fused_spectrum_kernel(FftconvCommon<input_t> p,
                                                                               const float* tw_base, float* hs) {
  using T = float;
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = p.fft_size, m = n / 2, F = m + 1, bsz = fft::buffer_size(m), d = blockIdx.x;
  const fft::Twiddles<T> tw(tw_base, tw_base + fft::table_size(m), m);
  T *xr = smem, *xi = smem + bsz, *yr = smem + 2 * bsz, *yi = smem + 3 * bsz;
  const T* k = p.k + d * p.klen;
  const T* kr = p.k_rev ? p.k_rev + d * p.klen_rev : nullptr;
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
__global__ void __launch_bounds__(kFusedThreads) fftconv_fused_fwd_kernel(FftconvFwdParams<input_t> p,
                                                                          const float* tw_base,
                                                                          const float* hs) {
  using T = float;
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = p.fft_size, m = n / 2, F = m + 1, L = p.seqlen, bsz = fft::buffer_size(m);
  const int64_t b = blockIdx.x / p.dim, d = blockIdx.x % p.dim;
  const fft::Twiddles<T> tw(tw_base, tw_base + fft::table_size(m), m);
  T *xr = smem, *xi = smem + bsz, *yr = smem + 2 * bsz, *yi = smem + 3 * bsz;
  const input_t* u = p.u.data + b * p.u.stride[0] + d * p.u.stride[1];
  const input_t* g = p.pregate.data ? p.pregate.data + b * p.pregate.stride[0] + d * p.pregate.stride[1] : nullptr;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    T v = 0;
    if (t < L) {
      v = static_cast<T>(u[t * p.u.stride[2]]);
      if (g) v *= static_cast<T>(g[t * p.pregate.stride[2]]);
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
  const input_t* q =
      p.postgate.data ? p.postgate.data + b * p.postgate.stride[0] + d * p.postgate.stride[1] : nullptr;
  const T Dd = p.D ? p.D[d] : T(0);
  input_t* out = p.out + (b * p.dim + d) * L;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    T v = static_cast<T>(u[t * p.u.stride[2]]);
    if (g) v *= static_cast<T>(g[t * p.pregate.stride[2]]);
    const T pg = q ? static_cast<T>(q[t * p.postgate.stride[2]]) : T(1);
    out[t] = static_cast<input_t>(epilogue(load_real(m, t, cr, ci), v, Dd, pg, p.activation));
  }
}

// The fused backward: one block per channel, walking its batch rows in order b = 0, 1, ... (the
// sums of dH and dD over the batch in a fixed order: bitwise reproducible). Per row: V = rfft(v)
// (kept in shared memory), c = irfft(V H) when an activation or postgate needs it, gpre (held in
// registers, kFusedBwdPer positions per thread), G = rfft(gpre); per pair (k, m - k) the thread
// that owns it adds 2G conj(2V) to its dH registers and forms Y = 2G conj(H) in place; the inverse
// FFT gives the correlation for du (and dpregate). After the batch: dh = irfft(dH / (4n)) mapped
// onto dk / dk_rev. Shared memory: two row buffers and V (2(m + 1) floats): 98.5 KiB at n = 8192.
constexpr int kFusedBwdPer = 16;                                       // gpre values per thread
constexpr int kFusedBwdPairs = 5;                                      // (m/2 + 1) / threads, rounded up
constexpr int64_t kFusedBwdMaxN = int64_t(kFusedThreads) * kFusedBwdPer;  // n <= 8192
static_assert(int64_t(kFusedBwdPairs) * kFusedThreads > kFusedBwdMaxN / 4, "every pair (k <= m/2) needs an owner");
static_assert(fft::kMinSize * 2 <= kFusedBwdMaxN, "the fused backward must cover the smallest length");

template <typename input_t>
__global__ void __launch_bounds__(kFusedThreads) fftconv_fused_bwd_kernel(FftconvBwdParams<input_t> p,
                                                                          const float* tw_base,
                                                                          const float* hs) {
  using T = float;
  extern __shared__ unsigned char smem_raw[];
  __shared__ T red[kFusedThreads / 32];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = p.fft_size, m = n / 2, F = m + 1, L = p.seqlen, bsz = fft::buffer_size(m), d = blockIdx.x;
  const fft::Twiddles<T> tw(tw_base, tw_base + fft::table_size(m), m);
  T *xr = smem, *xi = smem + bsz, *yr = smem + 2 * bsz, *yi = smem + 3 * bsz;
  T *Vr = smem + 4 * bsz, *Vi = Vr + F;
  const T *hr = hs + 2 * d * F, *hi = hr + F;
  const T Dd = p.D ? p.D[d] : T(0);
  const bool need_c = p.activation != kActNone || p.postgate.data, half = L <= m;
  T dh[kFusedBwdPairs][4];  // this thread's pairs k = tid + i * threads: (re, im) at k, then at m - k
  T dD = 0;
#pragma unroll
  for (int i = 0; i < kFusedBwdPairs; ++i) dh[i][0] = dh[i][1] = dh[i][2] = dh[i][3] = T(0);

  for (int64_t b = 0; b < p.batch; ++b) {
    const input_t* u = p.u.data + b * p.u.stride[0] + d * p.u.stride[1];
    const input_t* g = p.pregate.data ? p.pregate.data + b * p.pregate.stride[0] + d * p.pregate.stride[1] : nullptr;
    const input_t* q =
        p.postgate.data ? p.postgate.data + b * p.postgate.stride[0] + d * p.postgate.stride[1] : nullptr;
    const input_t* go = p.dout.data + b * p.dout.stride[0] + d * p.dout.stride[1];
    const auto v_at = [&](int64_t t) {
      T v = static_cast<T>(u[t * p.u.stride[2]]);
      if (g) v *= static_cast<T>(g[t * p.pregate.stride[2]]);
      return v;
    };
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) store_real(m, t, t < L ? v_at(t) : T(0), xr, xi);
    __syncthreads();
    bool in_y = block_fft<T, false>(tw, xr, xi, yr, yi, half, false);
    T *ar = in_y ? yr : xr, *ai = in_y ? yi : xi, *br = in_y ? xr : yr, *bi = in_y ? xi : yi;
    for (int64_t k = threadIdx.x; k <= m / 2; k += blockDim.x) {
      fft::split_at<T>(tw, k, fft::pos(m, k), k == 0 ? 0 : fft::pos(m, m - k), ar, ai, Vr, Vi);
    }
    __syncthreads();
    const T *cr = nullptr, *ci = nullptr;
    if (need_c) {
      for (int64_t k = threadIdx.x; k <= m / 2; k += blockDim.x) {
        if (k == 0) {
          fft::product_merge_at<T, false, false>(tw, 0, 0, 0, Vr, Vi, hr, hi, T(1), ar, ai);
        } else {
          fft::product_merge_at<T, false, true>(tw, k, fft::pos(m, k), fft::pos(m, m - k), Vr, Vi, hr, hi, T(1), ar,
                                                ai);
        }
      }
      __syncthreads();
      in_y = block_fft<T, true>(tw, ar, ai, br, bi, false, half);
      cr = in_y ? br : ar, ci = in_y ? bi : ai;
      // gpre goes to the buffer that does not hold c
      ar = in_y ? ar : br, ai = in_y ? ai : bi;
    }
    T gp[kFusedBwdPer];
    T sum = 0;
#pragma unroll
    for (int j = 0; j < kFusedBwdPer; ++j) {
      const int64_t t = threadIdx.x + int64_t(j) * blockDim.x;
      gp[j] = T(0);
      if (t < L) {
        const T v = v_at(t), dout = static_cast<T>(go[t * p.dout.stride[2]]);
        if (need_c) {
          const T pg = q ? static_cast<T>(q[t * p.postgate.stride[2]]) : T(1);
          T dpg;
          pointwise_grad(load_real(m, t, cr, ci), v, Dd, pg, dout, p.activation, gp[j], dpg);
          if (p.dpostgate) p.dpostgate[(b * p.dim + d) * L + t] = static_cast<input_t>(dpg);
        } else {
          gp[j] = dout;
        }
        sum += gp[j] * v;
      }
    }
    __syncthreads();  // c fully read before the buffers are reused
    T *zr = need_c ? ar : xr, *zi = need_c ? ai : xi, *wr = zr == xr ? yr : xr, *wi = zr == xr ? yi : xi;
#pragma unroll
    for (int j = 0; j < kFusedBwdPer; ++j) {
      const int64_t t = threadIdx.x + int64_t(j) * blockDim.x;
      if (t < n) store_real(m, t, gp[j], zr, zi);
    }
    sum = cuda::block_reduce_sum<kFusedThreads>(sum, red);
    dD += sum;  // the same value in every thread after the reduction; thread 0 stores it
    __syncthreads();
    in_y = block_fft<T, false>(tw, zr, zi, wr, wi, half, false);
    T *Gr = in_y ? wr : zr, *Gi = in_y ? wi : zi, *er = in_y ? zr : wr, *ei = in_y ? zi : wi;
#pragma unroll
    for (int i = 0; i < kFusedBwdPairs; ++i) {
      const int64_t k = threadIdx.x + int64_t(i) * blockDim.x;
      if (k > m / 2) continue;
      const int64_t j = m - k, zk = fft::pos(m, k), zj = k == 0 ? 0 : fft::pos(m, j);
      T kr = Gr[zk], ki = Gi[zk], jr = Gr[zj], ji = Gi[zj];
      const T wkr = tw.rre[k], wki = tw.rim[k];
      fft::split_pair(kr, ki, jr, ji, wkr, wki);  // 2G[k], 2G[j]
      T pr, pi;
      cmul_conj(kr, ki, Vr[k], Vi[k], pr, pi);
      dh[i][0] += pr, dh[i][1] += pi;
      cmul_conj(jr, ji, Vr[j], Vi[j], pr, pi);
      dh[i][2] += pr, dh[i][3] += pi;
      fft::cmul_h<T, true>(kr, ki, hr[k], hi[k]);
      fft::cmul_h<T, true>(jr, ji, hr[j], hi[j]);
      fft::merge_pair(kr, ki, jr, ji, wkr, wki);
      Gr[zk] = kr, Gi[zk] = ki;
      if (k != 0) Gr[zj] = jr, Gi[zj] = ji;
    }
    __syncthreads();
    in_y = block_fft<T, true>(tw, Gr, Gi, er, ei, false, half);
    const T *sr = in_y ? er : Gr, *si = in_y ? ei : Gi;
    input_t* du = p.du + (b * p.dim + d) * L;
#pragma unroll
    for (int j = 0; j < kFusedBwdPer; ++j) {
      const int64_t t = threadIdx.x + int64_t(j) * blockDim.x;
      if (t < L) {
        const T dv = load_real(m, t, sr, si) + Dd * gp[j];
        if (g) {
          du[t] = static_cast<input_t>(dv * static_cast<T>(g[t * p.pregate.stride[2]]));
          p.dpregate[(b * p.dim + d) * L + t] = static_cast<input_t>(dv * static_cast<T>(u[t * p.u.stride[2]]));
        } else {
          du[t] = static_cast<input_t>(dv);
        }
      }
    }
    __syncthreads();  // the buffers are reloaded by the next row
  }
  if (p.dD && threadIdx.x == 0) p.dD[d] = dD;

  // dh = irfft(dH) with the factor 4 of the doubled spectra: merge, inverse FFT, map to the taps.
  const T scale = T(1) / T(4 * n);
#pragma unroll
  for (int i = 0; i < kFusedBwdPairs; ++i) {
    const int64_t k = threadIdx.x + int64_t(i) * blockDim.x;
    if (k > m / 2) continue;
    T kr = dh[i][0] * scale, ki = dh[i][1] * scale, jr = dh[i][2] * scale, ji = dh[i][3] * scale;
    fft::merge_pair(kr, ki, jr, ji, tw.rre[k], tw.rim[k]);
    const int64_t zk = fft::pos(m, k);
    xr[zk] = kr, xi[zk] = ki;
    if (k != 0) {
      const int64_t zj = fft::pos(m, m - k);
      xr[zj] = jr, xi[zj] = ji;
    }
  }
  __syncthreads();
  const bool in_y = block_fft<T, true>(tw, xr, xi, yr, yi, false, false);
  const T *rr = in_y ? yr : xr, *ri = in_y ? yi : xi;
  T* dk = p.dk + d * p.klen;
  for (int64_t s = threadIdx.x; s < p.klen; s += blockDim.x) dk[s] = s < p.kc ? load_real(m, s, rr, ri) : T(0);
  if (p.dk_rev) {
    T* dr = p.dk_rev + d * p.klen_rev;
    for (int64_t s = threadIdx.x; s < p.klen_rev; s += blockDim.x) {
      dr[s] = s >= p.kr ? T(0) : load_real(m, s == 0 ? 0 : n - s, rr, ri);
    }
  }
}

// Shared memory of the fused kernels for an FFT length n (float).
inline int64_t fused_smem_bytes(int64_t n) { return 4 * fft::buffer_size(n / 2) * int64_t(sizeof(float)); }
inline int64_t fused_bwd_smem_bytes(int64_t n) {
  return (4 * fft::buffer_size(n / 2) + 2 * (n / 2 + 1)) * int64_t(sizeof(float));
}

}  // namespace ssmk::fftconv
