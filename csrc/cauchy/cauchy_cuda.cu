// CUDA host functions of the S4 Cauchy product: the shared driver of cauchy.h with the launchers
// of cauchy_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cauchy/cauchy.h"
#include "cauchy/cauchy_kernel.cuh"

namespace ssmk {
namespace {

at::Tensor cauchy_fwd_cuda(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w,
                           bool symmetric) {
  const c10::cuda::CUDAGuard guard(v.device());
  return cauchy::fwd(v, z, w, symmetric, [](const CauchyParams& p, at::ScalarType dtype) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (dtype == at::kComplexDouble) {
      cauchy::launch_fwd<double>(p, stream);
    } else {
      cauchy::launch_fwd<float>(p, stream);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cauchy_bwd_cuda(const at::Tensor& v, const at::Tensor& z,
                                                   const at::Tensor& w, const at::Tensor& dout,
                                                   bool symmetric) {
  const c10::cuda::CUDAGuard guard(v.device());
  const auto device = v.device();
  return cauchy::bwd(v, z, w, dout, symmetric, [device](const CauchyParams& p, at::ScalarType dtype) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor partials = at::empty({p.batch, p.num_chunks, p.N, 8},
                                    at::TensorOptions().dtype(at::kDouble).device(device));
    CauchyParams q = p;
    q.partials = partials.data_ptr<double>();
    if (dtype == at::kComplexDouble) {
      cauchy::launch_bwd<double>(q, stream);
    } else {
      cauchy::launch_bwd<float>(q, stream);
    }
  });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("cauchy_fwd", &ssmk::cauchy_fwd_cuda);
  m.impl("cauchy_bwd", &ssmk::cauchy_bwd_cuda);
}
