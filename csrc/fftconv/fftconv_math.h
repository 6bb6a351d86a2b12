// Per-element math of the FFT long convolution, shared by the CPU and CUDA kernels.
//
//   v = u * pregate;  c = h (*) v  (circular convolution of length n, zero-padded, first L kept);
//   pre = c + D * v;  y = act(pre);  out = y * postgate.
//
// h is the combined kernel of length n: h[s] = k[s] for s < Kc, h[(n - s) % n] += k_rev[s] for
// s < Kr (lag 0 shared). With n >= L + max(Kc, Kr) - 1 no output position aliases (see
// docs/fftconv.md), so the circular convolution equals the causal plus anti-causal sums.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace ssmk::fftconv {

// Activation codes of the fftconv_fwd / fftconv_bwd schemas.
constexpr int kActNone = 0;
constexpr int kActGelu = 1;
constexpr int kActSilu = 2;

// Smallest n >= m of the form 2^a 3^b 5^c (sizes every FFT library handles at full speed).
inline int64_t fft_size(int64_t m) {
  if (m <= 1) return 1;
  int64_t best = 1;
  while (best < m) best *= 2;  // a power of two is always a candidate
  for (int64_t p5 = 1; p5 < best; p5 *= 5) {
    for (int64_t p35 = p5; p35 < best; p35 *= 3) {
      int64_t n = p35;
      while (n < m) n *= 2;
      if (n < best) best = n;
    }
  }
  return best;
}

// Smallest power of two >= m.
inline int64_t next_pow2(int64_t m) {
  int64_t n = 1;
  while (n < m) n *= 2;
  return n;
}

SSMK_HOST_DEVICE float erf_(float x) {
#ifdef __CUDA_ARCH__
  return erff(x);
#else
  return std::erf(x);
#endif
}
SSMK_HOST_DEVICE double erf_(double x) {
#ifdef __CUDA_ARCH__
  return ::erf(x);
#else
  return std::erf(x);
#endif
}
SSMK_HOST_DEVICE float exp_(float x) { return ssmk::fast_exp(x); }
SSMK_HOST_DEVICE double exp_(double x) { return ssmk::fast_exp(x); }

// gelu(x) = x * Phi(x), Phi the standard normal CDF (exact erf form, like F.gelu).
template <typename T>
SSMK_HOST_DEVICE T gelu(T x) {
  return T(0.5) * x * (T(1) + erf_(x * T(0.70710678118654752440)));
}

// d gelu / dx = Phi(x) + x * phi(x)
template <typename T>
SSMK_HOST_DEVICE T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + erf_(x * T(0.70710678118654752440)));
  const T pdf = T(0.39894228040143267794) * exp_(T(-0.5) * x * x);
  return cdf + x * pdf;
}

template <typename T>
SSMK_HOST_DEVICE T activation(T pre, int act) {
  if (act == kActGelu) return gelu(pre);
  if (act == kActSilu) return ssmk::silu(pre);
  return pre;
}

template <typename T>
SSMK_HOST_DEVICE T activation_grad(T pre, int act) {
  if (act == kActGelu) return gelu_grad(pre);
  if (act == kActSilu) return ssmk::silu_grad(pre);
  return T(1);
}

// a * b and a * conj(b) on (re, im) pairs: the pointwise products of the spectra.
template <typename T>
SSMK_HOST_DEVICE void cmul(T ar, T ai, T br, T bi, T& re, T& im) {
  re = ar * br - ai * bi;
  im = ar * bi + ai * br;
}
template <typename T>
SSMK_HOST_DEVICE void cmul_conj(T ar, T ai, T br, T bi, T& re, T& im) {
  re = ar * br + ai * bi;
  im = ai * br - ar * bi;
}

// Forward epilogue at one position: out = act(c + D v) * postgate (pg = 1 without postgate).
template <typename T>
SSMK_HOST_DEVICE T epilogue(T c, T v, T d, T pg, int act) {
  return activation(c + d * v, act) * pg;
}

// Backward pointwise stage at one position, given the recomputed c (any value when neither an
// activation nor a postgate needs it) and the incoming gradient dout:
//   gpre = dout * pg * act'(pre)        (gradient of pre = c + D v, i.e. of c)
//   dpg  = dout * act(pre)
template <typename T>
SSMK_HOST_DEVICE void pointwise_grad(T c, T v, T d, T pg, T dout, int act, T& gpre, T& dpg) {
  const T pre = c + d * v;
  dpg = dout * activation(pre, act);
  gpre = dout * pg * activation_grad(pre, act);
}

}  // namespace ssmk::fftconv
