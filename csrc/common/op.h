// How an op is declared and registered (host code only; CUDA files never include this).
//
// An op's arguments are listed once, as an X-macro of (type, name) pairs:
//
//   #define LINEAR_SCAN_FWD_ARGS(X) X(Tensor, a) X(Tensor, b) X(OptTensor, initial_state) X(Bool, reverse)
//   SSMK_OP_ARGS(LinearScanFwdArgs, LINEAR_SCAN_FWD_ARGS)
//
// From that list come the schema's argument string (LinearScanFwdArgs::schema()), a struct with
// one field per argument, and the boxed kernel that fills the struct from the dispatcher's stack.
// The host function `Out fn(const Args&)` then checks, allocates, builds typed params and launches
// (ssmk::launch below); it is registered for CPU and CUDA alike, so both devices share one host
// path and every argument check runs in C++ host code compiled by the C++ compiler, before any
// kernel (CUDA files hold only kernels and their launchers, which never throw).
#pragma once

#include <ATen/core/stack.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/aten.h"
#include "common/checks.h"
#include "common/op_register.h"
#include "common/types.h"

#ifdef SSMK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace ssmk {
namespace op {

// The argument types an op may declare, by their schema spelling.
using Tensor = at::Tensor;                 // Tensor
// Tensor(a!), Tensor(b!), ...: updated in place; each in-place argument of an op has its own letter.
template <char Alias>
struct MutTensorOf : at::Tensor {};
using MutTensor = MutTensorOf<'a'>;
using OptTensor = std::optional<at::Tensor>;  // Tensor?
using Bool = bool;                         // bool
using Int = int64_t;                       // int
using Float = double;                      // float
using Dtype = at::ScalarType;              // ScalarType
using FloatList = std::vector<double>;     // float[]
// Tensor? x=None: an optional tensor added after an op's first arguments, so that calls passing
// the earlier ones positionally keep working. Only at the end of an argument list.
struct OptTensorDefaultNone : std::optional<at::Tensor> {
  using std::optional<at::Tensor>::optional;
  using std::optional<at::Tensor>::operator=;
};

// Arg<T>: the schema spelling of an argument type (and its default), and how its value leaves the
// dispatcher's stack.
template <typename T>
struct Arg;
#define SSMK_OP_ARG_TYPE(TYPE, SCHEMA, DEFAULT, TAKE)  \
  template <>                                          \
  struct Arg<TYPE> {                                   \
    static constexpr const char* kSchema = SCHEMA;     \
    static constexpr const char* kDefault = DEFAULT;   \
    static TYPE take(c10::IValue& v) { return TAKE; }  \
  };
SSMK_OP_ARG_TYPE(Tensor, "Tensor", "", std::move(v).toTensor())
SSMK_OP_ARG_TYPE(OptTensor, "Tensor?", "", std::move(v).toOptional<at::Tensor>())
SSMK_OP_ARG_TYPE(OptTensorDefaultNone, "Tensor?", "=None",
                 [&] { OptTensorDefaultNone t; t = std::move(v).toOptional<at::Tensor>(); return t; }())
SSMK_OP_ARG_TYPE(Bool, "bool", "", v.toBool())
SSMK_OP_ARG_TYPE(Int, "int", "", v.toInt())
SSMK_OP_ARG_TYPE(Float, "float", "", v.toDouble())
SSMK_OP_ARG_TYPE(Dtype, "ScalarType", "", v.toScalarType())
SSMK_OP_ARG_TYPE(FloatList, "float[]", "", v.toDoubleVector())
#undef SSMK_OP_ARG_TYPE
template <char Alias>
struct Arg<MutTensorOf<Alias>> {
  static constexpr char kSchema[] = {'T', 'e', 'n', 's', 'o', 'r', '(', Alias, '!', ')', '\0'};
  static constexpr const char* kDefault = "";
  static MutTensorOf<Alias> take(c10::IValue& v) { return MutTensorOf<Alias>{std::move(v).toTensor()}; }
};

template <typename T>
std::string schema_arg(const char* name) {
  return std::string(", ") + Arg<T>::kSchema + " " + name + Arg<T>::kDefault;
}

inline void push(torch::jit::Stack& stack, at::Tensor t) { stack.emplace_back(std::move(t)); }
inline void push(torch::jit::Stack& stack, std::vector<int64_t> v) { stack.emplace_back(std::move(v)); }
template <typename... T>
void push(torch::jit::Stack& stack, std::tuple<T...> t) {
  std::apply([&](auto&... x) { (stack.emplace_back(std::move(x)), ...); }, t);
}

// Args' boxed kernel (see common/op_register.h).
template <typename Args, auto Fn>
void boxed(torch::jit::Stack* stack) {
  push(*stack, Fn(Args::pop(*stack)));
}

// name(<Args' schema>) -> returns
template <typename Args>
std::string schema(const char* name, const char* returns) {
  return std::string(name) + "(" + Args::schema().substr(2) + ") -> " + returns;
}

}  // namespace op

