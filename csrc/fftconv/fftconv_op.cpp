// fftconv ops: the argument lists, checks, allocation and params fill shared by both devices; and
// the test hooks (end of file).
#include "common/dispatch.h"
#include "common/op_library.h"
#include "common/output.h"
#include "common/varlen.h"
#include "fftconv/fftconv.h"

#include <atomic>

namespace ssmk {

std::atomic<bool>& fftconv_gapped_row_on_cpu() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {

// Packed sequences: the CPU kernels run each sequence as its own convolution (offsets read on the
// host, fftconv_cpu.cpp). CUDA runs the row with gaps below (offsets only read on the device); a
// test switch runs the CPU through it too, so the CUDA path's host logic is tested without a GPU.
bool packed_via_gapped_row(const at::Tensor& u) {
  return !u.is_cpu() || fftconv_gapped_row_on_cpu().load(std::memory_order_relaxed);
}

// activation: 0 (none), 1 (gelu, erf form) or 2 (silu).
#define FFTCONV_FWD_ARGS(X)                                                                          \
  X(Tensor, u) X(Tensor, k) X(OptTensor, D) X(OptTensor, k_rev) X(OptTensor, pregate) X(OptTensor, postgate) \
  X(Int, activation) X(OptTensorDefaultNone, cu_seqlens)
#define FFTCONV_BWD_ARGS(X) X(Tensor, dout) FFTCONV_FWD_ARGS(X)
SSMK_OP_ARGS(FftconvFwdArgs, FFTCONV_FWD_ARGS)
SSMK_OP_ARGS(FftconvBwdArgs, FFTCONV_BWD_ARGS)

// k, k_rev, D: float32, or float64 with a float64 u.
void check_param(const at::Tensor& t, const at::Tensor& u, const char* name) {
  const auto s = t.scalar_type();
  SSMK_CHECK_TYPE(s == at::kFloat || (s == at::kDouble && u.scalar_type() == at::kDouble), name,
                  ": expected dtype float32 (or float64 with a float64 u), got ", s);
  check_same_device(t, u, name);
}

void check_kernel(const at::Tensor& k, const at::Tensor& u, const char* name) {
  const int64_t dim = u.size(1);
  SSMK_CHECK_VALUE(k.dim() == 2 && k.size(0) == dim && k.size(1) >= 1, name, ": expected shape (dim=", dim,
                   ", klen >= 1), got ", k.sizes());
  check_param(k, u, name);
}

// Returns the packed-sequence layout.
template <typename Args>
Varlen check_args(const Args& in) {
  const at::Tensor& u = in.u;
  SSMK_CHECK_VALUE(u.dim() == 3, "u: expected 3 dims (batch, dim, seqlen), got shape ", u.sizes());
  check_floating(u, "u");
  SSMK_CHECK_VALUE(u.size(2) >= 1, "u: expected seqlen >= 1, got ", u.size(2));
  check_kernel(in.k, u, "k");
  if (in.D) {
    check_shape(*in.D, {u.size(1)}, "D");
    check_param(*in.D, u, "D");
  }
  if (in.k_rev) check_kernel(*in.k_rev, u, "k_rev");
  for (const auto& [gate, name] : {std::pair{&in.pregate, "pregate"}, std::pair{&in.postgate, "postgate"}}) {
    if (*gate) {
      check_shape(**gate, u.sizes(), name);
      check_dtype(**gate, u.scalar_type(), name);
      check_same_device(**gate, u, name);
    }
  }
  SSMK_CHECK_VALUE(in.activation == fftconv::kActNone || in.activation == fftconv::kActGelu ||
                       in.activation == fftconv::kActSilu,
                   "activation: expected 0 (none), 1 (gelu) or 2 (silu), got ", in.activation);
  return check_cu_seqlens(in.cu_seqlens, std::nullopt, u.size(0), u.size(2), u);
}

// Packed sequences on CUDA run as one plain row with a gap of zeros between consecutive sequences, as
// long as the taps that reach an output: kc - 1 for the causal taps and kr - 1 for the
// anti-causal ones (a kernel longer than seqlen uses its first seqlen taps, so these are at most
// seqlen - 1). No tap then reaches another sequence, and each sequence's convolution starts at its
// first token. The token positions come from the offsets on the device; sizes from shapes only.
struct FftPacking {
  int64_t ext_len = 0, kc = 0, kr = 0;
  at::Tensor token_pos;  // [L] int64: position of each token in the row with gaps

  // [1, D, L] -> [1, D, ext_len], zeros in the gaps.
  at::Tensor extend(const at::Tensor& t) const {
    return at::zeros({1, t.size(1), ext_len}, t.options()).index_copy_(2, token_pos, t);
  }
  at::Tensor unextend(const at::Tensor& t) const { return t.index_select(2, token_pos); }
  // The arguments on the row with gaps (kernels cut to the taps that reach an output).
  template <typename Args>
  Args extended(const Args& in) const {
    Args e = in;
    e.u = extend(in.u);
    if (in.pregate) e.pregate = extend(*in.pregate);
    if (in.postgate) e.postgate = extend(*in.postgate);
    e.k = in.k.narrow(1, 0, kc);
    if (in.k_rev) e.k_rev = in.k_rev->narrow(1, 0, kr);
    e.cu_seqlens = std::nullopt;
    return e;
  }
};

template <typename Args>
FftPacking make_fft_packing(const Varlen& v, const Args& in) {
  FftPacking k;
  const int64_t L = in.u.size(2);
  k.kc = fftconv::taps(in.k.size(1), L);
  k.kr = in.k_rev ? fftconv::taps(in.k_rev->size(1), L) : 1;
  const int64_t gap = (k.kc - 1) + (k.kr - 1);
  k.ext_len = L + (v.num_seqs - 1) * gap;
  const at::Tensor tokens = at::arange(L, v.offsets.options());
  const at::Tensor seq = at::searchsorted(v.offsets, tokens, /*out_int32=*/false, /*right=*/true) - 1;
  k.token_pos = tokens + seq * gap;
  return k;
}

// The parameters (k, k_rev, D) in the accumulation dtype, contiguous.
struct AccParams {
  at::Tensor k;
  std::optional<at::Tensor> k_rev, D;
  template <typename Args>
  explicit AccParams(const Args& in) {
    const auto acc = acc_dtype(in.u.scalar_type());
    k = in.k.to(acc).contiguous();
    if (in.k_rev) k_rev = in.k_rev->to(acc).contiguous();
    if (in.D) D = in.D->to(acc).contiguous();
  }
};

template <typename T, typename Args>
void fill_common(FftconvCommon<T>& p, const Args& in, const AccParams& a, const Varlen& v) {
  using acc = acc_t<T>;
  p.batch = in.u.size(0);
  p.dim = in.u.size(1);
  p.seqlen = in.u.size(2);
  p.activation = static_cast<int>(in.activation);
  p.u = view<const T, 3>(in.u);
  p.pregate = view<const T, 3>(in.pregate);
  p.postgate = view<const T, 3>(in.postgate);
  p.D = ptr<const acc>(a.D);
  p.k = ptr<const acc>(a.k);
  p.k_rev = ptr<const acc>(a.k_rev);
  p.klen = a.k.size(1);
  p.klen_rev = a.k_rev ? a.k_rev->size(1) : 0;
  p.kc = fftconv::taps(p.klen, p.seqlen);
  p.kr = fftconv::taps(p.klen_rev, p.seqlen);
  // The CPU path only (the CUDA path never sees packed rows): offsets in host memory.
  p.seqs = PackedSeqs{v.packed() ? v.offsets.data_ptr<int64_t>() : nullptr, v.num_seqs, {}};
}

// The CPU's FFT length (the CUDA host driver picks its own).
template <typename T>
void plan_cpu(FftconvCommon<T>& p) {
  p.fft_size = fftconv::cpu_plan(fftconv::min_fft_size(p.seqlen, p.klen, p.klen_rev)).n;
  p.nfreq = p.fft_size / 2 + 1;
}

at::Tensor fftconv_fwd(const FftconvFwdArgs& in) {
  const Varlen v = check_args(in);
  if (v.packed() && packed_via_gapped_row(in.u)) {
    const FftPacking k = make_fft_packing(v, in);
    return k.unextend(fftconv_fwd(k.extended(in)));
  }
  at::Tensor out = new_output(in.u.sizes(), in.u.options());
  if (in.u.numel() == 0) return out;
  const AccParams a(in);
  SSMK_DISPATCH_FLOAT(in.u.scalar_type(), "fftconv_fwd", [&] {
    using T = scalar_t;
    FftconvFwdParams<T> p{};
    fill_common(p, in, a, v);
    p.out = ptr<T>(out);
    launch(in.u, [&] {
      plan_cpu(p);
      fftconv_fwd_cpu(p);
    } SSMK_CUDA([&](const CudaContext& ctx) { fftconv_fwd_cuda(p, ctx); }));
  });
  return out;
}

// (du, dk, dD, dk_rev, dpregate, dpostgate); the gradient of an absent argument is empty (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fftconv_bwd(
    const FftconvBwdArgs& in) {
  const Varlen v = check_args(in);
  check_shape(in.dout, in.u.sizes(), "dout");
  check_same_device(in.dout, in.u, "dout");
  if (v.packed() && packed_via_gapped_row(in.u)) {
    // Gaps have zero output gradients; the taps cut away reach no output (zero gradients).
    const FftPacking k = make_fft_packing(v, in);
    FftconvBwdArgs e = k.extended(in);
    e.dout = k.extend(in.dout.to(in.u.scalar_type()));
    auto [du, dk, dD, dk_rev, dpregate, dpostgate] = fftconv_bwd(e);
    if (dk.size(1) < in.k.size(1)) dk = at::constant_pad_nd(dk, {0, in.k.size(1) - dk.size(1)});
    if (in.k_rev && dk_rev.size(1) < in.k_rev->size(1)) {
      dk_rev = at::constant_pad_nd(dk_rev, {0, in.k_rev->size(1) - dk_rev.size(1)});
    }
    return {k.unextend(du), dk, dD, dk_rev, in.pregate ? k.unextend(dpregate) : dpregate,
            in.postgate ? k.unextend(dpostgate) : dpostgate};
  }
  const auto acc = acc_dtype(in.u.scalar_type());
  // dout arrives in whatever dtype autograd produced; the kernels read it in u's dtype.
  const at::Tensor dout = in.dout.to(in.u.scalar_type());
  at::Tensor du = new_output(in.u.sizes(), in.u.options());
  at::Tensor dpregate = new_grad(in.pregate, in.dout);
  at::Tensor dpostgate = new_grad(in.postgate, in.dout);
  // The kernels write the parameters' gradients in the accumulation dtype.
  const auto acc_grad = [&](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(new_output(t->sizes(), in.u.options().dtype(acc))) : std::nullopt;
  };
  std::optional<at::Tensor> dk = acc_grad(in.k), dD = acc_grad(in.D), dk_rev = acc_grad(in.k_rev);
  const auto result = [&] {
    const auto like = [&](const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& t) {
      return t ? g->to(t->scalar_type()) : new_grad({}, in.dout);
    };
    return std::make_tuple(du, like(dk, in.k), like(dD, in.D), like(dk_rev, in.k_rev), dpregate, dpostgate);
  };
  if (in.u.numel() == 0) {
    // No rows: the parameters' gradients are empty sums.
    for (auto* g : {&dk, &dD, &dk_rev}) {
      if (*g) (*g)->zero_();
    }
    return result();
  }
  const AccParams a(in);
  SSMK_DISPATCH_FLOAT(in.u.scalar_type(), "fftconv_bwd", [&] {
    using T = scalar_t;
    FftconvBwdParams<T> p{};
    fill_common(p, in, a, v);
    p.dout = view<const T, 3>(dout);
    p.du = ptr<T>(du);
    p.dpregate = in.pregate ? ptr<T>(dpregate) : nullptr;
    p.dpostgate = in.postgate ? ptr<T>(dpostgate) : nullptr;
    p.dD = ptr<acc_t<T>>(dD);
    p.dk = ptr<acc_t<T>>(dk);
    p.dk_rev = ptr<acc_t<T>>(dk_rev);
    launch(in.u, [&] {
      plan_cpu(p);
      fftconv_bwd_cpu(p);
    } SSMK_CUDA([&](const CudaContext& ctx) { fftconv_bwd_cuda(p, ctx); }));
  });
  return result();
}

// Test hooks (CPU): the CPU's [FFT length, path] for these arguments, and the hand-written real
// FFT of rows (inverse: the irfft of [R, n/2 + 1] complex rows to length n; strided: through the
// CUDA fused kernels' per-index drivers).
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
    fftconv::hand_fft_rows<T>(src, R, n, in.inverse, in.strided, dst);
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

SSMK_OP(fftconv_fwd, FftconvFwdArgs, "Tensor out")
SSMK_OP(fftconv_bwd, FftconvBwdArgs, "(Tensor du, Tensor dk, Tensor dD, Tensor dk_rev, Tensor dpregate, Tensor dpostgate)")

// The test hooks, in their own library (torch.ops.ssm_kernels_test), apart from the public ops.
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
