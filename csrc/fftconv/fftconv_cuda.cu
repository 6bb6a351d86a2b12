// CUDA host side of fftconv: the shared driver (fftconv.h) with two forward paths: the fused
// single kernel (fftconv_fused_kernel.cuh) for power-of-two lengths whose row fits in the
// device's opt-in shared memory, and the multi-pass launcher for the rest and the backward. Each
// block of channels runs: load (gate, pad) -> cuFFT rfft (through ATen) -> spectrum product ->
// cuFFT irfft -> fused epilogue; the backward adds the gradient pointwise stage, one more
// transform pair and the fixed-order batch reduction of dH. The kernel spectrum H and the map of
// dH back onto the taps are computed by the driver with ATen's (cuFFT) transforms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "fftconv/fftconv.h"
#include "fftconv/fftconv_bwd_kernel.cuh"
#include "fftconv/fftconv_fused_kernel.cuh"
#include "fftconv/fftconv_fwd_kernel.cuh"

namespace ssmk {
namespace {

using fftconv::grid_for;
using fftconv::kThreads;
using fftconv::RowMap;

// Elements of one real workspace per channel block (2^27 floats = 512 MiB): bounds the memory of
// very long sequences at large batch x dim while keeping launches large.
constexpr int64_t kMaxBlockElems = int64_t(1) << 27;

int64_t channels_per_block(const FftconvParams& p) {
  return std::max<int64_t>(1, kMaxBlockElems / (p.batch * p.fft_size));
}

template <typename acc_t>
acc_t* cplx_ptr(const at::Tensor& t) {
  return reinterpret_cast<acc_t*>(t.data_ptr());
}

template <typename input_t>
void fwd_launch(const FftconvParams& p, const at::TensorOptions& opts) {
  using acc_t = acc_type<input_t>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto ropt = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t n = p.fft_size, chans = channels_per_block(p);
  for (int64_t d0 = 0; d0 < p.dim; d0 += chans) {
    const int64_t nch = std::min(chans, p.dim - d0), rows = nch * p.batch;
    const RowMap m{p.batch, d0};
    at::Tensor vbuf = at::empty({rows, n}, ropt);  // [rows, n]
    fftconv::fftconv_load_v_kernel<input_t><<<grid_for(rows * n), kThreads, 0, stream>>>(p, m, rows, vbuf.data_ptr<acc_t>());
    SSMK_CUDA_CHECK_LAUNCH();
    at::Tensor V = at::_fft_r2c(vbuf, {1}, /*normalization=none*/ 0, /*onesided=*/true);  // [rows, F]
    fftconv::fftconv_mul_spectrum_kernel<acc_t, false><<<grid_for(rows * p.nfreq), kThreads, 0, stream>>>(
        p, m, rows, cplx_ptr<acc_t>(V), cplx_ptr<acc_t>(V));
    SSMK_CUDA_CHECK_LAUNCH();
    at::Tensor c = at::_fft_c2r(V, {1}, /*normalization=by_n*/ 2, n);  // [rows, n]
    fftconv::fftconv_epilogue_kernel<input_t><<<grid_for(rows * p.seqlen), kThreads, 0, stream>>>(
        p, m, rows, c.data_ptr<acc_t>());
    SSMK_CUDA_CHECK_LAUNCH();
  }
}

template <typename input_t>
void bwd_launch(const FftconvParams& p, const at::TensorOptions& opts) {
  using acc_t = acc_type<input_t>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto ropt = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t n = p.fft_size, chans = channels_per_block(p);
  const bool need_c = p.activation != fftconv::kActNone || p.postgate;
  const int64_t chunks = cuda::ceil_div(n, int64_t(kThreads) * fftconv::kPerThread);
  for (int64_t d0 = 0; d0 < p.dim; d0 += chans) {
    const int64_t nch = std::min(chans, p.dim - d0), rows = nch * p.batch;
    const RowMap m{p.batch, d0};
    at::Tensor vbuf = at::empty({rows, n}, ropt);  // [rows, n]: v, then c, then the du convolution
    fftconv::fftconv_load_v_kernel<input_t><<<grid_for(rows * n), kThreads, 0, stream>>>(p, m, rows, vbuf.data_ptr<acc_t>());
    SSMK_CUDA_CHECK_LAUNCH();
    const at::Tensor V = at::_fft_r2c(vbuf, {1}, 0, true);  // [rows, F]
    at::Tensor c = vbuf;
    if (need_c) {
      at::Tensor VH = at::empty_like(V);
      fftconv::fftconv_mul_spectrum_kernel<acc_t, false><<<grid_for(rows * p.nfreq), kThreads, 0, stream>>>(
          p, m, rows, cplx_ptr<acc_t>(V), cplx_ptr<acc_t>(VH));
      SSMK_CUDA_CHECK_LAUNCH();
      c = at::_fft_c2r(VH, {1}, 2, n);
    }
    at::Tensor gbuf = at::empty({rows, n}, ropt);                  // [rows, n]: gpre, zero-padded
    at::Tensor partial = at::empty({nch, p.batch * chunks}, ropt);  // per (row, chunk) sums for dD
    TORCH_CHECK(rows * chunks <= int64_t(INT32_MAX), "fftconv: too many rows for one launch");
    fftconv::fftconv_grad_pre_kernel<input_t><<<static_cast<unsigned>(rows * chunks), kThreads, 0, stream>>>(
        p, m, rows, chunks, c.data_ptr<acc_t>(), gbuf.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
    SSMK_CUDA_CHECK_LAUNCH();
    if (p.dD) {
      at::Tensor dD = at::from_blob(static_cast<acc_t*>(p.dD) + d0, {nch}, ropt);
      at::sum_out(dD, partial, {1});
    }
    at::Tensor G = at::_fft_r2c(gbuf, {1}, 0, true);  // [rows, F]
    fftconv::fftconv_dkf_kernel<acc_t><<<grid_for(nch * p.nfreq), kThreads, 0, stream>>>(
        p, d0, nch, cplx_ptr<acc_t>(G), cplx_ptr<acc_t>(V));
    SSMK_CUDA_CHECK_LAUNCH();
    fftconv::fftconv_mul_spectrum_kernel<acc_t, true><<<grid_for(rows * p.nfreq), kThreads, 0, stream>>>(
        p, m, rows, cplx_ptr<acc_t>(G), cplx_ptr<acc_t>(G));
    SSMK_CUDA_CHECK_LAUNCH();
    const at::Tensor conv = at::_fft_c2r(G, {1}, 2, n);  // [rows, n]
    fftconv::fftconv_grad_input_kernel<input_t><<<grid_for(rows * p.seqlen), kThreads, 0, stream>>>(
        p, m, rows, conv.data_ptr<acc_t>(), gbuf.data_ptr<acc_t>());
    SSMK_CUDA_CHECK_LAUNCH();
  }
}

#define SSMK_DISPATCH_FFTCONV_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

int64_t max_fused_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// The forward's FFT length, chosen here only: the next power of two (>= 2 * fft::kMinSize) when
// its fused kernel fits in shared memory (the fused path moves only the compulsory bytes, worth a
// longer transform), else the smallest 2^a 3^b 5^c length for the multi-pass path.
int64_t cuda_fwd_fft_size(int64_t m) {
  const int64_t p2 = std::max<int64_t>(2 * fftconv::fft::kMinSize, fftconv::next_pow2(m));
  return fftconv::fused_smem_bytes(p2) <= max_fused_smem() ? p2 : fftconv::fft_size(m);
}
bool fused_path(int64_t n) {
  return n >= 2 * fftconv::fft::kMinSize && (n & (n - 1)) == 0 && fftconv::fused_smem_bytes(n) <= max_fused_smem();
}

// The backward's FFT length: the fused backward holds a row's gpre in registers, so it runs up to
// kFusedBwdMaxN (and when its shared memory fits).
bool fused_bwd_path(int64_t n) {
  return n >= 2 * fftconv::fft::kMinSize && (n & (n - 1)) == 0 && n <= fftconv::kFusedBwdMaxN &&
         fftconv::fused_bwd_smem_bytes(n) <= max_fused_smem();
}
int64_t cuda_bwd_fft_size(int64_t m) {
  const int64_t p2 = std::max<int64_t>(2 * fftconv::fft::kMinSize, fftconv::next_pow2(m));
  return fused_bwd_path(p2) ? p2 : fftconv::fft_size(m);
}

// Twiddle table [2 * table_size] and kernel spectra hs [D, 2, m + 1] for the fused kernels.
std::pair<at::Tensor, at::Tensor> fused_tables(const FftconvParams& p, const at::TensorOptions& opts) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = p.fft_size, m = n / 2, size = fftconv::fft::table_size(m);
  const auto fopt = opts.dtype(at::kFloat);
  at::Tensor tw = at::empty({2 * size}, fopt);
  fftconv::fftconv_twiddle_kernel<float><<<grid_for(size), 256, 0, stream>>>(m, tw.data_ptr<float>());
  SSMK_CUDA_CHECK_LAUNCH();
  const int smem = static_cast<int>(fftconv::fused_smem_bytes(n));
  at::Tensor hs = at::empty({p.dim, 2, m + 1}, fopt);  // [D, 2, F]: H / (2n), re then im
  auto* spectrum = &fftconv::fftconv_fused_spectrum_kernel<float>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(spectrum, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  TORCH_CHECK(p.batch * p.dim <= int64_t(INT32_MAX), "fftconv: too many rows");
  spectrum<<<static_cast<unsigned>(p.dim), fftconv::kFusedThreads, smem, stream>>>(p, tw.data_ptr<float>(),
                                                                                   hs.data_ptr<float>());
  SSMK_CUDA_CHECK_LAUNCH();
  return {tw, hs};
}

template <typename input_t>
void fused_bwd_launch(const FftconvParams& p, const at::TensorOptions& opts) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto [tw, hs] = fused_tables(p, opts);
  const int smem = static_cast<int>(fftconv::fused_bwd_smem_bytes(p.fft_size));
  auto* bwd = &fftconv::fftconv_fused_bwd_kernel<input_t>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  bwd<<<static_cast<unsigned>(p.dim), fftconv::kFusedThreads, smem, stream>>>(p, tw.data_ptr<float>(),
                                                                              hs.data_ptr<float>());
  SSMK_CUDA_CHECK_LAUNCH();
}

template <typename input_t>
void fused_fwd_launch(const FftconvParams& p, const at::TensorOptions& opts) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto [tw, hs] = fused_tables(p, opts);
  const int smem = static_cast<int>(fftconv::fused_smem_bytes(p.fft_size));
  auto* fwd = &fftconv::fftconv_fused_fwd_kernel<input_t>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  fwd<<<static_cast<unsigned>(p.batch * p.dim), fftconv::kFusedThreads, smem, stream>>>(p, tw.data_ptr<float>(),
                                                                                       hs.data_ptr<float>());
  SSMK_CUDA_CHECK_LAUNCH();
}

at::Tensor fftconv_fwd_cuda(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
                            const std::optional<at::Tensor>& postgate, int64_t activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options();
  // The spectrum is built per path: by the fused spectrum kernel, or with ATen for the multi-pass path.
  return fftconv::fwd(u, k, D, k_rev, pregate, postgate, activation, /*spectrum_here=*/false, cuda_fwd_fft_size,
                      [&](const FftconvParams& p, at::ScalarType dtype) {
                        const bool fused = fused_path(p.fft_size) && dtype != at::kDouble;
                        at::Tensor kf;
                        FftconvParams q = p;
                        if (!fused) {
                          const auto acc = fftconv::acc_dtype(u);
                          const at::Tensor k_acc = at::from_blob(const_cast<void*>(p.k), {p.dim, p.klen}, opts.dtype(acc));
                          std::optional<at::Tensor> k_rev_acc;
                          if (p.k_rev) {
                            k_rev_acc = at::from_blob(const_cast<void*>(p.k_rev), {p.dim, p.klen_rev}, opts.dtype(acc));
                          }
                          kf = fftconv::kernel_spectrum(k_acc, k_rev_acc, p.seqlen, p.fft_size, acc);
                          q.kf = kf.data_ptr();
                        }
                        SSMK_DISPATCH_FFTCONV_TYPES(dtype, "fftconv_fwd_cuda", [&] {
                          if constexpr (!std::is_same_v<scalar_t, double>) {
                            if (fused) {
                              fused_fwd_launch<scalar_t>(q, opts);
                              return;
                            }
                          }
                          fwd_launch<scalar_t>(q, opts);
                        });
                      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fftconv_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
    const std::optional<at::Tensor>& postgate, int64_t activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options();
  return fftconv::bwd(dout, u, k, D, k_rev, pregate, postgate, activation, /*spectrum_here=*/false, cuda_bwd_fft_size,
                      [&](const FftconvParams& p, at::ScalarType dtype) {
                        const bool fused = fused_bwd_path(p.fft_size) && dtype != at::kDouble;
                        const auto acc = fftconv::acc_dtype(u);
                        FftconvParams q = p;
                        at::Tensor kf, dkf;
                        if (!fused) {
                          const at::Tensor k_acc = at::from_blob(const_cast<void*>(p.k), {p.dim, p.klen}, opts.dtype(acc));
                          std::optional<at::Tensor> k_rev_acc;
                          if (p.k_rev) {
                            k_rev_acc = at::from_blob(const_cast<void*>(p.k_rev), {p.dim, p.klen_rev}, opts.dtype(acc));
                          }
                          kf = fftconv::kernel_spectrum(k_acc, k_rev_acc, p.seqlen, p.fft_size, acc);
                          dkf = at::empty_like(kf);
                          q.kf = kf.data_ptr();
                          q.dkf = dkf.data_ptr();
                        }
                        SSMK_DISPATCH_FFTCONV_TYPES(dtype, "fftconv_bwd_cuda", [&] {
                          if constexpr (!std::is_same_v<scalar_t, double>) {
                            if (fused) {
                              fused_bwd_launch<scalar_t>(q, opts);
                              return;
                            }
                          }
                          bwd_launch<scalar_t>(q, opts);
                        });
                        if (!fused) {
                          at::Tensor dk = at::from_blob(p.dk, {p.dim, p.klen}, opts.dtype(acc));
                          const at::Tensor dk_rev =
                              p.dk_rev ? at::from_blob(p.dk_rev, {p.dim, p.klen_rev}, opts.dtype(acc)) : at::Tensor();
                          fftconv::map_kernel_grad(dkf, p.fft_size, p.kc, p.kr, dk, dk_rev);
                        }
                      });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("fftconv_fwd", &ssmk::fftconv_fwd_cuda);
  m.impl("fftconv_bwd", &ssmk::fftconv_bwd_cuda);
}
