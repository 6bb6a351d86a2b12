// CUDA launchers of ssd_scan: the stage kernels (ssd_fwd_kernel.cuh, ssd_bwd_kernel.cuh) and the
// tensor-core batched GEMM of common/cuda/batched_gemm.h: float16/bfloat16 inputs multiply in
// their own type, float32 inputs in 3xTF32 (float32 accuracy), all accumulating in float32. The
// host (ssd_cuda_host.cpp) sequences them, allocates the buffers and checks launch errors.
#include <algorithm>

#include "common/cuda/batched_gemm.h"
#include "ssd/ssd.h"
#include "ssd/ssd_bwd_kernel.cuh"
#include "ssd/ssd_fwd_kernel.cuh"

namespace ssmk {
namespace {

namespace k = ssd::cuda_kernels;

// Grid for grid-stride elementwise kernels: enough blocks to fill the device, not one per element.
unsigned grid_for(int64_t total, int threads, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, threads), int64_t(sms) * 16)));
}

template <typename T>
constexpr cuda::MmaPrecision precision_of() {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return cuda::MmaPrecision::kHalf;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return cuda::MmaPrecision::kBFloat16;
  } else {
    return cuda::MmaPrecision::kTf32x3;
  }
}

// GL[t, s] of task bi = (b * nc + c) * H + h, computed where the intra-chunk GEMMs read it:
// C_t . B_s of the head's group times the masked decay (the formula of build_gl_kernel). With
// kTransposed the GEMM's A is GL^T: A[m, k] = GL[k, m].
template <bool kTransposed>
struct GlLoad {
  const float* cb;   // [B, nc, G, Q, Q]
  const float* acs;  // [B, nc, H, Q]
  const int32_t* seg;
  int64_t nheads, heads_per_group, ngroups;
  int chunk;

  struct Matrix {
    const float* cb;     // the task's group's C B^T, [Q, Q]
    const float* acs;    // [Q]
    const int32_t* seg;  // [Q] or nullptr
    int chunk;
    __device__ __forceinline__ float operator()(int m, int k) const {
      const int t = kTransposed ? k : m, s = kTransposed ? m : k;
      const float dec = ssd::segment_decay(acs, seg, t, s);
      return dec == 0.0f ? 0.0f : cb[t * chunk + s] * dec;
    }
  };
  __device__ __forceinline__ Matrix matrix(int64_t bi) const {
    const int64_t bc = bi / nheads, h = bi % nheads;
    return {cb + (bc * ngroups + h / heads_per_group) * chunk * chunk, acs + bi * chunk,
            seg ? seg + bc * chunk : nullptr, chunk};
  }
};

}  // namespace

template <typename T>
void ssd_prep_cuda(const SsdPrepParams<T>& p, const CudaContext& ctx) {
  const auto blocks = static_cast<unsigned>(ceil_div(p.tasks(), k::kPrepThreads));
  k::prep_kernel<T><<<blocks, k::kPrepThreads, 0, ctx.stream>>>(p);
}

template <typename Acc>
void ssd_build_gl_cuda(const SsdGlParams<Acc>& p, Acc* gl, const CudaContext& ctx) {
  const int64_t total = p.tasks() * p.chunk * p.chunk;
  k::build_gl_kernel<Acc><<<grid_for(total, k::kThreads, ctx.sms), k::kThreads, 0, ctx.stream>>>(p, gl);
}

template <typename Acc>
void ssd_scan_fwd_cuda(const SsdScanParams<Acc>& p, const CudaContext& ctx) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.nheads), static_cast<unsigned>(ssd::cuda_scan_splits(p)));
  k::scan_kernel<Acc, false><<<grid, k::kThreads, 0, ctx.stream>>>(p);
}

template <typename Acc>
void ssd_scan_bwd_cuda(const SsdScanBwdParams<Acc>& p, const CudaContext& ctx) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.nheads), static_cast<unsigned>(ssd::cuda_scan_splits(p)));
  k::scan_kernel<Acc, true><<<grid, k::kThreads, 0, ctx.stream>>>(p);
}