// A typed strided view: what a kernel reads instead of a void* and loose strides.
template <typename T, int N>
View<T, N> view(const at::Tensor& t) {
  View<T, N> v{};
  v.data = static_cast<T*>(t.data_ptr());
  for (int i = 0; i < N; ++i) v.stride[i] = t.stride(i);
  return v;
}
template <typename T, int N>
View<T, N> view(const std::optional<at::Tensor>& t) {
  return t ? view<T, N>(*t) : View<T, N>{};
}
template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// Runs `cpu()` for CPU tensors and `cuda(ctx)` for CUDA tensors, under a device guard on the
// current stream; a failed CUDA launch raises here, in host code. Pass the CUDA launcher through
// SSMK_CUDA(...), which drops it from builds without CUDA kernels.
template <typename Cpu>
void launch(const at::Tensor& ref, Cpu&& cpu) {
  SSMK_CHECK_VALUE(ref.device().is_cpu(), "this build of ssm_kernels has CPU kernels only; got a tensor on ",
                   ref.device(), " (rebuild with nvcc available, or SSM_KERNELS_CUDA=1)");
  cpu();
}

#ifdef SSMK_WITH_CUDA
#define SSMK_CUDA(...) , __VA_ARGS__

template <typename Cpu, typename Cuda>
void launch(const at::Tensor& ref, Cpu&& cpu, Cuda&& cuda) {
  if (ref.device().is_cpu()) {
    cpu();
    return;
  }
  SSMK_CHECK_VALUE(ref.is_cuda(), "expected a cpu or cuda tensor, got device ", ref.device());
  const c10::cuda::CUDAGuard guard(ref.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ref.device().index()));
  const CudaContext ctx{c10::cuda::getCurrentCUDAStream(ref.device().index()).stream(), sms};
  cuda(ctx);
  C10_CUDA_CHECK(cudaGetLastError());
}
#else
#define SSMK_CUDA(...)
#endif

}  // namespace ssmk

#define SSMK_OP_FIELD(type, name) ::ssmk::op::type name;
#define SSMK_OP_SCHEMA(type, name) +::ssmk::op::schema_arg<::ssmk::op::type>(#name)
#define SSMK_OP_COUNT(type, name) +1
#define SSMK_OP_TAKE(type, name) args.name = ::ssmk::op::Arg<::ssmk::op::type>::take(*it++);

// The struct of an op's arguments (see the top of this file).
#define SSMK_OP_ARGS(STRUCT, LIST)                                                      \
  struct STRUCT {                                                                       \
    LIST(SSMK_OP_FIELD)                                                                 \
    static constexpr size_t kCount = 0 LIST(SSMK_OP_COUNT);                             \
    static std::string schema() { return std::string() LIST(SSMK_OP_SCHEMA); }          \
    static STRUCT pop(torch::jit::Stack& stack) {                                       \
      STRUCT args;                                                                      \
      auto it = stack.end() - kCount;                                                   \
      LIST(SSMK_OP_TAKE)                                                                \
      stack.erase(stack.end() - kCount, stack.end());                                   \
      return args;                                                                      \
    }                                                                                   \
  };

// Defines op NAME, with the schema of the args struct ARGS and the returns RETURNS, and registers
// the host function ssmk::NAME as its kernel for both devices (one host path, see above).
#define SSMK_OP(NAME, ARGS, RETURNS)                                                                   \
  static const bool ssmk_op_registered_##NAME =                                                       \
      ::ssmk::op::register_op(#NAME, ::ssmk::op::schema<::ssmk::ARGS>(#NAME, RETURNS),                \
                              &::ssmk::op::boxed<::ssmk::ARGS, &::ssmk::NAME>, __FILE__, __LINE__);
