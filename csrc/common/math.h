// Scalar math used by CPU and CUDA kernels alike (written once, so CPU tests verify GPU math).
#pragma once

#include <cmath>

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

template <typename T>
SSMK_HOST_DEVICE T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
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
  using std::exp;
  using std::log1p;
  return x > T(20) ? x : log1p(exp(x));
}

template <typename T>
SSMK_HOST_DEVICE T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

}  // namespace ssmk
