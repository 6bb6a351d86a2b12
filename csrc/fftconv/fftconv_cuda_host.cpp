// CUDA host driver of fftconv: the FFT length and path, the workspaces (ATen, on the op's device)
// and the cuFFT transforms (through ATen, which caches the plans), around the kernel launchers of
// fftconv_cuda.cu. Runs inside ssmk::launch (device guard, current stream, final error check).
//
// Two forward paths: the fused single kernel for power-of-two lengths whose row fits in the
// device's opt-in shared memory, and the multi-pass path for the rest and float64. Each block of
// channels of the multi-pass path runs: load (gate, pad) -> rfft -> spectrum product -> irfft ->
// fused epilogue; the backward adds the gradient pointwise stage, one more transform pair and the
// fixed-order batch reduction of dH. Its kernel spectrum H and the map of dH back onto the taps
// use ATen's (cuFFT) transforms.
#ifdef SSMK_WITH_CUDA

#include "common/aten.h"
#include <ATen/cuda/CUDAContext.h>

#include <optional>
#include <type_traits>

#include "common/checks.h"
#include "fftconv/fftconv.h"

namespace ssmk {
namespace {

namespace kernels = fftconv::cuda_launch;

// Elements of one real workspace per channel block (2^27 floats = 512 MiB): bounds the memory of
// very long sequences at large batch x dim while keeping launches large.
constexpr int64_t kMaxBlockElems = int64_t(1) << 27;

int64_t channels_per_block(int64_t batch, int64_t n) { return std::max<int64_t>(1, kMaxBlockElems / (batch * n)); }

template <typename T>
at::TensorOptions acc_options() {
  return at::TensorOptions()
      .dtype(c10::CppTypeToScalarType<acc_t<T>>::value)
      .device(at::kCUDA, at::cuda::current_device());
}

template <typename acc>
acc* cplx_ptr(const at::Tensor& t) {
  return reinterpret_cast<acc*>(t.data_ptr());
}

int64_t max_fused_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

bool pow2_fused_size(int64_t n) { return n >= kernels::min_fused_size() && (n & (n - 1)) == 0; }

// The forward's FFT length, chosen here only: the next power of two (>= the smallest fused length)
// when its fused kernel fits in shared memory (the fused path moves only the compulsory bytes,
// worth a longer transform), else the smallest 2^a 3^b 5^c length for the multi-pass path.
int64_t fwd_fft_size(int64_t m) {
  const int64_t p2 = std::max<int64_t>(kernels::min_fused_size(), fftconv::next_pow2(m));
  return kernels::fused_smem_bytes(p2) <= max_fused_smem() ? p2 : fftconv::fft_size(m);
}
bool fused_path(int64_t n) { return pow2_fused_size(n) && kernels::fused_smem_bytes(n) <= max_fused_smem(); }

// The backward's FFT length: the fused backward holds a row's gpre in registers, so it runs up to
// max_fused_bwd_size() (and when its shared memory fits).
bool fused_bwd_path(int64_t n) {
  return pow2_fused_size(n) && n <= kernels::max_fused_bwd_size() &&
         kernels::fused_bwd_smem_bytes(n) <= max_fused_smem();
}
int64_t bwd_fft_size(int64_t m) {
  const int64_t p2 = std::max<int64_t>(kernels::min_fused_size(), fftconv::next_pow2(m));
  return fused_bwd_path(p2) ? p2 : fftconv::fft_size(m);
}

template <typename T>
void set_fft_size(FftconvCommon<T>& p, int64_t n) {
  p.fft_size = n;
  p.nfreq = n / 2 + 1;
}

// H = rfft(h, n): [D, n / 2 + 1] complex in the accumulation dtype, h the combined kernel.
template <typename T>
at::Tensor kernel_spectrum(const FftconvCommon<T>& p) {
  const auto opts = acc_options<T>();
  const int64_t n = p.fft_size, kc = p.kc, kr = p.kr;
  const at::Tensor k = at::from_blob(const_cast<acc_t<T>*>(p.k), {p.dim, p.klen}, opts);
  at::Tensor h = at::zeros({p.dim, n}, opts);  // [D, n]
  h.narrow(1, 0, kc).copy_(k.narrow(1, 0, kc));
  if (p.k_rev) {
    const at::Tensor k_rev = at::from_blob(const_cast<acc_t<T>*>(p.k_rev), {p.dim, p.klen_rev}, opts);
    h.select(1, 0).add_(k_rev.select(1, 0));
    if (kr > 1) h.narrow(1, n - kr + 1, kr - 1).add_(k_rev.narrow(1, 1, kr - 1).flip({1}));
  }
  return at::fft_rfft(h, n, 1).contiguous();
}

// dk / dk_rev from dH = sum_b G_b conj(V_b), [D, n/2 + 1]: dh[j] = sum_b sum_t g_b[t] v_b[(t - j)
// mod n], the circular correlation, is irfft(dH); taps past L get zero.
template <typename T>
void map_kernel_grad(const FftconvBwdParams<T>& p, const at::Tensor& dkf) {
  const auto opts = acc_options<T>();
  const int64_t n = p.fft_size, kc = p.kc, kr = p.kr;
  const at::Tensor dh = at::fft_irfft(dkf, n, 1);  // [D, n]
  at::Tensor dk = at::from_blob(p.dk, {p.dim, p.klen}, opts);
  dk.narrow(1, 0, kc).copy_(dh.narrow(1, 0, kc));
  if (p.klen > kc) dk.narrow(1, kc, p.klen - kc).zero_();
  if (p.dk_rev) {
    at::Tensor r = at::from_blob(p.dk_rev, {p.dim, p.klen_rev}, opts);
    r.select(1, 0).copy_(dh.select(1, 0));
    if (kr > 1) r.narrow(1, 1, kr - 1).copy_(dh.narrow(1, n - kr + 1, kr - 1).flip({1}));
    if (p.klen_rev > kr) r.narrow(1, kr, p.klen_rev - kr).zero_();
  }
}

// Twiddle table and kernel spectra [D, 2, F] (H / (2n), re then im) of the fused kernels.
template <typename T>
std::pair<at::Tensor, at::Tensor> fused_tables(const FftconvCommon<T>& p, const CudaContext& ctx) {
  SSMK_CHECK_VALUE(p.batch * p.dim <= int64_t(INT32_MAX), "u: too many rows (batch x dim) for one launch: ",
                   p.batch * p.dim);
  const auto fopt = acc_options<float>();
  at::Tensor tw = at::empty({2 * kernels::fused_table_size(p.fft_size)}, fopt);
  at::Tensor hs = at::empty({p.dim, 2, p.fft_size / 2 + 1}, fopt);  // [D, 2, F]
  kernels::fused_tables(p, tw.data_ptr<float>(), hs.data_ptr<float>(), ctx);
  return {tw, hs};
}

template <typename T>
void multi_pass_fwd(const FftconvFwdParams<T>& p, const CudaContext& ctx) {
  using acc = acc_t<T>;
  const auto ropt = acc_options<T>();
  const int64_t n = p.fft_size, chans = channels_per_block(p.batch, n);
  for (int64_t d0 = 0; d0 < p.dim; d0 += chans) {
    const int64_t nch = std::min(chans, p.dim - d0), rows = nch * p.batch;
    at::Tensor vbuf = at::empty({rows, n}, ropt);  // [rows, n]
    kernels::load_v<T>(p, d0, rows, vbuf.data_ptr<acc>(), ctx);
    at::Tensor V = at::_fft_r2c(vbuf, {1}, /*normalization=none*/ 0, /*onesided=*/true);  // [rows, F]
    kernels::mul_spectrum<T>(p, d0, rows, false, cplx_ptr<acc>(V), cplx_ptr<acc>(V), ctx);
    at::Tensor c = at::_fft_c2r(V, {1}, /*normalization=by_n*/ 2, n);  // [rows, n]
    kernels::epilogue<T>(p, d0, rows, c.data_ptr<acc>(), ctx);
  }
}

template <typename T>
void multi_pass_bwd(const FftconvBwdParams<T>& p, const CudaContext& ctx) {
  using acc = acc_t<T>;
  const auto ropt = acc_options<T>();
  const int64_t n = p.fft_size, chans = channels_per_block(p.batch, n);
  const bool need_c = p.activation != fftconv::kActNone || p.postgate.data;
  const int64_t chunks = kernels::grad_pre_chunks(n);
  for (int64_t d0 = 0; d0 < p.dim; d0 += chans) {
    const int64_t nch = std::min(chans, p.dim - d0), rows = nch * p.batch;
    SSMK_CHECK_VALUE(rows * chunks <= int64_t(INT32_MAX), "u: too many rows for one launch: ", rows);
    at::Tensor vbuf = at::empty({rows, n}, ropt);  // [rows, n]: v, then c, then the du convolution
    kernels::load_v<T>(p, d0, rows, vbuf.data_ptr<acc>(), ctx);
    const at::Tensor V = at::_fft_r2c(vbuf, {1}, 0, true);  // [rows, F]
    at::Tensor c = vbuf;
    if (need_c) {
      at::Tensor VH = at::empty_like(V);
      kernels::mul_spectrum<T>(p, d0, rows, false, cplx_ptr<acc>(V), cplx_ptr<acc>(VH), ctx);
      c = at::_fft_c2r(VH, {1}, 2, n);
    }
    at::Tensor gbuf = at::empty({rows, n}, ropt);                  // [rows, n]: gpre, zero-padded
    at::Tensor partial = at::empty({nch, p.batch * chunks}, ropt);  // per (row, chunk) sums for dD
    kernels::grad_pre<T>(p, d0, rows, c.data_ptr<acc>(), gbuf.data_ptr<acc>(), partial.data_ptr<acc>(), ctx);
    if (p.dD) {
      at::Tensor dD = at::from_blob(p.dD + d0, {nch}, ropt);
      at::sum_out(dD, partial, {1});
    }
    at::Tensor G = at::_fft_r2c(gbuf, {1}, 0, true);  // [rows, F]
    kernels::dkf<T>(p, d0, nch, cplx_ptr<acc>(G), cplx_ptr<acc>(V), ctx);
    kernels::mul_spectrum<T>(p, d0, rows, true, cplx_ptr<acc>(G), cplx_ptr<acc>(G), ctx);
    const at::Tensor conv = at::_fft_c2r(G, {1}, 2, n);  // [rows, n]
    kernels::grad_input<T>(p, d0, rows, conv.data_ptr<acc>(), gbuf.data_ptr<acc>(), ctx);
  }
}

}  // namespace

template <typename T>
void fftconv_fwd_cuda(const FftconvFwdParams<T>& params, const CudaContext& ctx) {
  FftconvFwdParams<T> p = params;
  set_fft_size(p, fwd_fft_size(fftconv::min_fft_size(p.seqlen, p.klen, p.klen_rev)));
  if constexpr (!std::is_same_v<T, double>) {
    if (fused_path(p.fft_size)) {
      const auto [tw, hs] = fused_tables(p, ctx);
      kernels::fused_fwd(p, tw.template data_ptr<float>(), hs.template data_ptr<float>(), ctx);
      return;
    }
  }
  const at::Tensor kf = kernel_spectrum(p);  // [D, F]
  p.kf = cplx_ptr<const acc_t<T>>(kf);
  multi_pass_fwd(p, ctx);
}

template <typename T>
void fftconv_bwd_cuda(const FftconvBwdParams<T>& params, const CudaContext& ctx) {
  FftconvBwdParams<T> p = params;
  set_fft_size(p, bwd_fft_size(fftconv::min_fft_size(p.seqlen, p.klen, p.klen_rev)));
  if constexpr (!std::is_same_v<T, double>) {
    if (fused_bwd_path(p.fft_size)) {
      const auto [tw, hs] = fused_tables(p, ctx);
      kernels::fused_bwd(p, tw.template data_ptr<float>(), hs.template data_ptr<float>(), ctx);
      return;
    }
  }
  const at::Tensor kf = kernel_spectrum(p);  // [D, F]
  const at::Tensor dkf = at::empty_like(kf);  // [D, F]
  p.kf = cplx_ptr<const acc_t<T>>(kf);
  p.dkf = cplx_ptr<acc_t<T>>(dkf);
  multi_pass_bwd(p, ctx);
  map_kernel_grad(p, dkf);
}

#define SSMK_INSTANTIATE(T)                                                               \
  template void fftconv_fwd_cuda<T>(const FftconvFwdParams<T>&, const CudaContext&); \
  template void fftconv_bwd_cuda<T>(const FftconvBwdParams<T>&, const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk

#endif  // SSMK_WITH_CUDA
