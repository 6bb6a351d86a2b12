// CUDA launchers of the (log-)Vandermonde products (kernels in vandermonde_kernel.cuh).
// One-dimensional grids, sized by the host (vandermonde_op.cpp checks they fit).
#include "vandermonde/vandermonde.h"
#include "vandermonde/vandermonde_kernel.cuh"

namespace ssmk {

template <typename T>
void vandermonde_fwd_cuda(const VandermondeFwdParams<T>& p, const CudaContext& ctx) {
  using Traits = vandermonde::KernelTraits<T>;
  const auto grid = static_cast<unsigned>(p.num_tiles * p.batch);
  if (p.symmetric) {
    vandermonde::vand_fwd_kernel<Traits, true><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
  } else {
    vandermonde::vand_fwd_kernel<Traits, false><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
  }
}

template <typename T>
void vandermonde_transpose_cuda(const VandermondeTransposeParams<T>& p, double* partials,
                                const CudaContext& ctx) {
  using Traits = vandermonde::KernelTraits<T>;
  const auto grid = static_cast<unsigned>(p.num_tiles * ((p.N + Traits::kGroup - 1) / Traits::kGroup) * p.batch);
  if (p.with_t1) {
    vandermonde::vand_t_kernel<Traits, true><<<grid, Traits::kThreads, 0, ctx.stream>>>(p, partials);
  } else {
    vandermonde::vand_t_kernel<Traits, false><<<grid, Traits::kThreads, 0, ctx.stream>>>(p, partials);
  }
  constexpr int kReduceThreads = 256;
  const auto blocks = static_cast<unsigned>((p.batch * p.N + kReduceThreads - 1) / kReduceThreads);
  vandermonde::vand_t_reduce_kernel<Traits><<<blocks, kReduceThreads, 0, ctx.stream>>>(p, partials);
}

template void vandermonde_fwd_cuda<float>(const VandermondeFwdParams<float>&, const CudaContext&);
template void vandermonde_fwd_cuda<double>(const VandermondeFwdParams<double>&, const CudaContext&);
template void vandermonde_transpose_cuda<float>(const VandermondeTransposeParams<float>&, double*,
                                                const CudaContext&);
template void vandermonde_transpose_cuda<double>(const VandermondeTransposeParams<double>&, double*,
                                                 const CudaContext&);

}  // namespace ssmk
