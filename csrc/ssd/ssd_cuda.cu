// CUDA implementation of ssd_scan: the shared driver (ssd.h) with CUDA stage kernels
// (ssd_fwd_kernel.cuh, ssd_bwd_kernel.cuh); the GEMMs are cuBLAS calls (tensor cores for
// float16/bfloat16 inputs). All launches on the current stream, under a device guard.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda/launch.h"
#include "ssd/ssd.h"
#include "ssd/ssd_bwd_kernel.cuh"
#include "ssd/ssd_fwd_kernel.cuh"

namespace ssmk {
namespace {

namespace k = ssd::cuda_kernels;
using ssmk::cuda::ceil_div;

#define SSMK_DISPATCH_SSD_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Grid for grid-stride elementwise kernels: enough blocks to fill the device, not one per element.
inline unsigned grid_for(int64_t total, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(total, threads), sms * 16)));
}

struct CudaStages {
  int64_t tasks(const SsdParams& p) const { return p.batch * p.nchunks * p.nheads; }
  int64_t scan_splits(const SsdParams& p) const { return ceil_div(p.headdim * p.dstate, k::kThreads); }

  void prep(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_prep_cuda", [&] {
      k::prep_kernel<scalar_t><<<ceil_div(tasks(p), 128), 128, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void build_gl(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_build_gl_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      const int64_t total = tasks(p) * p.chunk * p.chunk;
      k::build_gl_kernel<acc_t><<<grid_for(total, k::kThreads), k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  template <bool kBackward>
  void scan(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(p.batch * p.nheads), static_cast<unsigned>(scan_splits(p)));
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_scan_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      k::scan_kernel<acc_t, kBackward><<<grid, k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void scan_fwd(const SsdParams& p, at::ScalarType dtype) const { scan<false>(p, dtype); }
  void scan_bwd(const SsdParams& p, at::ScalarType dtype) const { scan<true>(p, dtype); }
  void epilogue_fwd(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_epilogue_cuda", [&] {
      const int64_t total = p.batch * p.seqlen * p.nheads * p.headdim;
      k::epilogue_kernel<scalar_t><<<grid_for(total, k::kThreads), k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void wsum(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_wsum_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      k::wsum_kernel<acc_t><<<static_cast<unsigned>(tasks(p)), k::kBwdThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void final_bwd(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_final_bwd_cuda", [&] {
      k::final_kernel<scalar_t><<<static_cast<unsigned>(tasks(p)), k::kBwdThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
};

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd_cuda(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    double dt_min, double dt_max, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ssd::fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, CudaStages{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
ssd_scan_bwd_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                  bool dt_softplus, double dt_min, double dt_max,
                  const std::optional<at::Tensor>& initial_states,
                  const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,
                  const std::optional<at::Tensor>& dfinal_states) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ssd::bwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, dout, dfinal_states, CudaStages{});
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("ssd_scan_fwd", &ssmk::ssd_scan_fwd_cuda);
  m.impl("ssd_scan_bwd", &ssmk::ssd_scan_bwd_cuda);
}
