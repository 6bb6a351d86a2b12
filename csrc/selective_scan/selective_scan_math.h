// Per-element math of the Mamba-1 selective scan, shared by the CPU and CUDA kernels.
//
// Per (b, d, n):  dt_t = softplus?(delta_t + delta_bias)
//                 a_t  = exp(dt_t * A[n]),  b_t = dt_t * B_t[n] * u_t
//                 h_t  = a_t * h_{t-1} + b_t
//                 y_t  = sum_n C_t[n] * h_t[n]        (2 * Re(...) for complex A)
//                 out_t = (y_t + D * u_t) * silu(z_t)
// Gradients use PyTorch's convention for complex tensors (grad = dL/dRe + i dL/dIm), so the
// adjoint of a product p = x * y is dx = dp * conj(y).
#pragma once

#include <c10/util/complex.h>

#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace ssmk::selective_scan {

// Time steps between two saved states (the forward's checkpoints). The CUDA kernels process one
// chunk per block iteration (kThreads x kItems = kChunkSize); the CPU kernels walk the same chunks.
constexpr int64_t kChunkSize = 2048;
constexpr int64_t kMaxDstate = 256;

SSMK_HOST_DEVICE int64_t num_chunks(int64_t seqlen) { return (seqlen + kChunkSize - 1) / kChunkSize; }

template <typename T>
SSMK_MATH_INLINE T delta_transform(T delta, T bias, bool use_softplus) {
  const T x = delta + bias;
  return use_softplus ? ssmk::softplus(x) : x;
}

// d dt / d delta
template <typename T>
SSMK_MATH_INLINE T delta_transform_grad(T delta, T bias, bool use_softplus) {
  return use_softplus ? ssmk::softplus_grad(delta + bias) : T(1);
}

template <typename T>
SSMK_MATH_INLINE T real_part(T x) {
  return x;
}
template <typename T>
SSMK_MATH_INLINE T real_part(c10::complex<T> x) {
  return x.real();
}

// Re(conj(x) * y): the real inner product, i.e. how a real scalar s enters through x * s.
template <typename T>
SSMK_MATH_INLINE T real_dot(T x, T y) {
  return x * y;
}
template <typename T>
SSMK_MATH_INLINE T real_dot(c10::complex<T> x, c10::complex<T> y) {
  return x.real() * y.real() + x.imag() * y.imag();
}

// a = exp(dt * A)
template <typename T>
SSMK_MATH_INLINE T discretize(T dt, T A) {
  return ssmk::fast_exp(dt * A);
}
template <typename T>
SSMK_MATH_INLINE c10::complex<T> discretize(T dt, c10::complex<T> A) {
  using std::cos;
  using std::sin;
  const T mag = ssmk::fast_exp(dt * A.real());
  const T ang = dt * A.imag();
  return c10::complex<T>(mag * cos(ang), mag * sin(ang));
}

// The output scale of y: 2 for complex A (the conjugate half of the state is implicit).
template <typename W>
struct OutputScale {
  static constexpr int value = 1;
};
template <typename T>
struct OutputScale<c10::complex<T>> {
  static constexpr int value = 2;
};

// out = (y + D u) * silu(z)
template <typename T>
SSMK_MATH_INLINE T epilogue(T y, T u, T D, T z, bool has_z) {
  const T o = y + D * u;
  return has_z ? o * ssmk::silu(z) : o;
}

}  // namespace ssmk::selective_scan
