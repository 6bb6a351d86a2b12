// The TORCH_LIBRARY of the project's namespaces. Each op declares its own schema and kernels in
// its folder (SSMK_OP in <op>_op.cpp, see common/op.h), registered through ssmk::op::register_op
// below; fake implementations and autograd are registered from Python (python/ssm_kernels/ops/).
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common/op_register.h"

#include "common/cpu.h"
#include "common/poison.h"

#ifdef SSMK_PYTHON_MODULE
#include <Python.h>
#endif

#ifndef SSMK_CUDA_ARCHS
#define SSMK_CUDA_ARCHS ""
#endif

namespace ssmk {

std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace op {
namespace {

// The dispatcher's boxed kernel for a runtime function pointer.
struct BoxedOp final : c10::OperatorKernel {
  explicit BoxedOp(BoxedKernel kernel) : kernel(kernel) {}
  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) { kernel(stack); }
  BoxedKernel kernel;
};

}  // namespace

bool register_op(const char* name, const std::string& schema, BoxedKernel kernel, const char* file, int line) {
  // What TORCH_LIBRARY_FRAGMENT and TORCH_LIBRARY_IMPL do in a static initialiser: the libraries
  // stay alive as long as the extension, keeping the op registered.
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  const auto at_line = static_cast<uint32_t>(line);
  auto fragment =
      std::make_unique<torch::Library>(torch::Library::FRAGMENT, "ssm_kernels", std::nullopt, file, at_line);
  fragment->def(schema.c_str());
  libraries.push_back(std::move(fragment));
  for (const c10::DispatchKey key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
    auto impl = std::make_unique<torch::Library>(torch::Library::IMPL, "ssm_kernels", key, file, at_line);
    impl->impl(name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BoxedOp>(kernel)));
    libraries.push_back(std::move(impl));
  }
  return true;
}

}  // namespace op

namespace {

bool set_poison_outputs(bool enable) { return poison_outputs_flag().exchange(enable); }

// `key=value` items separated by ';'. The arch list is space-separated: setup.py defines it so, and
// any ';' (a CMake list passed through) is turned into a space so that it cannot split an item.
std::string build_info() {
  std::string info = "cuda=";
#ifdef SSMK_WITH_CUDA
  std::string archs = SSMK_CUDA_ARCHS;
  for (char& c : archs) {
    if (c == ';' || c == ',') c = ' ';
  }
  info += "1;cuda_archs=" + archs;
#else
  info += "0;cuda_archs=";
#endif
  // cpu_isa: the path the CPU kernels take on this machine, picked at run time (common/cpu.h);
  // cpu_isa_build: what the compiler may assume everywhere (sse2 for a portable x86-64 build; avx2
  // or avx512 would mean -march flags that make the library fail on older CPUs).
  info += ";cpu_isa=";
#if SSMK_HAVE_AVX2_DISPATCH
  info += cpu::cpu_has_avx2() ? "avx2" : "sse2";
#elif defined(__aarch64__)
  info += "neon";
#else
  info += "generic";
#endif
#if defined(__AVX512F__)
  info += ";cpu_isa_build=avx512";
#elif defined(__AVX2__)
  info += ";cpu_isa_build=avx2";
#elif defined(__SSE2__)
  info += ";cpu_isa_build=sse2";
#elif defined(__aarch64__)
  info += ";cpu_isa_build=neon";
#else
  info += ";cpu_isa_build=generic";
#endif
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY(ssm_kernels, m) {
  m.def("build_info() -> str", &ssmk::build_info);
}

// Test hooks live in their own namespace, outside the public torch.ops.ssm_kernels.
TORCH_LIBRARY(ssm_kernels_test, m) {
  m.def("set_poison_outputs(bool enable) -> bool", &ssmk::set_poison_outputs);
}

#ifdef SSMK_PYTHON_MODULE
// An empty Python module, so `import ssm_kernels._C` loads the library and runs the static
// registrations above (the extension-cpp pattern; no pybind11, stable ABI).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
