// A hand-written power-of-two FFT shared by the CPU and CUDA fftconv paths (no ATen).
//
// Complex FFT of size m (a power of two) in split format (separate real and imaginary arrays):
// Stockham autosort, decimation in frequency, radix 4, with one radix-2 first stage when log2 m is
// odd. A radix-4 stage of length len and stride s (s len = m) maps x to y:
//   a_r = x[q + s (p + r len/4)]  (r = 0..3)  ->  y[q + s (4p + r)] = w^(r p) DFT4(a)_r
// with w = exp(-2 pi i / len) (conjugated for the inverse), p < len/4, q < s; no bit reversal, the
// buffers ping-pong between stages (Van Loan, "Computational Frameworks for the FFT", 1992, 1.7).
// The radix-2 stage (len = m, s = 1): y[2p] = x[p] + x[p + m/2], y[2p+1] = w^p (x[p] - x[p + m/2]).
// Every butterfly is independent within a stage: the CPU loops over them one row at a time with
// a vectorisable inner loop, a CUDA block strides its threads over them (radix4_at / radix2_at are
// the per-butterfly bodies both use, so the CPU tests check the GPU's arithmetic).
//
// Real FFT of a length n = 2m sequence x through one m-point complex FFT: z[j] = x[2j] + i x[2j+1],
// Z = FFT_m(z), then for the pair (k, m - k), with W = exp(-2 pi i k / n):
//   A = Z[k] + conj(Z[m-k]),  P = -i W (Z[k] - conj(Z[m-k])),
//   2 X[k] = A + P,  2 X[m-k] = conj(A - P)                       (split_pair)
// and the inverse (Y Hermitian, the spectrum of a real sequence y):
//   A = Y[k] + conj(Y[m-k]),  Q = conj(W) (Y[k] - conj(Y[m-k])),
//   Z'[k] = A + i Q,  Z'[m-k] = conj(A - i Q),   y[2j] + i y[2j+1] = IFFT_m(Z')[j] / n   (merge_pair)
// (the even/odd split of the DFT; e.g. Press et al., Numerical Recipes, 12.3). Both are unscaled:
// the constant factors are folded into the kernel spectrum (see fftconv_cpu.cpp).
//
// Zero padding is exploited: when the upper half of z is zero (L <= m), the first stage reads only
// two of its four inputs (kZeroHigh); when only the lower half of the output is needed, the last
// stage writes only those (kLowOut).
#pragma once

#include <cmath>
#include <algorithm>
#include <cstdint>

#include "common/macros.h"
#if !defined(__CUDACC__)
#include "common/cpu.h"
#endif

// The per-butterfly / per-pair bodies must inline into the CPU loops (and their AVX2 variants).
#if defined(__CUDACC__)
#define SSMK_FFT_FN SSMK_HOST_DEVICE
#else
#define SSMK_FFT_FN SSMK_CPU_INLINE
#endif

