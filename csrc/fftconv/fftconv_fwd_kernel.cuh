// CUDA pointwise kernels of the fftconv forward (the multi-pass path: these kernels around cuFFT
// real-to-complex / complex-to-real transforms called through ATen).
//
// A launch covers the rows of a block of channels [d0, d0 + nch), channel-major like the CPU
// blocks: row q is (b = q % B, d = d0 + q / B). Per row of length L padded to n:
//   load_v:        reads u (+ pregate) once, writes v zero-padded: (1 or 2) * L * s_in + 4n bytes
//   mul_spectrum:  V *= H: reads 8F + 8F, writes 8F bytes, 6F FLOPs
//   epilogue:      reads c (4L), u, pregate, postgate, writes out: ~4L + 4 * L * s_in bytes
// All memory-bound; together with the two FFTs (each ~2 passes over 4n-8F bytes in cuFFT) the
// forward moves ~40n bytes per row, the roofline floor is that at the copy bandwidth.
#pragma once

#include "common/math.h"
#include "fftconv/fftconv.h"

namespace ssmk::fftconv {

constexpr int kThreads = 256;

struct RowMap {
  int64_t batch, d0;
  SSMK_DEVICE int64_t b(int64_t q) const { return q % batch; }
  SSMK_DEVICE int64_t d(int64_t q) const { return d0 + q / batch; }
  struct Pos {
    int64_t q, t, b, d;
  };
  // Element i of a [rows, len] buffer: its row q, position t in the row, and the row's (b, d).
  SSMK_DEVICE Pos at(int64_t i, int64_t len) const {
    const int64_t q = i / len, t = i % len;
    return {q, t, b(q), d(q)};
  }
};

// vbuf[q, t] = u * pregate (t < L), 0 (L <= t < n).   vbuf: [rows, n]
template <typename input_t>
__global__ void __launch_bounds__(kThreads) fftconv_load_v_kernel(FftconvCommon<input_t> p, RowMap m, int64_t rows,
                                                                   acc_t<input_t>* vbuf) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size, total = rows * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / n, t = i % n;
    acc_t v = 0;
    if (t < p.seqlen) {
      const int64_t b = m.b(q), d = m.d(q);
      v = static_cast<acc_t>(p.u.data[b * p.u.stride[0] + d * p.u.stride[1] + t * p.u.stride[2]]);
      if (p.pregate.data) {
        v *= static_cast<acc_t>(p.pregate.data[b * p.pregate.stride[0] + d * p.pregate.stride[1] +
                                               t * p.pregate.stride[2]]);
      }
    }
    vbuf[i] = v;
  }
}

// dst[q, f] = src[q, f] * H[d, f] (or * conj(H[d, f])); complex as interleaved (re, im).
template <typename input_t, bool kConj>
__global__ void __launch_bounds__(kThreads) fftconv_mul_spectrum_kernel(FftconvCommon<input_t> p, RowMap m,
                                                                         int64_t rows, const acc_t<input_t>* src,
                                                                         acc_t<input_t>* dst) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t F = p.nfreq, total = rows * F;
  const acc_t* kf = p.kf;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / F, f = i % F;
    const acc_t* h = kf + 2 * (m.d(q) * F + f);
    acc_t re, im;
    if (kConj) {
      cmul_conj(src[2 * i], src[2 * i + 1], h[0], h[1], re, im);
    } else {
      cmul(src[2 * i], src[2 * i + 1], h[0], h[1], re, im);
    }
    dst[2 * i] = re;
    dst[2 * i + 1] = im;
  }
}

// out = act(c + D v) * postgate.   c: [rows, n]
template <typename input_t>
__global__ void __launch_bounds__(kThreads) fftconv_epilogue_kernel(FftconvFwdParams<input_t> p, RowMap m,
                                                                     int64_t rows, const acc_t<input_t>* c) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t L = p.seqlen, n = p.fft_size, total = rows * L;
  const acc_t* Dp = p.D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [q, t, b, d] = m.at(i, L);
    acc_t v = static_cast<acc_t>(p.u.data[b * p.u.stride[0] + d * p.u.stride[1] + t * p.u.stride[2]]);
    if (p.pregate.data) {
      v *= static_cast<acc_t>(p.pregate.data[b * p.pregate.stride[0] + d * p.pregate.stride[1] +
                                             t * p.pregate.stride[2]]);
    }
    const acc_t pg = p.postgate.data ? static_cast<acc_t>(p.postgate.data[b * p.postgate.stride[0] +
                                                                          d * p.postgate.stride[1] +
                                                                          t * p.postgate.stride[2]])
                                     : acc_t(1);
    const acc_t Dd = Dp ? Dp[d] : acc_t(0);
    p.out[(b * p.dim + d) * L + t] =
        static_cast<input_t>(epilogue(c[q * n + t], v, Dd, pg, p.activation));
  }
}

inline unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

}  // namespace ssmk::fftconv
