// CUDA launchers of the S4 Cauchy product (kernels in cauchy_kernel.cuh). One-dimensional grids,
// sized by the host (cauchy_op.cpp checks they fit).
#include "cauchy/cauchy.h"
#include "cauchy/cauchy_kernel.cuh"

namespace ssmk {

template <typename T>
void cauchy_fwd_cuda(const CauchyFwdParams<T>& p, const CudaContext& ctx) {
  using Traits = cauchy::KernelTraits<T>;
  const auto grid = static_cast<unsigned>((p.L + cauchy::kTileL - 1) / cauchy::kTileL * p.batch);
  if (p.symmetric) {
    cauchy::cauchy_fwd_kernel<Traits, true><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
  } else {
    cauchy::cauchy_fwd_kernel<Traits, false><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
  }
}

template <typename T>
void cauchy_bwd_cuda(const CauchyBwdParams<T>& p, double* partials, const CudaContext& ctx) {
  using Traits = cauchy::KernelTraits<T>;
  const auto grid = static_cast<unsigned>(p.num_chunks * ((p.N + Traits::kThreads - 1) / Traits::kThreads) * p.batch);
  if (p.symmetric) {
    cauchy::cauchy_bwd_kernel<Traits, true><<<grid, Traits::kThreads, 0, ctx.stream>>>(p, partials);
  } else {
    cauchy::cauchy_bwd_kernel<Traits, false><<<grid, Traits::kThreads, 0, ctx.stream>>>(p, partials);
  }
  constexpr int kReduceThreads = 256;
  const auto blocks = static_cast<unsigned>((p.batch * p.N + kReduceThreads - 1) / kReduceThreads);
  cauchy::cauchy_bwd_reduce_kernel<Traits><<<blocks, kReduceThreads, 0, ctx.stream>>>(p, partials);
}

template void cauchy_fwd_cuda<float>(const CauchyFwdParams<float>&, const CudaContext&);
template void cauchy_fwd_cuda<double>(const CauchyFwdParams<double>&, const CudaContext&);
template void cauchy_bwd_cuda<float>(const CauchyBwdParams<float>&, double*, const CudaContext&);
template void cauchy_bwd_cuda<double>(const CauchyBwdParams<double>&, double*, const CudaContext&);

}  // namespace ssmk