namespace ssmk::fftconv::fft {

// The twiddle table of an m-point transform, split re / im, each `table_size(m)` long:
//   with odd log2 m, the radix-2 stage's w^p (p < m/2, w = exp(-2 pi i / m));
//   per radix-4 stage (len = first_radix4_len(m), /4, ... >= 4), at a running offset: w^(r p)
//   for r = 1, 2, 3 (runs of len/4 each, p < len/4), w = exp(-2 pi i / len);
//   then the real-FFT twiddles exp(-2 pi i k / 2m) for k = 0..m/2.
SSMK_HOST_DEVICE bool odd_log2(int64_t m) {
  bool odd = false;
  for (int64_t v = m; v > 1; v /= 2) odd = !odd;
  return odd;
}
SSMK_HOST_DEVICE int64_t first_radix4_len(int64_t m) { return odd_log2(m) ? m / 2 : m; }
SSMK_HOST_DEVICE int64_t stage_table_size(int64_t m) {
  int64_t t = odd_log2(m) ? m / 2 : 0;
  for (int64_t len = first_radix4_len(m); len >= 4; len /= 4) t += 3 * (len / 4);
  return t;
}
SSMK_HOST_DEVICE int64_t table_size(int64_t m) { return stage_table_size(m) + m / 2 + 1; }

// Entry i of the table is exp(-2 pi i * turns); turns is an exact binary fraction.
SSMK_HOST_DEVICE double table_turns(int64_t m, int64_t i) {
  int64_t off = 0;
  if (odd_log2(m)) {
    if (i < m / 2) return double(i) / double(m);
    off = m / 2;
  }
  for (int64_t len = first_radix4_len(m); len >= 4; len /= 4) {
    const int64_t q = len / 4;
    if (i < off + 3 * q) return double(((i - off) / q + 1) * ((i - off) % q)) / double(len);
    off += 3 * q;
  }
  return double(i - off) / double(2 * m);
}

template <typename T>
struct Twiddles {
  const T* re;  // [table_size(m)]
  const T* im;  // [table_size(m)]
  int64_t m;
  const T* rre;  // re + stage_table_size(m): the real-FFT twiddles
  const T* rim;
  Twiddles() = default;
  SSMK_HOST_DEVICE Twiddles(const T* re_, const T* im_, int64_t m_)
      : re(re_), im(im_), m(m_), rre(re_ + stage_table_size(m_)), rim(im_ + stage_table_size(m_)) {}
};

// Buffer layout. A row buffer of m complex values (m >= 8) is stored as four quarters of m/4
// values, quarter g at offset g * qs with qs = m/4 + kQuarterPad: every stage reads its four
// inputs from the four quarters, and unpadded they would sit exactly m/4 apart (a power of two of
// bytes), all in one L1 set (conflict misses and 4K aliasing on the CPU).
constexpr int64_t kQuarterPad = 16;
constexpr int64_t kMinSize = 8;  // smallest m: the quarters hold >= 2 values
SSMK_HOST_DEVICE int64_t quarter_stride(int64_t m) { return m / 4 + kQuarterPad; }
SSMK_HOST_DEVICE int64_t buffer_size(int64_t m) { return 4 * quarter_stride(m); }
// Position of element i in a buffer.
SSMK_HOST_DEVICE int64_t pos(int64_t m, int64_t i) { return (i / (m / 4)) * quarter_stride(m) + i % (m / 4); }

// One radix-4 butterfly: inputs x[in + r qs], outputs y[out + r ostep] (r = 0..3), twiddles
// tr / ti of this stage at p (runs of l4 = len/4). kZeroHigh: inputs r = 2, 3 are zero (first
// stage of a half-zero sequence). kLowOut: write only outputs r = 0, 1 (last stage, lower half).
template <typename T, bool kInv, bool kZeroHigh, bool kLowOut>
SSMK_FFT_FN void radix4_at(const T* tr, const T* ti, int64_t l4, int64_t p, const T* xr, const T* xi,
                                int64_t qs, int64_t in, T* yr, T* yi, int64_t out, int64_t ostep) {
  const T ar = xr[in], ai = xi[in], br = xr[in + qs], bi = xi[in + qs];
  const T cr = kZeroHigh ? T(0) : xr[in + 2 * qs], ci = kZeroHigh ? T(0) : xi[in + 2 * qs];
  const T dr = kZeroHigh ? T(0) : xr[in + 3 * qs], di = kZeroHigh ? T(0) : xi[in + 3 * qs];
  const T s0r = ar + cr, s0i = ai + ci, d0r = ar - cr, d0i = ai - ci;
  const T s1r = br + dr, s1i = bi + di, d1r = br - dr, d1i = bi - di;
  // DFT4 with exponent sign -1 (forward) or +1 (inverse): y1 = d0 -+ i d1, y3 = d0 +- i d1.
  const T y0r = s0r + s1r, y0i = s0i + s1i, y2r = s0r - s1r, y2i = s0i - s1i;
  const T y1r = kInv ? d0r - d1i : d0r + d1i, y1i = kInv ? d0i + d1r : d0i - d1r;
  const T y3r = kInv ? d0r + d1i : d0r - d1i, y3i = kInv ? d0i - d1r : d0i + d1r;
  const T w1r = tr[p], w1i = kInv ? -ti[p] : ti[p];
  yr[out] = y0r;
  yi[out] = y0i;
  yr[out + ostep] = y1r * w1r - y1i * w1i;
  yi[out + ostep] = y1r * w1i + y1i * w1r;
  if (!kLowOut) {
    const T w2r = tr[l4 + p], w2i = kInv ? -ti[l4 + p] : ti[l4 + p];
    const T w3r = tr[2 * l4 + p], w3i = kInv ? -ti[2 * l4 + p] : ti[2 * l4 + p];
    yr[out + 2 * ostep] = y2r * w2r - y2i * w2i;
    yi[out + 2 * ostep] = y2r * w2i + y2i * w2r;
    yr[out + 3 * ostep] = y3r * w3r - y3i * w3i;
    yi[out + 3 * ostep] = y3r * w3i + y3i * w3r;
  }
}

// Butterfly i (< m/4) of the radix-4 stage with stride s (len = m / s): the index arithmetic of
// the stage in the quartered layout, for the GPU's thread loop. tr / ti: the stage's twiddles.
template <typename T, bool kInv, bool kZeroHigh, bool kLowOut>
SSMK_FFT_FN void radix4_stage_at(const T* tr, const T* ti, int64_t m, int64_t s, int64_t i, const T* xr,
                                      const T* xi, T* yr, T* yi) {
  const int64_t Q = m / 4, qs = quarter_stride(m), l4 = Q / s, p = i / s, q = i % s;
  if (s == Q) {  // last radix-4 stage: output r goes to quarter r
    radix4_at<T, kInv, kZeroHigh, kLowOut>(tr, ti, l4, p, xr, xi, qs, i, yr, yi, q, qs);
  } else {  // outputs 4sp + q + s r, all in quarter 4sp / Q
    const int64_t o = 4 * s * p;
    radix4_at<T, kInv, kZeroHigh, kLowOut>(tr, ti, l4, p, xr, xi, qs, i, yr, yi, (o / Q) * qs + o % Q + q, s);
  }
}

// The radix-2 first stage (odd log2 m) at p < m/2: inputs x[in], x[in + 2 qs] (p and p + m/2),
// outputs y[out], y[out + 1] (2p and 2p + 1, in one quarter). tr / ti: w^p.
template <typename T, bool kInv, bool kZeroHigh>
SSMK_FFT_FN void radix2_at(const T* tr, const T* ti, int64_t p, const T* xr, const T* xi, int64_t qs, int64_t in,
                                T* yr, T* yi, int64_t out) {
  const T ar = xr[in], ai = xi[in];
  const T br = kZeroHigh ? T(0) : xr[in + 2 * qs], bi = kZeroHigh ? T(0) : xi[in + 2 * qs];
  const T dr = ar - br, di = ai - bi, wr = tr[p], wi = kInv ? -ti[p] : ti[p];
  yr[out] = ar + br;
  yi[out] = ai + bi;
  yr[out + 1] = dr * wr - di * wi;
  yi[out + 1] = dr * wi + di * wr;
}

// Butterfly p (< m/2) of the radix-2 stage in the quartered layout, for the GPU's thread loop.
template <typename T, bool kInv, bool kZeroHigh>
SSMK_FFT_FN void radix2_stage_at(const T* tr, const T* ti, int64_t m, int64_t p, const T* xr, const T* xi,
                                      T* yr, T* yi) {
  const int64_t Q = m / 4, qs = quarter_stride(m), o = 2 * p;
  radix2_at<T, kInv, kZeroHigh>(tr, ti, p, xr, xi, qs, (p / Q) * qs + p % Q, yr, yi, (o / Q) * qs + o % Q);
}

// Real-FFT split of the pair (k, j = m - k) in place on (r, i) values: Z[k], Z[j] -> 2X[k], 2X[j].
// For k = 0 pass Z[0] as both (Z[m] = Z[0]); the results are 2X[0] and 2X[m]. (wr, wi) = W^k.
template <typename T>
SSMK_FFT_FN void split_pair(T& kr, T& ki, T& jr, T& ji, T wr, T wi) {
  const T ar = kr + jr, ai = ki - ji;  // A = Z[k] + conj(Z[j])
  const T br = ki + ji, bi = jr - kr;  // B = -i (Z[k] - conj(Z[j]))
  const T pr = wr * br - wi * bi, pi = wr * bi + wi * br;  // P = W B
  kr = ar + pr;
  ki = ai + pi;
  jr = ar - pr;
  ji = pi - ai;
}

// Real-FFT merge of the pair (k, j = m - k) in place: Y[k], Y[j] -> Z'[k], Z'[j]. For k = 0 pass
// Y[0] and Y[m]; the result Z'[0] is in (kr, ki).
template <typename T>
SSMK_FFT_FN void merge_pair(T& kr, T& ki, T& jr, T& ji, T wr, T wi) {
  const T ar = kr + jr, ai = ki - ji;                      // A = Y[k] + conj(Y[j])
  const T dr = kr - jr, di = ki + ji;                      // Y[k] - conj(Y[j])
  const T qr = wr * dr + wi * di, qi = wr * di - wi * dr;  // Q = conj(W) (Y[k] - conj(Y[j]))
  kr = ar - qi;
  ki = ai + qr;
  jr = ar + qi;
  ji = qr - ai;
}

template <typename T, bool kConj>
SSMK_FFT_FN void cmul_h(T& r, T& i, T hr, T hi) {
  const T h_i = kConj ? -hi : hi;
  const T nr = r * hr - i * h_i;
  i = r * h_i + i * hr;
  r = nr;
}

// The pair steps below work on the pair (k, j = m - k), 0 <= k <= m/2, of a row buffer z at
// positions zk = pos(k) and zj = pos(j) (zj = zk = 0 for k = 0, where Z[m] = Z[0]); spectra
// x / h are plain arrays of m + 1 values. kStoreJ: also store z at zj (false only for k = 0).

// Forward spectral step of the convolution in place on the complex FFT z of a row: split,
// Y = 2X * h (or * conj(h)) at k and j, merge. h already carries the round trip's scale.
template <typename T, bool kConj, bool kStoreJ>
SSMK_FFT_FN void conv_pair_at(const Twiddles<T>& tw, int64_t k, int64_t zk, int64_t zj, T* zr, T* zi,
                                   const T* hr, const T* hi) {
  const int64_t j = tw.m - k;
  T kr = zr[zk], ki = zi[zk], jr = zr[zj], ji = zi[zj];
  const T wr = tw.rre[k], wi = tw.rim[k];
  split_pair(kr, ki, jr, ji, wr, wi);
  cmul_h<T, kConj>(kr, ki, hr[k], hi[k]);
  cmul_h<T, kConj>(jr, ji, hr[j], hi[j]);
  merge_pair(kr, ki, jr, ji, wr, wi);
  zr[zk] = kr;
  zi[zk] = ki;
  if (kStoreJ) {
    zr[zj] = jr;
    zi[zj] = ji;
  }
}

// Split: x[k], x[j] = 2X from the complex FFT z (k = 0 gives 2X[0] and 2X[m]).
template <typename T>
SSMK_FFT_FN void split_at(const Twiddles<T>& tw, int64_t k, int64_t zk, int64_t zj, const T* zr, const T* zi,
                               T* xr, T* xi) {
  const int64_t j = tw.m - k;
  T kr = zr[zk], ki = zi[zk], jr = zr[zj], ji = zi[zj];
  split_pair(kr, ki, jr, ji, tw.rre[k], tw.rim[k]);
  xr[k] = kr;
  xi[k] = ki;
  xr[j] = jr;
  xi[j] = ji;
}

// Merge of Y = scale * x * h (or conj(h); no factor h when hr is null) into z, the input of the
// inverse complex FFT.
template <typename T, bool kConj, bool kStoreJ>
SSMK_FFT_FN void product_merge_at(const Twiddles<T>& tw, int64_t k, int64_t zk, int64_t zj, const T* xr,
                                       const T* xi, const T* hr, const T* hi, T scale, T* zr, T* zi) {
  const int64_t j = tw.m - k;
  T kr = xr[k] * scale, ki = xi[k] * scale, jr = xr[j] * scale, ji = xi[j] * scale;
  if (hr) {
    cmul_h<T, kConj>(kr, ki, hr[k], hi[k]);
    cmul_h<T, kConj>(jr, ji, hr[j], hi[j]);
  }
  merge_pair(kr, ki, jr, ji, tw.rre[k], tw.rim[k]);
  zr[zk] = kr;
  zi[zk] = ki;
  if (kStoreJ) {
    zr[zj] = jr;
    zi[zj] = ji;
  }
}

// Barrier between the stages of a block's FFT (nothing on the host, where one thread runs them).
SSMK_FFT_FN void stage_barrier() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

// The m-point complex FFT (m >= kMinSize) of the row buffer x with y as the second buffer, by
// butterfly index: thread tid of nt runs butterflies tid, tid + nt, ... of each stage, a barrier
// between stages (a CUDA block: tid = threadIdx.x, nt = blockDim.x; the CPU tests run it with
// tid = 0, nt = 1 to check the GPU's index arithmetic). Returns true when the result is in y.
// Same stage order and flags as fft_row.
template <typename T, bool kInv>
SSMK_FFT_FN bool fft_strided(const Twiddles<T>& tw, T* xr, T* xi, T* yr, T* yi, bool zero_high, bool low_out,
                             int64_t tid, int64_t nt) {
  const int64_t m = tw.m;
  int64_t len = m, s = 1, off = 0;
  bool in_y = false;
  if (odd_log2(m)) {
    for (int64_t p = tid; p < m / 2; p += nt) {
      if (zero_high) {
        radix2_stage_at<T, kInv, true>(tw.re, tw.im, m, p, xr, xi, yr, yi);
      } else {
        radix2_stage_at<T, kInv, false>(tw.re, tw.im, m, p, xr, xi, yr, yi);
      }
    }
    stage_barrier();
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
    for (int64_t i = tid; i < m / 4; i += nt) {
      if (zh) {
        radix4_stage_at<T, kInv, true, false>(tr, ti, m, s, i, ar, ai, br, bi);
      } else if (lo) {
        radix4_stage_at<T, kInv, false, true>(tr, ti, m, s, i, ar, ai, br, bi);
      } else {
        radix4_stage_at<T, kInv, false, false>(tr, ti, m, s, i, ar, ai, br, bi);
      }
    }
    stage_barrier();
    in_y = !in_y;
    off += 3 * (len / 4);
    s *= 4;
    len /= 4;
  }
  return in_y;
}

#if !defined(__CUDACC__)
// CPU drivers: one row at a time; the inner loops over independent butterflies / pairs are
// affine in the loop index (contiguous or reversed) and vectorise; they are inlined into the
// callers' AVX2 variants.

template <typename T, bool kInv, bool kZH, bool kLO>
SSMK_CPU_INLINE void radix4_stage(const T* tr, const T* ti, int64_t m, int64_t s, const T* xr, const T* xi, T* yr,
                                  T* yi) {
  const int64_t Q = m / 4, qs = quarter_stride(m), l4 = Q / s;
  if (s == Q) {
#pragma omp simd
    for (int64_t q = 0; q < s; ++q) radix4_at<T, kInv, kZH, kLO>(tr, ti, 1, 0, xr, xi, qs, q, yr, yi, q, qs);
  } else if (s == 1) {
    // Outputs 4p + r: p in [g Q/4, (g+1) Q/4) writes quarter g.
    for (int64_t g = 0; g < 4; ++g) {
      T *oyr = yr + g * qs - g * Q, *oyi = yi + g * qs - g * Q;
#pragma omp simd
      for (int64_t p = g * (Q / 4); p < (g + 1) * (Q / 4); ++p)
        radix4_at<T, kInv, kZH, kLO>(tr, ti, l4, p, xr, xi, qs, p, oyr, oyi, 4 * p, 1);
    }
  } else {
    for (int64_t p = 0; p < l4; ++p) {
      const int64_t o = 4 * s * p;
      T *oyr = yr + (o / Q) * qs + o % Q, *oyi = yi + (o / Q) * qs + o % Q;
      const T *ixr = xr + s * p, *ixi = xi + s * p;
      if (s == 4) {  // a constant trip count: one 4-wide vector
#pragma omp simd
        for (int64_t q = 0; q < 4; ++q) radix4_at<T, kInv, kZH, kLO>(tr, ti, l4, p, ixr, ixi, qs, q, oyr, oyi, q, 4);
      } else if (s == 2) {
        for (int64_t q = 0; q < 2; ++q) radix4_at<T, kInv, kZH, kLO>(tr, ti, l4, p, ixr, ixi, qs, q, oyr, oyi, q, 2);
      } else {
#pragma omp simd
        for (int64_t q = 0; q < s; ++q) radix4_at<T, kInv, kZH, kLO>(tr, ti, l4, p, ixr, ixi, qs, q, oyr, oyi, q, s);
      }
    }
  }
}

template <typename T, bool kInv, bool kZH>
SSMK_CPU_INLINE void radix2_stage(const T* tr, const T* ti, int64_t m, const T* xr, const T* xi, T* yr, T* yi) {
  const int64_t Q = m / 4, qs = quarter_stride(m);
  // p in [g Q/2, (g+1) Q/2) reads quarter g / 2 (and g / 2 + 2), writes quarter g.
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t ib = (g / 2) * qs - (g / 2) * Q, ob = g * qs - g * Q;
#pragma omp simd
    for (int64_t p = g * (Q / 2); p < (g + 1) * (Q / 2); ++p)
      radix2_at<T, kInv, kZH>(tr, ti, p, xr, xi, qs, ib + p, yr, yi, ob + 2 * p);
  }
}

