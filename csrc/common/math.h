// Scalar math used by CPU and CUDA kernels alike (written once, so CPU tests verify GPU math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace ssmk {

// Accumulation type: float for float/half/bfloat16 inputs, double for double inputs.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// exp for float that compilers vectorise on the CPU (no libm call): Cody-Waite reduction by
// ln 2 and the degree-6 polynomial of Cephes' expf; relative error below 3e-7 on [-87, 88].
// Exact 0 below -87 (true value < 2e-38), +inf above 88.72, NaN propagates. On the GPU, expf.
SSMK_HOST_DEVICE float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = q * scale;
  res = x < -87.0f ? 0.0f : res;
  res = x > 88.72f ? std::numeric_limits<float>::infinity() : res;
  return x != x ? x : res;
#endif
}

SSMK_HOST_DEVICE double fast_exp(double x) {
  using std::exp;
  return exp(x);
}

template <typename T>
SSMK_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

template <typename T>
SSMK_HOST_DEVICE T silu(T x) {
  return x * sigmoid(x);
}

// d silu(x) / dx = s * (1 + x * (1 - s)), s = sigmoid(x)
template <typename T>
SSMK_HOST_DEVICE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// softplus(x) = log(1 + e^x), returned as x above 20 like torch.nn.functional.softplus
template <typename T>
SSMK_HOST_DEVICE T softplus(T x) {
  using std::log1p;
  return x > T(20) ? x : log1p(fast_exp(x));
}

template <typename T>
SSMK_HOST_DEVICE T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

}  // namespace ssmk
