// common/op.h plus <torch/library.h>, for the files that register ops by hand with
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL (test hooks, ops with inferred schemas):
// ssmk::op::define<Args>(m, name, returns) and m.impl(name, ssmk::op::kernel<Args, Fn>()).
#pragma once

#include <torch/library.h>

#include "common/op.h"

namespace ssmk {
namespace op {

template <typename Args>
void define(torch::Library& m, const char* name, const char* returns) {
  m.def(schema<Args>(name, returns).c_str());
}

template <typename Args, auto Fn>
void boxed_for_dispatcher(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  boxed<Args, Fn>(stack);
}

template <typename Args, auto Fn>
torch::CppFunction kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&boxed_for_dispatcher<Args, Fn>>();
}

}  // namespace op
}  // namespace ssmk
