// How an op reaches the dispatcher (common/op.h's SSMK_OP), apart from the tensor headers so that
// registration.cpp, which defines it, parses only <torch/library.h>.
#pragma once

#include <ATen/core/stack.h>

#include <string>

namespace ssmk {
namespace op {

// The dispatcher's calling convention: pop the arguments, push the results.
using BoxedKernel = void (*)(torch::jit::Stack*);

// Defines op ssm_kernels::<name> by `schema` and registers `kernel` for CPU and CUDA; `file` and
// `line` are what the dispatcher reports as the place of registration. Defined in
// registration.cpp, the one file of the ops that parses <torch/library.h> (about 1 s of compile
// time per file); hand-written registrations include common/op_library.h instead. Returns true,
// to initialise a static.
bool register_op(const char* name, const std::string& schema, BoxedKernel kernel, const char* file, int line);

}  // namespace op
}  // namespace ssmk