// The m-point complex FFT (m >= kMinSize; unnormalised; kInv: exponent sign +) of the row buffer
// (xr, xi), with (yr, yi) as the second buffer; both are overwritten. Returns true when the result
// is in y, false when in x. zero_high: elements [m/2, m) are zero. low_out: only the result's
// elements [0, m/2) are needed.
template <typename T, bool kInv>
SSMK_CPU_INLINE bool fft_row(const Twiddles<T>& tw, T* xr, T* xi, T* yr, T* yi, bool zero_high, bool low_out) {
  const int64_t m = tw.m;
  int64_t len = m, s = 1, off = 0;
  bool in_y = false;
  if (odd_log2(m)) {
    if (zero_high) {
      radix2_stage<T, kInv, true>(tw.re, tw.im, m, xr, xi, yr, yi);
    } else {
      radix2_stage<T, kInv, false>(tw.re, tw.im, m, xr, xi, yr, yi);
    }
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
    if (zh) {
      radix4_stage<T, kInv, true, false>(tr, ti, m, s, ar, ai, br, bi);
    } else if (lo) {
      radix4_stage<T, kInv, false, true>(tr, ti, m, s, ar, ai, br, bi);
    } else {
      radix4_stage<T, kInv, false, false>(tr, ti, m, s, ar, ai, br, bi);
    }
    in_y = !in_y;
    off += 3 * (len / 4);
    s *= 4;
    len /= 4;
  }
  return in_y;
}

