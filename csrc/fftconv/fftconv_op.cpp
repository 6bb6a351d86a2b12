// fftconv ops: the argument lists, checks, allocation and params fill shared by both devices.
#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"
#include "fftconv/fftconv.h"

namespace ssmk {
namespace {

// activation: 0 (none), 1 (gelu, erf form) or 2 (silu).
#define FFTCONV_FWD_ARGS(X)                                                                          \
  X(Tensor, u) X(Tensor, k) X(OptTensor, D) X(OptTensor, k_rev) X(OptTensor, pregate) X(OptTensor, postgate) \
  X(Int, activation)
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

template <typename Args>
void check_args(const Args& in) {
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
void fill_common(FftconvCommon<T>& p, const Args& in, const AccParams& a) {
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
}

// The CPU's FFT length (the CUDA host driver picks its own).
template <typename T>
void plan_cpu(FftconvCommon<T>& p) {
  p.fft_size = fftconv::cpu_plan(fftconv::min_fft_size(p.seqlen, p.klen, p.klen_rev)).n;
  p.nfreq = p.fft_size / 2 + 1;
}

at::Tensor fftconv_fwd(const FftconvFwdArgs& in) {
  check_args(in);
  at::Tensor out = new_output(in.u.sizes(), in.u.options());
  if (in.u.numel() == 0) return out;
  const AccParams a(in);
  SSMK_DISPATCH_FLOAT(in.u.scalar_type(), "fftconv_fwd", [&] {
    using T = scalar_t;
    FftconvFwdParams<T> p{};
    fill_common(p, in, a);
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
  check_args(in);
  check_shape(in.dout, in.u.sizes(), "dout");
  check_same_device(in.dout, in.u, "dout");
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
    fill_common(p, in, a);
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

}  // namespace
}  // namespace ssmk

SSMK_OP(fftconv_fwd, FftconvFwdArgs, "Tensor out")
SSMK_OP(fftconv_bwd, FftconvBwdArgs, "(Tensor du, Tensor dk, Tensor dD, Tensor dk_rev, Tensor dpregate, Tensor dpostgate)")
