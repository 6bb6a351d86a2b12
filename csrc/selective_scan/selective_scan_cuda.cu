// CUDA host functions of the selective scan: the shared drivers of selective_scan.h with CUDA
// launchers (device guard, current stream, checked launches, no host-device sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/static_switch.h"
#include "selective_scan/selective_scan.h"
#include "selective_scan/selective_scan_bwd_kernel.cuh"
#include "selective_scan/selective_scan_fwd_kernel.cuh"
#include "selective_scan/selective_scan_update_kernel.cuh"

namespace ssmk {
namespace {

#define SSMK_DISPATCH_SCAN_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The grid's y dimension is the batch.
void check_grid(int64_t batch) {
  SSMK_CHECK_VALUE(batch <= 65535, "u: expected batch <= 65535 on CUDA, got ", batch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(u.device());
  return selective_scan::fwd(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
      [&](const SelectiveScanParams& p, const selective_scan::Prepared&, at::ScalarType dtype) {
        check_grid(p.batch);
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_scan_fwd_cuda", [&] {
          SSMK_BOOL_SWITCH(p.is_complex, kComplex, [&] { selective_scan::launch_fwd<scalar_t, kComplex>(p, stream); });
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                        bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                        const at::Tensor& checkpoints, const at::Tensor& dout,
                        const std::optional<at::Tensor>& dlast_state) {
  const c10::cuda::CUDAGuard guard(u.device());
  // About a thousand blocks fill any current GPU several times over while bounding the
  // variable-B/C partials at ~1000 x N x L values (a function of the shapes only, so the
  // summation order is fixed).
  const SelectiveScanDeviceConfig config{1024, false};
  return selective_scan::bwd(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints, dout, dlast_state,
      config, [&](const SelectiveScanParams& p, const selective_scan::Prepared&, at::ScalarType dtype) {
        check_grid(p.batch);
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_scan_bwd_cuda", [&] {
          SSMK_BOOL_SWITCH(p.is_complex, kComplex, [&] { selective_scan::launch_bwd<scalar_t, kComplex>(p, stream); });
        });
      });
}

at::Tensor selective_state_update_cuda(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                       const std::optional<at::Tensor>& state_batch_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  return selective_scan::update(
      state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
      [](const SelectiveStateUpdateParams& p, at::ScalarType dtype) {
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_state_update_cuda",
                                 [&] { selective_scan::launch_update<scalar_t>(p, stream); });
      });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("selective_scan_fwd", &ssmk::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &ssmk::selective_scan_bwd_cuda);
  m.impl("selective_state_update", &ssmk::selective_state_update_cuda);
}
