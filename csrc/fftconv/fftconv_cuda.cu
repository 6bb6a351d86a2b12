// CUDA host side of fftconv: the shared driver (fftconv.h) with the multi-pass launcher. Each
// block of channels runs: load (gate, pad) -> cuFFT rfft (through ATen) -> spectrum product ->
// cuFFT irfft -> fused epilogue; the backward adds the gradient pointwise stage, one more
// transform pair and the fixed-order batch reduction of dH. The kernel spectrum H and the map of
// dH back onto the taps are computed by the driver with ATen's (cuFFT) transforms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fftconv/fftconv.h"
#include "fftconv/fftconv_bwd_kernel.cuh"
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

int64_t cuda_fft_size(int64_t m) { return fftconv::fft_size(m); }

at::Tensor fftconv_fwd_cuda(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
                            const std::optional<at::Tensor>& postgate, int64_t activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options();
  return fftconv::fwd(u, k, D, k_rev, pregate, postgate, activation, /*spectrum_here=*/true, cuda_fft_size,
                      [&](const FftconvParams& p, at::ScalarType dtype) {
                        SSMK_DISPATCH_FFTCONV_TYPES(dtype, "fftconv_fwd_cuda", [&] { fwd_launch<scalar_t>(p, opts); });
                      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fftconv_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
    const std::optional<at::Tensor>& postgate, int64_t activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options();
  return fftconv::bwd(dout, u, k, D, k_rev, pregate, postgate, activation, /*spectrum_here=*/true, cuda_fft_size,
                      [&](const FftconvParams& p, at::ScalarType dtype) {
                        SSMK_DISPATCH_FFTCONV_TYPES(dtype, "fftconv_bwd_cuda", [&] { bwd_launch<scalar_t>(p, opts); });
                      });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("fftconv_fwd", &ssmk::fftconv_fwd_cuda);
  m.impl("fftconv_bwd", &ssmk::fftconv_bwd_cuda);
}
