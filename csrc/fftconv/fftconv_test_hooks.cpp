// fftconv test hooks (CPU): the CPU's [FFT length, path] for these arguments, and the
// hand-written real FFT of rows (inverse: the irfft of [R, n/2 + 1] complex rows to length n;
// strided: through the CUDA fused kernels' per-index drivers).
#include "common/op_library.h"
#include "fftconv/fftconv.h"

namespace ssmk {
namespace {

#define FFTCONV_CPU_PLAN_ARGS(X) X(Tensor, u) X(Tensor, k) X(OptTensor, k_rev)
#define FFTCONV_FFT_ARGS(X) X(Tensor, x) X(Bool, inverse) X(Int, n) X(Bool, strided)
SSMK_OP_ARGS(FftconvCpuPlanArgs, FFTCONV_CPU_PLAN_ARGS)
SSMK_OP_ARGS(FftconvFftArgs, FFTCONV_FFT_ARGS)

// [n, path] with path 1 for the hand-written FFT, 0 for ATen's.
std::vector<int64_t> fftconv_cpu_plan(const FftconvCpuPlanArgs& in) {
  SSMK_CHECK_VALUE(in.u.dim() >= 1, "u: expected at least 1 dim, got shape ", in.u.sizes());
  SSMK_CHECK_VALUE(in.k.dim() == 2, "k: expected 2 dims, got shape ", in.k.sizes());
  SSMK_CHECK_VALUE(!in.k_rev || in.k_rev->dim() == 2, "k_rev: expected 2 dims, got shape ", in.k_rev->sizes());
  const auto plan = fftconv::cpu_plan(
      fftconv::min_fft_size(in.u.size(-1), in.k.size(1), in.k_rev ? in.k_rev->size(1) : 0));
  return {plan.n, plan.hand ? 1 : 0};
}

at::Tensor fftconv_fft(const FftconvFftArgs& in) {
  const at::Tensor& x = in.x;
  const int64_t n = in.n;
  SSMK_CHECK_VALUE(x.dim() == 2, "x: expected 2 dims, got ", x.sizes());
  SSMK_CHECK_VALUE(fftconv::hand_fft_size_ok(n), "n: expected a power of two in [", fftconv::hand_fft_min_size(), ", ",
                   fftconv::hand_fft_max_size(), "], got ", n);
  const auto real = in.inverse ? c10::toRealValueType(x.scalar_type()) : x.scalar_type();
  SSMK_CHECK_TYPE((real == at::kFloat || real == at::kDouble) && x.is_complex() == in.inverse,
                  "x: expected ", in.inverse ? "complex64 or complex128" : "float32 or float64", ", got ",
                  x.scalar_type());
  const int64_t F = n / 2 + 1, R = x.size(0);
  SSMK_CHECK_VALUE(x.size(1) == (in.inverse ? F : n), "x: expected ", in.inverse ? F : n, " columns, got ",
                   x.size(1));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = in.inverse ? at::empty({R, n}, x.options().dtype(real))
                              : at::empty({R, F}, x.options().dtype(c10::toComplexType(real)));
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto* src = static_cast<const T*>(xc.data_ptr());
    auto* dst = static_cast<T*>(out.data_ptr());
    if (in.inverse) {
      fftconv::hand_irfft_rows<T>(src, R, n, in.strided, dst);
    } else {
      fftconv::hand_rfft_rows<T>(src, R, n, in.strided, dst);
    }
  };
  if (real == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
  return out;
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  // Packed fftconv on the CPU through the CUDA path's row with gaps; returns the old value.
  m.def("set_fftconv_packed_gapped_row(bool enable) -> bool",
        [](bool enable) { return ssmk::fftconv_gapped_row_on_cpu().exchange(enable); });
  ssmk::op::define<ssmk::FftconvCpuPlanArgs>(m, "fftconv_cpu_plan", "int[]");
  ssmk::op::define<ssmk::FftconvFftArgs>(m, "fftconv_fft", "Tensor");
}

TORCH_LIBRARY_IMPL(ssm_kernels_test, CPU, m) {
  m.impl("fftconv_cpu_plan", ssmk::op::kernel<ssmk::FftconvCpuPlanArgs, &ssmk::fftconv_cpu_plan>());
  m.impl("fftconv_fft", ssmk::op::kernel<ssmk::FftconvFftArgs, &ssmk::fftconv_fft>());
}
