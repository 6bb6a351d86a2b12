// Element types shared by host and device code: the accumulation type of each input type.
// No ATen tensors here, so CUDA kernel files include it without the host-side headers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include <cstdint>

#include "common/macros.h"

namespace ssmk {

// float32 for float32/float16/bfloat16, float64 for float64, and the complex of those for
// complex inputs: what every kernel accumulates in (API.md, precision).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
struct Acc<c10::complex<T>> {
  using type = c10::complex<T>;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// The complex conjugate, and the identity for real types, so kernels write one formula for both.
template <typename T>
SSMK_MATH_INLINE T conj_of(T x) {
  return x;
}
template <typename T>
SSMK_MATH_INLINE c10::complex<T> conj_of(c10::complex<T> x) {
  return c10::complex<T>(x.real(), -x.imag());
}

// The element types of each dispatch set (common/dispatch.h), as X-macros for the explicit
// instantiations beside the kernels: SSMK_FLOAT_TYPES(INSTANTIATE).
#define SSMK_FLOAT_TYPES(M) M(float) M(double) M(c10::Half) M(c10::BFloat16)
// Pairs (A, S) for every S of the float set: the second type of a two-type kernel.
#define SSMK_FLOAT_TYPES_WITH(M, A) M(A, float) M(A, double) M(A, c10::Half) M(A, c10::BFloat16)
#define SSMK_COMPLEX_TYPES(M) M(c10::complex<float>) M(c10::complex<double>)
#define SSMK_FLOAT_AND_COMPLEX_TYPES(M) SSMK_FLOAT_TYPES(M) SSMK_COMPLEX_TYPES(M)

}  // namespace ssmk

#if defined(SSMK_WITH_CUDA)
struct CUstream_st;
#endif

namespace ssmk {

// ceil(a / b) for a >= 0, b > 0: chunk, tile and block counts.
constexpr SSMK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A typed strided view of an N-dimensional tensor (strides in elements); data is nullptr for an
// absent optional argument.
template <typename T, int N>
struct View {
  T* data;
  int64_t stride[N];
};

#if defined(SSMK_WITH_CUDA)
// What a CUDA launcher gets from the host: the current stream and the device's SM count.
struct CudaContext {
  ::CUstream_st* stream;  // cudaStream_t, without the CUDA headers
  int sms;
};
#endif

}  // namespace ssmk
