// CUDA launchers of causal_conv1d (kernels in causal_conv1d_{fwd,bwd}_kernel.cuh; host side in
// causal_conv1d_op.cpp, which also checks the grid sizes). Launch errors are checked by the host.
#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_bwd_kernel.cuh"
#include "causal_conv1d/causal_conv1d_fwd_kernel.cuh"

namespace ssmk {

template <typename T>
void causal_conv1d_fwd_cuda(const CausalConv1dFwdParams<T>& p, const CudaContext& ctx) {
  using causal_conv1d::FwdTraits;
  const int64_t blocks = p.batch * p.dim * causal_conv1d::num_chunks(p.seqlen);
  if (blocks == 0) return;
  causal_conv1d::causal_conv1d_fwd_kernel<T>
      <<<static_cast<unsigned>(blocks), FwdTraits::kThreads, 0, ctx.stream>>>(p);
}

// `partials`: the workspace [D, B * n_chunks, kBwdPartials] (causal_conv1d.h).
template <typename T>
void causal_conv1d_bwd_cuda(const CausalConv1dBwdParams<T>& p, acc_t<T>* partials, const CudaContext& ctx) {
  using causal_conv1d::BwdTraits;
  const int64_t nchunks = causal_conv1d::num_chunks(p.seqlen);
  const int64_t blocks = p.batch * p.dim * nchunks;
  if (blocks == 0) return;
  causal_conv1d::causal_conv1d_bwd_kernel<T>
      <<<static_cast<unsigned>(blocks), BwdTraits::kThreads, 0, ctx.stream>>>(p, partials);
  causal_conv1d::causal_conv1d_bwd_reduce_kernel<acc_t<T>>
      <<<static_cast<unsigned>(p.dim), BwdTraits::kThreads, 0, ctx.stream>>>(
          partials, p.batch * nchunks, static_cast<int>(p.width), p.dweight, p.dbias);
}

template <typename T, typename S>
void causal_conv1d_update_cuda(const CausalConv1dUpdateParams<T, S>& p, const CudaContext& ctx) {
  constexpr int kThreads = 128;
  const int64_t blocks = (p.batch * p.dim + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  causal_conv1d::causal_conv1d_update_kernel<T, S><<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream>>>(p);
}

#define SSMK_INSTANTIATE_UPDATE(T, S) \
  template void causal_conv1d_update_cuda<T, S>(const CausalConv1dUpdateParams<T, S>&, const CudaContext&);
#define SSMK_INSTANTIATE(T)                                                                          \
  template void causal_conv1d_fwd_cuda<T>(const CausalConv1dFwdParams<T>&, const CudaContext&);      \
  template void causal_conv1d_bwd_cuda<T>(const CausalConv1dBwdParams<T>&, acc_t<T>*, const CudaContext&); \
  SSMK_FLOAT_TYPES_WITH(SSMK_INSTANTIATE_UPDATE, T)
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE
#undef SSMK_INSTANTIATE_UPDATE

}  // namespace ssmk
