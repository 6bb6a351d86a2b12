// The one dtype dispatch of the project (host code): each op's host file fixes the element type
// here, once, and hands typed params to the kernels. `scalar_t` names the type inside the body.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

// float32, float64, float16, bfloat16: the real ops.
#define SSMK_DISPATCH_FLOAT(DTYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, __VA_ARGS__)

// The real types and complex64/complex128: ops defined for both (linear_scan).
#define SSMK_DISPATCH_FLOAT_AND_COMPLEX(DTYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, __VA_ARGS__)

// complex64, complex128: the S4 kernels.
#define SSMK_DISPATCH_COMPLEX(DTYPE, NAME, ...) AT_DISPATCH_COMPLEX_TYPES(DTYPE, NAME, __VA_ARGS__)

namespace ssmk {

// The dtype of ssmk::acc_t<T> for a tensor of dtype `s`.
inline at::ScalarType acc_dtype(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
    case at::kComplexFloat:
    case at::kComplexDouble:
      return s;
    default:
      return at::kFloat;
  }
}

}  // namespace ssmk
