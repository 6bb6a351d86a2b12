// Output allocation. With poisoning on (a test switch, see ssm_kernels.testing.poisoned_outputs),
// every output buffer is filled with NaN before the kernel runs, so an element a kernel forgets
// to write fails the comparison instead of passing by luck.
#pragma once

#include <limits>
#include <optional>

#include "common/aten.h"
#include "common/poison.h"

namespace ssmk {

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs_flag().load(std::memory_order_relaxed) && out.is_floating_point()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (poison_outputs_flag().load(std::memory_order_relaxed) && out.is_complex()) {
    out.fill_(c10::complex<double>(std::numeric_limits<double>::quiet_NaN(), 0.0));
  }
  return out;
}

// The gradient of an input, by the convention the Python layer derives autograd from
// (python/ssm_kernels/ops/_op.py): shaped and typed like the input, or an empty [0] tensor of
// `ref`'s dtype where the optional input is absent.
inline at::Tensor new_grad(const std::optional<at::Tensor>& input, const at::Tensor& ref) {
  return input ? new_output(input->sizes(), input->options()) : at::empty({0}, ref.options());
}

}  // namespace ssmk
