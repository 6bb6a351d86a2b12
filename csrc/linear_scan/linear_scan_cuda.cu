// CUDA host functions of linear_scan: the shared driver (linear_scan.h) with the kernels of
// linear_scan_kernel.cuh as its launcher.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear_scan/linear_scan.h"
#include "linear_scan/linear_scan_kernel.cuh"

namespace ssmk {
namespace {

#define SSMK_DISPATCH_SCAN_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> linear_scan_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                                                        const std::optional<at::Tensor>& initial_state,
                                                        bool reverse) {
  c10::cuda::CUDAGuard guard(a.device());
  const auto options = a.options();
  return linear_scan::fwd(a, b, initial_state, reverse, [&](const LinearScanParams& p, at::ScalarType dtype) {
    SSMK_DISPATCH_SCAN_TYPES(dtype, "linear_scan_fwd_cuda", [&] { linear_scan::launch<scalar_t, false>(p, options); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd_cuda(
    const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    const at::Tensor& dh, const std::optional<at::Tensor>& dlast_state, bool reverse) {
  c10::cuda::CUDAGuard guard(a.device());
  const auto options = a.options();
  return linear_scan::bwd(a, h, initial_state, dh, dlast_state, reverse,
                          [&](const LinearScanParams& p, at::ScalarType dtype) {
                            SSMK_DISPATCH_SCAN_TYPES(dtype, "linear_scan_bwd_cuda",
                                                     [&] { linear_scan::launch<scalar_t, true>(p, options); });
                          });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("linear_scan_fwd", &ssmk::linear_scan_fwd_cuda);
  m.impl("linear_scan_bwd", &ssmk::linear_scan_bwd_cuda);
}
