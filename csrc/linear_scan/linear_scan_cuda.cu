// CUDA launchers of linear_scan (kernels in linear_scan_kernel.cuh; host side in
// linear_scan_op.cpp). One block per (row, chunk); launch errors are checked by the host.
#include "linear_scan/linear_scan.h"
#include "linear_scan/linear_scan_kernel.cuh"

namespace ssmk {

template <typename T>
void linear_scan_fwd_cuda(const LinearScanFwdParams<T>& p, int* workspace, const CudaContext& ctx) {
  const auto chain = linear_scan::chunk_chain<acc_t<T>>(p.rows, p.seqlen, workspace);
  const auto blocks = static_cast<unsigned int>(p.rows * chain.chunks);
  linear_scan::linear_scan_fwd_kernel<T><<<blocks, linear_scan::kThreads, 0, ctx.stream>>>(p, chain);
}

template <typename T>
void linear_scan_bwd_cuda(const LinearScanBwdParams<T>& p, int* workspace, const CudaContext& ctx) {
  const auto chain = linear_scan::chunk_chain<acc_t<T>>(p.rows, p.seqlen, workspace);
  const auto blocks = static_cast<unsigned int>(p.rows * chain.chunks);
  linear_scan::linear_scan_bwd_kernel<T><<<blocks, linear_scan::kThreads, 0, ctx.stream>>>(p, chain);
}

#define SSMK_INSTANTIATE(T)                                                                        \
  template void linear_scan_fwd_cuda<T>(const LinearScanFwdParams<T>&, int*, const CudaContext&); \
  template void linear_scan_bwd_cuda<T>(const LinearScanBwdParams<T>&, int*, const CudaContext&);
SSMK_FLOAT_AND_COMPLEX_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