// Calls step(k, zk, zj) for the pairs 0 < k < m/2 in two affine runs (k in quarter 0 with j in
// quarter 3, k in quarter 1 with j in quarter 2), kStoreJ = true; the edges k = 0, m/4, m/2 go
// through edge(k, zk, zj, store_j).
#define SSMK_FFT_PAIR_LOOPS(m, STEP, EDGE)                                          \
  do {                                                                              \
    const int64_t Q_ = (m) / 4, qs_ = quarter_stride(m);                            \
    _Pragma("omp simd") for (int64_t k = 1; k < Q_; ++k) STEP(k, k, 3 * qs_ + Q_ - k); \
    _Pragma("omp simd") for (int64_t k = Q_ + 1; k < 2 * Q_; ++k)                   \
        STEP(k, qs_ + k - Q_, 2 * qs_ + 2 * Q_ - k);                                \
    EDGE(0, 0, 0, false);                                                           \
    EDGE(Q_, qs_, 3 * qs_, true);                                                   \
    EDGE(2 * Q_, 2 * qs_, 2 * qs_, true);                                           \
  } while (0)

template <typename T, bool kConj>
SSMK_CPU_INLINE void conv_pass(const Twiddles<T>& tw, T* zr, T* zi, const T* hr, const T* hi) {
#define STEP(k, zk, zj) conv_pair_at<T, kConj, true>(tw, k, zk, zj, zr, zi, hr, hi)
#define EDGE(k, zk, zj, sj) \
  (sj ? conv_pair_at<T, kConj, true>(tw, k, zk, zj, zr, zi, hr, hi) : conv_pair_at<T, kConj, false>(tw, k, zk, zj, zr, zi, hr, hi))
  SSMK_FFT_PAIR_LOOPS(tw.m, STEP, EDGE);
#undef STEP
#undef EDGE
}

