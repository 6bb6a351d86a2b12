// CUDA launchers of selective_scan and selective_state_update (kernels in the .cuh files; host
// side in selective_scan_op.cpp, which checks the launches).
#include "selective_scan/selective_scan.h"
#include "selective_scan/selective_scan_bwd_kernel.cuh"
#include "selective_scan/selective_scan_fwd_kernel.cuh"
#include "selective_scan/selective_scan_update_kernel.cuh"

namespace ssmk {

// Grid x: channels (forward) or channel slices (backward); grid y: the batch.
template <typename T, bool kComplex>
void selective_scan_fwd_cuda(const SelectiveScanFwdParams<T, kComplex>& p, const CudaContext& ctx) {
  using Traits = selective_scan::ScanTraits<256, 8, T, kComplex>;
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  selective_scan::selective_scan_fwd_kernel<Traits><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
}

template <typename T, bool kComplex>
void selective_scan_bwd_cuda(const SelectiveScanBwdParams<T, kComplex>& p, const CudaContext& ctx) {
  using Traits = selective_scan::ScanTraits<256, 8, T, kComplex>;
  const dim3 grid(static_cast<unsigned>(p.n_slices), static_cast<unsigned>(p.batch));
  selective_scan::selective_scan_bwd_kernel<Traits><<<grid, Traits::kThreads, 0, ctx.stream>>>(p);
}

template <typename T>
void selective_state_update_cuda(const SelectiveStateUpdateParams<T>& p, const CudaContext& ctx) {
  constexpr int64_t kWarps = selective_scan::kUpdateWarps;
  const int64_t rows = p.batch * p.nheads * p.headdim;
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  selective_scan::selective_state_update_kernel<T><<<blocks, kWarps * 32, 0, ctx.stream>>>(p);
}

#define SSMK_INSTANTIATE_SCAN(T, C)                                                                            \
  template void selective_scan_fwd_cuda<T, C>(const SelectiveScanFwdParams<T, C>&, const CudaContext&); \
  template void selective_scan_bwd_cuda<T, C>(const SelectiveScanBwdParams<T, C>&, const CudaContext&);
#define SSMK_INSTANTIATE(T)       \
  SSMK_INSTANTIATE_SCAN(T, false) \
  SSMK_INSTANTIATE_SCAN(T, true)  \
  template void selective_state_update_cuda<T>(const SelectiveStateUpdateParams<T>&, const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE
#undef SSMK_INSTANTIATE_SCAN

}  // namespace ssmk
