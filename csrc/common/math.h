// Scalar math used by CPU and CUDA kernels alike (written once, so CPU tests verify GPU math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace ssmk {

#ifndef __CUDA_ARCH__
// e^x for x in [-87, 88], with no special cases (garbage outside, for callers that select it away):
// Cody-Waite reduction by ln 2 and the degree-6 polynomial of Cephes' expf. n = round(x / ln 2)
// sits in the low mantissa bits of k = x / ln 2 + 1.5 * 2^23, so 2^n is applied by adding
// n << 23 = bits(k) << 23 to the exponent bits (no float-int conversion, no multiply; exact since
// the result is normal on this range).
SSMK_MATH_INLINE float exp_in_range(float x) {
  const float k = x * 1.44269504088896341f + 12582912.0f;
  const float n = k - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  uint32_t kbits, qbits;
  std::memcpy(&kbits, &k, sizeof(k));
  std::memcpy(&qbits, &q, sizeof(q));
  qbits += kbits << 23;
  float res;
  std::memcpy(&res, &qbits, sizeof(res));
  return res;
}
#endif

// exp for float that compilers vectorise on the CPU (no libm call): exp_in_range on the clamped
// argument; relative error below 3e-7 on [-87, 88]. Exact 0 below -87 (true value < 2e-38), +inf
// above 88.72, NaN propagates. On the GPU, expf.
SSMK_MATH_INLINE float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  float res = exp_in_range(xc);
  res = x < -87.0f ? 0.0f : res;
  res = x > 88.72f ? std::numeric_limits<float>::infinity() : res;
  return x != x ? x : res;
#endif
}

SSMK_MATH_INLINE double fast_exp(double x) {
  using std::exp;
  return exp(x);
}

template <typename T>
SSMK_MATH_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

template <typename T>
SSMK_MATH_INLINE T silu(T x) {
  return x * sigmoid(x);
}

// float on the CPU: x / (1 + e^-x), with the range handled on the result instead of through
// fast_exp's clamps and special cases, which cost as much as the exp itself (and SiLU is most of
// the work of a causal conv): above 87 the result is x, below -88 it is x * 0 (-0, or NaN for
// -inf, as x * sigmoid(x) gives), and a NaN x stays NaN through the division. Relative error
// below 2e-7 where |silu(x)| > 1e-30.
SSMK_MATH_INLINE float silu(float x) {
#ifdef __CUDA_ARCH__
  return x * sigmoid(x);
#else
  const float s = x / (1.0f + exp_in_range(-x));
  const float low = x < -88.0f ? x * 0.0f : s;
  return x > 87.0f ? x : low;
#endif
}

// d silu(x) / dx = s * (1 + x * (1 - s)), s = sigmoid(x)
template <typename T>
SSMK_MATH_INLINE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// log(1 + u) for u >= 0, vectorisable on the CPU: Cephes' logf polynomial on the mantissa of
// w = 1 + u, corrected by u / (w - 1) for the rounding of 1 + u (Goldberg's log1p), so small u
// keep full relative precision. Relative error below 3e-7; inf for u = inf, NaN for NaN.
SSMK_MATH_INLINE float fast_log1p(float u) {
#ifdef __CUDA_ARCH__
  return log1pf(u);
#else
  const float w = 1.0f + u;
  int32_t bits;
  std::memcpy(&bits, &w, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float q = 7.0376836292e-2f;
  q = q * m - 1.1514610310e-1f;
  q = q * m + 1.1676998740e-1f;
  q = q * m - 1.2420140846e-1f;
  q = q * m + 1.4249322787e-1f;
  q = q * m - 1.6668057665e-1f;
  q = q * m + 2.0000714765e-1f;
  q = q * m - 2.4999993993e-1f;
  q = q * m + 3.3333331174e-1f;
  float r = q * m * z;
  r += -2.12194440e-4f * e;
  r += -0.5f * z;
  r = m + r + 0.693359375f * e;  // log(w)
  const float d = w - 1.0f;
  r = d == 0.0f ? u : r * (u / d);
  r = w > 3.0e38f ? w : r;  // u = inf (and huge u, where the correction is 1)
  return u != u ? u : r;
#endif
}

SSMK_MATH_INLINE double fast_log1p(double u) {
  using std::log1p;
  return log1p(u);
}

// softplus(x) = log(1 + e^x), returned as x above 20 like torch.nn.functional.softplus
template <typename T>
SSMK_MATH_INLINE T softplus(T x) {
  return x > T(20) ? x : fast_log1p(fast_exp(x));
}

template <typename T>
SSMK_MATH_INLINE T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

}  // namespace ssmk
