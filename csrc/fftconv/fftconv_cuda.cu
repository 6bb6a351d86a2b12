// CUDA launchers of fftconv (kernels in fftconv_{fwd,bwd,fused}_kernel.cuh; the host driver that
// picks the path, allocates the workspaces and runs cuFFT is fftconv_cuda_host.cpp). Launch
// errors are checked by the host.
#include "fftconv/fftconv.h"
#include "fftconv/fftconv_bwd_kernel.cuh"
#include "fftconv/fftconv_fused_kernel.cuh"
#include "fftconv/fftconv_fwd_kernel.cuh"

namespace ssmk::fftconv::cuda_launch {

int64_t fused_smem_bytes(int64_t n) { return fftconv::fused_smem_bytes(n); }
int64_t fused_bwd_smem_bytes(int64_t n) { return fftconv::fused_bwd_smem_bytes(n); }
int64_t min_fused_size() { return 2 * fft::kMinSize; }
int64_t max_fused_bwd_size() { return kFusedBwdMaxN; }
int64_t grad_pre_chunks(int64_t n) { return ceil_div(n, int64_t(kThreads) * kPerThread); }
int64_t fused_table_size(int64_t n) { return fft::table_size(n / 2); }

template <typename T>
void load_v(const FftconvCommon<T>& p, int64_t d0, int64_t rows, acc_t<T>* vbuf, const CudaContext& ctx) {
  fftconv_load_v_kernel<T><<<grid_for(rows * p.fft_size), kThreads, 0, ctx.stream>>>(p, RowMap{p.batch, d0}, rows,
                                                                                      vbuf);
}

template <typename T>
void mul_spectrum(const FftconvCommon<T>& p, int64_t d0, int64_t rows, bool conj, const acc_t<T>* src, acc_t<T>* dst,
                  const CudaContext& ctx) {
  const RowMap m{p.batch, d0};
  if (conj) {
    fftconv_mul_spectrum_kernel<T, true><<<grid_for(rows * p.nfreq), kThreads, 0, ctx.stream>>>(p, m, rows, src, dst);
  } else {
    fftconv_mul_spectrum_kernel<T, false><<<grid_for(rows * p.nfreq), kThreads, 0, ctx.stream>>>(p, m, rows, src, dst);
  }
}

template <typename T>
void epilogue(const FftconvFwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* c, const CudaContext& ctx) {
  fftconv_epilogue_kernel<T><<<grid_for(rows * p.seqlen), kThreads, 0, ctx.stream>>>(p, RowMap{p.batch, d0}, rows, c);
}

template <typename T>
void grad_pre(const FftconvBwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* c, acc_t<T>* gbuf,
              acc_t<T>* partial, const CudaContext& ctx) {
  const int64_t chunks = grad_pre_chunks(p.fft_size);
  fftconv_grad_pre_kernel<T><<<static_cast<unsigned>(rows * chunks), kThreads, 0, ctx.stream>>>(
      p, RowMap{p.batch, d0}, rows, chunks, c, gbuf, partial);
}

template <typename T>
void dkf(const FftconvBwdParams<T>& p, int64_t d0, int64_t nch, const acc_t<T>* G, const acc_t<T>* V,
         const CudaContext& ctx) {
  fftconv_dkf_kernel<T><<<grid_for(nch * p.nfreq), kThreads, 0, ctx.stream>>>(p, d0, nch, G, V);
}

template <typename T>
void grad_input(const FftconvBwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* conv, const acc_t<T>* gbuf,
                const CudaContext& ctx) {
  fftconv_grad_input_kernel<T><<<grid_for(rows * p.seqlen), kThreads, 0, ctx.stream>>>(p, RowMap{p.batch, d0}, rows,
                                                                                       conv, gbuf);
}

// A failed attribute call leaves its error for the host's check, and the launch then fails too.
template <typename T>
void fused_tables(const FftconvCommon<T>& p, float* tw, float* hs, const CudaContext& ctx) {
  const int64_t n = p.fft_size, m = n / 2, size = fft::table_size(m);
  fftconv_twiddle_kernel<float><<<grid_for(size), 256, 0, ctx.stream>>>(m, tw);
  const int smem = static_cast<int>(fftconv::fused_smem_bytes(n));
  auto* spectrum = &fftconv_fused_spectrum_kernel<T>;
  cudaFuncSetAttribute(spectrum, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  spectrum<<<static_cast<unsigned>(p.dim), kFusedThreads, smem, ctx.stream>>>(p, tw, hs);
}

template <typename T>
void fused_fwd(const FftconvFwdParams<T>& p, const float* tw, const float* hs, const CudaContext& ctx) {
  const int smem = static_cast<int>(fftconv::fused_smem_bytes(p.fft_size));
  auto* fwd = &fftconv_fused_fwd_kernel<T>;
  cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  fwd<<<static_cast<unsigned>(p.batch * p.dim), kFusedThreads, smem, ctx.stream>>>(p, tw, hs);
}

template <typename T>
void fused_bwd(const FftconvBwdParams<T>& p, const float* tw, const float* hs, const CudaContext& ctx) {
  const int smem = static_cast<int>(fftconv::fused_bwd_smem_bytes(p.fft_size));
  auto* bwd = &fftconv_fused_bwd_kernel<T>;
  cudaFuncSetAttribute(bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  bwd<<<static_cast<unsigned>(p.dim), kFusedThreads, smem, ctx.stream>>>(p, tw, hs);
}

#define SSMK_INSTANTIATE(T)                                                                                    \
  template void load_v<T>(const FftconvCommon<T>&, int64_t, int64_t, acc_t<T>*, const CudaContext&);           \
  template void mul_spectrum<T>(const FftconvCommon<T>&, int64_t, int64_t, bool, const acc_t<T>*, acc_t<T>*,   \
                                const CudaContext&);                                                           \
  template void epilogue<T>(const FftconvFwdParams<T>&, int64_t, int64_t, const acc_t<T>*, const CudaContext&); \
  template void grad_pre<T>(const FftconvBwdParams<T>&, int64_t, int64_t, const acc_t<T>*, acc_t<T>*,          \
                            acc_t<T>*, const CudaContext&);                                                    \
  template void dkf<T>(const FftconvBwdParams<T>&, int64_t, int64_t, const acc_t<T>*, const acc_t<T>*,         \
                       const CudaContext&);                                                                    \
  template void grad_input<T>(const FftconvBwdParams<T>&, int64_t, int64_t, const acc_t<T>*, const acc_t<T>*,  \
                              const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

// The fused path computes in float: no float64 instantiation.
#define SSMK_INSTANTIATE_FUSED(T)                                                                         \
  template void fused_tables<T>(const FftconvCommon<T>&, float*, float*, const CudaContext&);              \
  template void fused_fwd<T>(const FftconvFwdParams<T>&, const float*, const float*, const CudaContext&); \
  template void fused_bwd<T>(const FftconvBwdParams<T>&, const float*, const float*, const CudaContext&);
SSMK_INSTANTIATE_FUSED(float)
SSMK_INSTANTIATE_FUSED(c10::Half)
SSMK_INSTANTIATE_FUSED(c10::BFloat16)
#undef SSMK_INSTANTIATE_FUSED

}  // namespace ssmk::fftconv::cuda_launch
