// CUDA host functions of the (log-)Vandermonde products: the shared driver of vandermonde.h with
// the launchers of vandermonde_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "vandermonde/vandermonde.h"
#include "vandermonde/vandermonde_kernel.cuh"

namespace ssmk {
namespace {

struct LaunchFwd {
  void operator()(const VandermondeParams& p, at::ScalarType dtype) const {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (dtype == at::kComplexDouble) {
      vandermonde::launch_fwd<double>(p, stream);
    } else {
      vandermonde::launch_fwd<float>(p, stream);
    }
  }
};

struct LaunchT {
  at::Device device;
  void operator()(const VandermondeParams& p, at::ScalarType dtype) const {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor partials = at::empty({p.batch, p.num_tiles, p.N, 4},
                                    at::TensorOptions().dtype(at::kDouble).device(device));
    VandermondeParams q = p;
    q.partials = partials.data_ptr<double>();
    if (dtype == at::kComplexDouble) {
      vandermonde::launch_t<double>(q, stream);
    } else {
      vandermonde::launch_t<float>(q, stream);
    }
  }
};

at::Tensor log_vandermonde_fwd_cuda(const at::Tensor& v, const at::Tensor& x, int64_t L, bool symmetric) {
  const c10::cuda::CUDAGuard guard(v.device());
  return vandermonde::log_vandermonde_fwd(v, x, L, symmetric, LaunchFwd{});
}

std::tuple<at::Tensor, at::Tensor> log_vandermonde_bwd_cuda(const at::Tensor& v, const at::Tensor& x,
                                                            int64_t L, const at::Tensor& dout,
                                                            bool symmetric) {
  const c10::cuda::CUDAGuard guard(v.device());
  return vandermonde::log_vandermonde_bwd(v, x, L, dout, symmetric, LaunchT{v.device()});
}

at::Tensor log_vandermonde_transpose_fwd_cuda(const at::Tensor& u, const at::Tensor& v,
                                              const at::Tensor& x, int64_t L) {
  const c10::cuda::CUDAGuard guard(v.device());
  return vandermonde::log_vandermonde_transpose_fwd(u, v, x, L, LaunchT{v.device()});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_vandermonde_transpose_bwd_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& x, int64_t L, const at::Tensor& dout) {
  const c10::cuda::CUDAGuard guard(v.device());
  return vandermonde::log_vandermonde_transpose_bwd(u, v, x, L, dout, LaunchFwd{}, LaunchT{v.device()});
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("log_vandermonde_fwd", &ssmk::log_vandermonde_fwd_cuda);
  m.impl("log_vandermonde_bwd", &ssmk::log_vandermonde_bwd_cuda);
  m.impl("log_vandermonde_transpose_fwd", &ssmk::log_vandermonde_transpose_fwd_cuda);
  m.impl("log_vandermonde_transpose_bwd", &ssmk::log_vandermonde_transpose_bwd_cuda);
}