template <typename T>
SSMK_CPU_INLINE void split_pass(const Twiddles<T>& tw, const T* zr, const T* zi, T* xr, T* xi) {
#define STEP(k, zk, zj) split_at<T>(tw, k, zk, zj, zr, zi, xr, xi)
#define EDGE(k, zk, zj, sj) split_at<T>(tw, k, zk, zj, zr, zi, xr, xi)
  SSMK_FFT_PAIR_LOOPS(tw.m, STEP, EDGE);
#undef STEP
#undef EDGE
}

template <typename T, bool kConj>
SSMK_CPU_INLINE void product_merge_pass(const Twiddles<T>& tw, const T* xr, const T* xi, const T* hr, const T* hi,
                                        T scale, T* zr, T* zi) {
#define STEP(k, zk, zj) product_merge_at<T, kConj, true>(tw, k, zk, zj, xr, xi, hr, hi, scale, zr, zi)
#define EDGE(k, zk, zj, sj)                                                           \
  (sj ? product_merge_at<T, kConj, true>(tw, k, zk, zj, xr, xi, hr, hi, scale, zr, zi) \
      : product_merge_at<T, kConj, false>(tw, k, zk, zj, xr, xi, hr, hi, scale, zr, zi))
  SSMK_FFT_PAIR_LOOPS(tw.m, STEP, EDGE);
#undef STEP
#undef EDGE
}
#undef SSMK_FFT_PAIR_LOOPS

