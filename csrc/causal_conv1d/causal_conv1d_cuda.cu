// CUDA entry points of causal_conv1d: the shared host driver (causal_conv1d.h) with CUDA launchers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_bwd_kernel.cuh"
#include "causal_conv1d/causal_conv1d_fwd_kernel.cuh"

namespace ssmk {
namespace {

#define SSMK_DISPATCH_CONV_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& initial_states,
                                                          const std::optional<at::Tensor>& seq_idx, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d::fwd(x, weight, bias, initial_states, seq_idx, silu,
                            [](const CausalConv1dParams& p, at::ScalarType dtype) {
                              const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
                              SSMK_DISPATCH_CONV_TYPES(dtype, "causal_conv1d_fwd_cuda",
                                                       [&] { causal_conv1d::launch_fwd<scalar_t>(p, stream); });
                            });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx,
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d::bwd(
      x, weight, bias, initial_states, seq_idx, dout, dfinal_states, silu,
      [&](const CausalConv1dParams& p, at::ScalarType dtype) {
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        const int64_t nchunks = (p.seqlen + causal_conv1d::kChunkSize - 1) / causal_conv1d::kChunkSize;
        const at::Tensor partials = at::empty({p.dim, p.batch * nchunks, causal_conv1d::BwdTraits::kPartials},
                                              x.options().dtype(causal_conv1d::acc_dtype(x)));
        SSMK_DISPATCH_CONV_TYPES(dtype, "causal_conv1d_bwd_cuda", [&] {
          causal_conv1d::launch_bwd<scalar_t>(p, partials.data_ptr<acc_type<scalar_t>>(), stream);
        });
      });
}

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& conv_state_indices, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d::update(
      x, conv_state, weight, bias, conv_state_indices, silu,
      [](const CausalConv1dUpdateParams& p, at::ScalarType x_dtype, at::ScalarType state_dtype) {
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        SSMK_DISPATCH_CONV_TYPES(x_dtype, "causal_conv1d_update_cuda", [&] {
          using input_t = scalar_t;
          SSMK_DISPATCH_CONV_TYPES(state_dtype, "causal_conv1d_update_cuda",
                                   [&] { causal_conv1d::launch_update<input_t, scalar_t>(p, stream); });
        });
      });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("causal_conv1d_fwd", &ssmk::causal_conv1d_fwd_cuda);
  m.impl("causal_conv1d_bwd", &ssmk::causal_conv1d_bwd_cuda);
  m.impl("causal_conv1d_update", &ssmk::causal_conv1d_update_cuda);
}
