// Host-side argument checks. Errors surface in Python as ValueError (SSMK_CHECK_VALUE) or
// TypeError (SSMK_CHECK_TYPE) and name the argument, the expected and the actual value.
#pragma once

#include "common/aten.h"
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#define SSMK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define SSMK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

namespace ssmk {

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  SSMK_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name) {
  SSMK_CHECK_TYPE(t.scalar_type() == expected, name, ": expected dtype ", expected, ", got ",
                  t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  SSMK_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ",
                   t.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  SSMK_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                  ": expected a float32, float16, bfloat16 or float64 tensor, got ", s);
}

// A one-dimensional CUDA grid holds at most 2^31 - 1 blocks; `name` is the argument whose size
// sets the count.
inline void check_cuda_grid(int64_t blocks, const char* name) {
  SSMK_CHECK_VALUE(blocks <= INT32_MAX, name, ": too large for one CUDA launch (", blocks,
                   " blocks, at most 2^31 - 1)");
}

}  // namespace ssmk