// Real row x[0, len) (zero beyond, len <= 2m) -> row buffer z[j] = x[2j] + i x[2j+1], j < m.
template <typename T>
SSMK_CPU_INLINE void deinterleave(const T* x, int64_t len, int64_t m, T* zr, T* zi) {
  const int64_t Q = m / 4, qs = quarter_stride(m);
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t j0 = g * Q, full = std::min(std::max<int64_t>(len / 2 - j0, 0), Q);
    T *r = zr + g * qs, *i = zi + g * qs;
    const T* xs = x + 2 * j0;
#pragma omp simd
    for (int64_t j = 0; j < full; ++j) {
      r[j] = xs[2 * j];
      i[j] = xs[2 * j + 1];
    }
    int64_t j = full;
    if (j < Q && 2 * (j0 + j) < len) {  // the odd length's last element
      r[j] = xs[2 * j];
      i[j] = T(0);
      ++j;
    }
#pragma omp simd
    for (int64_t z = j; z < Q; ++z) {
      r[z] = T(0);
      i[z] = T(0);
    }
  }
}

// x[t] = (t even ? re : im)(z[t / 2]) for t < len.
template <typename T>
SSMK_CPU_INLINE void interleave(const T* zr, const T* zi, int64_t len, int64_t m, T* x) {
  const int64_t Q = m / 4, qs = quarter_stride(m);
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t j0 = g * Q, full = std::min(std::max<int64_t>(len / 2 - j0, 0), Q);
    const T *r = zr + g * qs, *i = zi + g * qs;
    T* xs = x + 2 * j0;
#pragma omp simd
    for (int64_t j = 0; j < full; ++j) {
      xs[2 * j] = r[j];
      xs[2 * j + 1] = i[j];
    }
    if (full < Q && 2 * (j0 + full) < len) xs[2 * full] = r[full];
  }
}
#endif  // !defined(__CUDACC__)

}  // namespace ssmk::fftconv::fft

#undef SSMK_FFT_FN