template <typename T>
void ssd_epilogue_cuda(const SsdFwdParams<T>& p, const CudaContext& ctx) {
  const int64_t total = p.batch * p.seqlen * p.nheads * p.headdim;
  k::epilogue_kernel<T><<<grid_for(total, k::kThreads, ctx.sms), k::kThreads, 0, ctx.stream>>>(p);
}

template <typename Acc>
void ssd_wsum_cuda(const SsdWsumParams<Acc>& p, Acc* dgl, const CudaContext& ctx) {
  k::wsum_kernel<Acc><<<static_cast<unsigned>(p.tasks()), k::kBwdThreads, 0, ctx.stream>>>(p, dgl);
}

template <typename T>
void ssd_final_cuda(const SsdBwdParams<T>& p, const CudaContext& ctx) {
  k::final_kernel<T><<<static_cast<unsigned>(p.tasks()), k::kBwdThreads, 0, ctx.stream>>>(p);
}

template <typename T>
bool ssd_gemm_cuda(const cuda::BatchedGemmParams& g, const CudaContext& ctx) {
  if (!cuda::batched_gemm_fits_int32(g)) return false;
  cuda::launch_batched_gemm<precision_of<T>()>(g, ctx.sms, ctx.stream);
  return true;
}

template <typename T>
bool ssd_gl_gemm_cuda(const cuda::BatchedGemmParams& g, const SsdGlParams<float>& gl, bool transposed,
                      const CudaContext& ctx) {
  if (!cuda::batched_gemm_fits_int32(g)) return false;
  const int64_t hg = gl.nheads / gl.ngroups;
  const int q = static_cast<int>(gl.chunk);
  if (transposed) {
    const GlLoad<true> load{gl.cb, gl.acs, gl.seg, gl.nheads, hg, gl.ngroups, q};
    cuda::launch_batched_gemm<precision_of<T>()>(g, ctx.sms, ctx.stream, load);
  } else {
    const GlLoad<false> load{gl.cb, gl.acs, gl.seg, gl.nheads, hg, gl.ngroups, q};
    cuda::launch_batched_gemm<precision_of<T>()>(g, ctx.sms, ctx.stream, load);
  }
  return true;
}

#define SSMK_INSTANTIATE_T(T)                                                                       \
  template void ssd_prep_cuda<T>(const SsdPrepParams<T>&, const CudaContext&);                     \
  template void ssd_epilogue_cuda<T>(const SsdFwdParams<T>&, const CudaContext&);                  \
  template void ssd_final_cuda<T>(const SsdBwdParams<T>&, const CudaContext&);
#define SSMK_INSTANTIATE_ACC(Acc)                                                                  \
  template void ssd_build_gl_cuda<Acc>(const SsdGlParams<Acc>&, Acc*, const CudaContext&);         \
  template void ssd_scan_fwd_cuda<Acc>(const SsdScanParams<Acc>&, const CudaContext&);             \
  template void ssd_scan_bwd_cuda<Acc>(const SsdScanBwdParams<Acc>&, const CudaContext&);          \
  template void ssd_wsum_cuda<Acc>(const SsdWsumParams<Acc>&, Acc*, const CudaContext&);
#define SSMK_INSTANTIATE_GEMM(T)                                                                   \
  template bool ssd_gemm_cuda<T>(const cuda::BatchedGemmParams&, const CudaContext&);              \
  template bool ssd_gl_gemm_cuda<T>(const cuda::BatchedGemmParams&, const SsdGlParams<float>&, bool, \
                                    const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE_T)
SSMK_INSTANTIATE_ACC(float)
SSMK_INSTANTIATE_ACC(double)
SSMK_INSTANTIATE_GEMM(float)
SSMK_INSTANTIATE_GEMM(c10::Half)
SSMK_INSTANTIATE_GEMM(c10::BFloat16)
#undef SSMK_INSTANTIATE_T
#undef SSMK_INSTANTIATE_ACC
#undef SSMK_INSTANTIATE_GEMM

}  // namespace ssmk
