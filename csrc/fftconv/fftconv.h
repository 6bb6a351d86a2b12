// fftconv: parameters, argument checks and the host-side driver shared by the CPU and CUDA
// implementations (each device supplies its FFT-size policy and its kernel launcher).
//
// The driver builds the combined kernel h (causal taps at the front, anti-causal taps wrapped to
// the back, see fftconv_math.h) and its spectrum H = rfft(h, n) once per call with ATen's FFT on
// the tensors' device, shared by every batch row. In the backward, the device kernel reduces
// dH[d] = sum_b G_b * conj(V_b) over the batch in a fixed order, and the driver maps
// dh = irfft(dH, n) back onto the taps of k and k_rev.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/output.h"
#include "fftconv/fftconv_math.h"

namespace ssmk {

struct FftconvParams {
  int64_t batch, dim, seqlen;
  int64_t fft_size, nfreq;  // n and n / 2 + 1
  int activation;

  const void* u;  // [B, D, L], any strides
  int64_t u_batch_stride, u_dim_stride, u_l_stride;
  const void* pregate;  // [B, D, L] u dtype, any strides, or nullptr
  int64_t pre_batch_stride, pre_dim_stride, pre_l_stride;
  const void* postgate;  // [B, D, L] u dtype, any strides, or nullptr
  int64_t post_batch_stride, post_dim_stride, post_l_stride;
  const void* D;   // [D] accumulation dtype, contiguous, or nullptr
  const void* kf;  // [D, F] complex accumulation dtype, contiguous: H = rfft(h, n), or nullptr
                   // when the device builds the spectrum itself from k and k_rev
  const void* k;      // [D, klen] accumulation dtype, contiguous
  const void* k_rev;  // [D, klen_rev] accumulation dtype, contiguous, or nullptr
  int64_t klen, klen_rev, kc, kr;  // kc / kr: the taps that reach the output (<= L)

  void* out;  // [B, D, L] contiguous

  const void* dout;  // [B, D, L] u dtype, any strides
  int64_t dout_batch_stride, dout_dim_stride, dout_l_stride;
  void* du;         // [B, D, L] contiguous
  void* dpregate;   // [B, D, L] contiguous, or nullptr
  void* dpostgate;  // [B, D, L] contiguous, or nullptr
  void* dD;         // [D] accumulation dtype, or nullptr
  void* dkf;        // [D, F] complex accumulation dtype: sum over b of G_b * conj(V_b), or
                    // nullptr when the device maps dH to dk / dk_rev itself (into dk, dk_rev)
  void* dk;         // [D, klen] accumulation dtype
  void* dk_rev;     // [D, klen_rev] accumulation dtype, or nullptr
};

namespace fftconv {

inline at::ScalarType acc_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param(const at::Tensor& t, const at::Tensor& u, const char* name) {
  const auto s = t.scalar_type();
  SSMK_CHECK_TYPE(s == at::kFloat || (s == at::kDouble && u.scalar_type() == at::kDouble), name,
                  ": expected dtype float32 (or float64 with a float64 u), got ", s);
  check_same_device(t, u, name);
}

// The checks behind the Python wrapper's messages, repeated here so that a direct torch.ops call
// cannot reach a kernel with inconsistent arguments.
inline void check_args(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& k_rev,
                       const std::optional<at::Tensor>& pregate,
                       const std::optional<at::Tensor>& postgate, int64_t activation) {
  SSMK_CHECK_VALUE(u.dim() == 3, "u: expected 3 dims (batch, dim, seqlen), got shape ", u.sizes());
  check_floating(u, "u");
  const int64_t dim = u.size(1);
  SSMK_CHECK_VALUE(u.size(2) >= 1, "u: expected seqlen >= 1, got ", u.size(2));
  SSMK_CHECK_VALUE(k.dim() == 2 && k.size(0) == dim && k.size(1) >= 1,
                   "k: expected shape (dim=", dim, ", klen >= 1), got ", k.sizes());
  check_param(k, u, "k");
  if (D) {
    check_shape(*D, {dim}, "D");
    check_param(*D, u, "D");
  }
  if (k_rev) {
    SSMK_CHECK_VALUE(k_rev->dim() == 2 && k_rev->size(0) == dim && k_rev->size(1) >= 1,
                     "k_rev: expected shape (dim=", dim, ", klen >= 1), got ", k_rev->sizes());
    check_param(*k_rev, u, "k_rev");
  }
  for (const auto& [gate, name] : {std::pair{&pregate, "pregate"}, std::pair{&postgate, "postgate"}}) {
    if (*gate) {
      check_shape(**gate, u.sizes(), name);
      check_dtype(**gate, u.scalar_type(), name);
      check_same_device(**gate, u, name);
    }
  }
  SSMK_CHECK_VALUE(activation == kActNone || activation == kActGelu || activation == kActSilu,
                   "activation: expected 0 (none), 1 (gelu) or 2 (silu), got ", activation);
}

// Taps that reach the output: a kernel longer than the sequence uses its first L taps.
inline int64_t causal_taps(const at::Tensor& k, int64_t L) { return std::min(k.size(1), L); }
inline int64_t rev_taps(const std::optional<at::Tensor>& k_rev, int64_t L) {
  return k_rev ? std::min(k_rev->size(1), L) : 0;
}

// Shortest circular length without aliasing into [0, L): L + max(Kc, Kr) - 1.
inline int64_t min_fft_size(const at::Tensor& k, const std::optional<at::Tensor>& k_rev, int64_t L) {
  return L + std::max(causal_taps(k, L), rev_taps(k_rev, L)) - 1;
}

// H = rfft(h, n): [D, n / 2 + 1] complex in the accumulation dtype.
inline at::Tensor kernel_spectrum(const at::Tensor& k, const std::optional<at::Tensor>& k_rev,
                                  int64_t L, int64_t n, at::ScalarType acc) {
  const int64_t dim = k.size(0), kc = causal_taps(k, L), kr = rev_taps(k_rev, L);
  at::Tensor h = at::zeros({dim, n}, k.options().dtype(acc));  // [D, n]
  h.narrow(1, 0, kc).copy_(k.narrow(1, 0, kc));
  if (k_rev) {
    h.select(1, 0).add_(k_rev->select(1, 0).to(acc));
    if (kr > 1) h.narrow(1, n - kr + 1, kr - 1).add_(k_rev->narrow(1, 1, kr - 1).flip({1}).to(acc));
  }
  return at::fft_rfft(h, n, 1).contiguous();
}

// dk / dk_rev (accumulation dtype, [D, klen] / [D, klen_rev] or undefined) from dH = sum_b G_b
// conj(V_b), [D, n/2 + 1]: dh[j] = sum_b sum_t g_b[t] v_b[(t - j) mod n], the circular
// correlation, is irfft(dH); taps past L get zero.
inline void map_kernel_grad(const at::Tensor& dkf, int64_t n, int64_t kc, int64_t kr, at::Tensor& dk_acc,
                            const at::Tensor& dk_rev_acc) {
  const at::Tensor dh = at::fft_irfft(dkf, n, 1);  // [D, n]
  dk_acc.narrow(1, 0, kc).copy_(dh.narrow(1, 0, kc));
  if (dk_acc.size(1) > kc) dk_acc.narrow(1, kc, dk_acc.size(1) - kc).zero_();
  if (dk_rev_acc.defined()) {
    at::Tensor r = dk_rev_acc;
    r.select(1, 0).copy_(dh.select(1, 0));
    if (kr > 1) r.narrow(1, 1, kr - 1).copy_(dh.narrow(1, n - kr + 1, kr - 1).flip({1}));
    if (r.size(1) > kr) r.narrow(1, kr, r.size(1) - kr).zero_();
  }
}

inline void set_common_params(FftconvParams& p, const at::Tensor& u, const std::optional<at::Tensor>& D_acc,
                              const std::optional<at::Tensor>& pregate,
                              const std::optional<at::Tensor>& postgate, const at::Tensor& k_acc,
                              const std::optional<at::Tensor>& k_rev_acc, const at::Tensor& kf, int64_t n,
                              int64_t activation) {
  p = FftconvParams{};
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.seqlen = u.size(2);
  p.fft_size = n;
  p.nfreq = n / 2 + 1;
  p.activation = static_cast<int>(activation);
  p.u = u.data_ptr();
  p.u_batch_stride = u.stride(0);
  p.u_dim_stride = u.stride(1);
  p.u_l_stride = u.stride(2);
  if (pregate) {
    p.pregate = pregate->data_ptr();
    p.pre_batch_stride = pregate->stride(0);
    p.pre_dim_stride = pregate->stride(1);
    p.pre_l_stride = pregate->stride(2);
  }
  if (postgate) {
    p.postgate = postgate->data_ptr();
    p.post_batch_stride = postgate->stride(0);
    p.post_dim_stride = postgate->stride(1);
    p.post_l_stride = postgate->stride(2);
  }
  p.D = D_acc ? D_acc->data_ptr() : nullptr;
  p.kf = kf.defined() ? kf.data_ptr() : nullptr;
  p.k = k_acc.data_ptr();
  p.klen = k_acc.size(1);
  p.kc = causal_taps(k_acc, p.seqlen);
  p.k_rev = k_rev_acc ? k_rev_acc->data_ptr() : nullptr;
  p.klen_rev = k_rev_acc ? k_rev_acc->size(1) : 0;
  p.kr = rev_taps(k_rev_acc, p.seqlen);
}

// The parameters (k, k_rev, D) in the accumulation dtype, contiguous.
struct AccParams {
  at::Tensor k;
  std::optional<at::Tensor> k_rev, D;
  AccParams(const at::Tensor& k_, const std::optional<at::Tensor>& k_rev_, const std::optional<at::Tensor>& D_,
            at::ScalarType acc)
      : k(k_.to(acc).contiguous()) {
    if (k_rev_) k_rev = k_rev_->to(acc).contiguous();
    if (D_) D = D_->to(acc).contiguous();
  }
};

// Forward driver. `pick_size(m)` returns the device's FFT length for a minimum length m;
// with `spectrum_here` the driver computes H with ATen, else the device kernel builds it from
// k and k_rev; `launch(params, u_dtype)` runs the device kernel.
template <typename PickSize, typename Launch>
at::Tensor fwd(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
               const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
               const std::optional<at::Tensor>& postgate, int64_t activation, bool spectrum_here,
               PickSize&& pick_size, Launch&& launch) {
  check_args(u, k, D, k_rev, pregate, postgate, activation);
  const auto acc = acc_dtype(u);
  const int64_t B = u.size(0), dim = u.size(1), L = u.size(2);
  const int64_t n = pick_size(min_fft_size(k, k_rev, L));
  const AccParams a(k, k_rev, D, acc);
  const at::Tensor kf = spectrum_here ? kernel_spectrum(a.k, a.k_rev, L, n, acc) : at::Tensor();  // [D, F]
  at::Tensor out = new_output({B, dim, L}, u.options());
  FftconvParams p;
  set_common_params(p, u, a.D, pregate, postgate, a.k, a.k_rev, kf, n, activation);
  p.out = out.data_ptr();
  launch(p, u.scalar_type());
  return out;
}

// Backward driver: (du, dk, dD, dk_rev, dpregate, dpostgate); the gradient of an argument that
// was not given is an empty tensor of shape (0,).
template <typename PickSize, typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& k_rev, const std::optional<at::Tensor>& pregate,
    const std::optional<at::Tensor>& postgate, int64_t activation, bool spectrum_here,
    PickSize&& pick_size, Launch&& launch) {
  check_args(u, k, D, k_rev, pregate, postgate, activation);
  check_shape(dout, u.sizes(), "dout");
  check_same_device(dout, u, "dout");
  const auto acc = acc_dtype(u);
  const auto cacc = acc == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  const int64_t B = u.size(0), dim = u.size(1), L = u.size(2);
  const int64_t n = pick_size(min_fft_size(k, k_rev, L));
  const AccParams a(k, k_rev, D, acc);
  const at::Tensor kf = spectrum_here ? kernel_spectrum(a.k, a.k_rev, L, n, acc) : at::Tensor();  // [D, F]
  // dout arrives in whatever dtype autograd produced; kernels read it in u's dtype.
  const at::Tensor dout_u = dout.scalar_type() == u.scalar_type() ? dout : dout.to(u.scalar_type());

  at::Tensor du = new_output({B, dim, L}, u.options());
  at::Tensor dpregate = pregate ? new_output({B, dim, L}, u.options()) : u.new_empty({0});
  at::Tensor dpostgate = postgate ? new_output({B, dim, L}, u.options()) : u.new_empty({0});
  at::Tensor dD_acc = D ? at::empty({dim}, u.options().dtype(acc)) : at::Tensor();
  at::Tensor dkf = spectrum_here ? at::empty({dim, n / 2 + 1}, u.options().dtype(cacc)) : at::Tensor();  // [D, F]
  at::Tensor dk_acc = at::empty(k.sizes(), u.options().dtype(acc));
  at::Tensor dk_rev_acc = k_rev ? at::empty(k_rev->sizes(), u.options().dtype(acc)) : at::Tensor();

  FftconvParams p;
  set_common_params(p, u, a.D, pregate, postgate, a.k, a.k_rev, kf, n, activation);
  p.dout = dout_u.data_ptr();
  p.dout_batch_stride = dout_u.stride(0);
  p.dout_dim_stride = dout_u.stride(1);
  p.dout_l_stride = dout_u.stride(2);
  p.du = du.data_ptr();
  p.dpregate = pregate ? dpregate.data_ptr() : nullptr;
  p.dpostgate = postgate ? dpostgate.data_ptr() : nullptr;
  p.dD = D ? dD_acc.data_ptr() : nullptr;
  p.dkf = spectrum_here ? dkf.data_ptr() : nullptr;
  p.dk = dk_acc.data_ptr();
  p.dk_rev = k_rev ? dk_rev_acc.data_ptr() : nullptr;
  launch(p, u.scalar_type());

  if (spectrum_here) map_kernel_grad(dkf, n, causal_taps(k, L), rev_taps(k_rev, L), dk_acc, dk_rev_acc);
  const auto param_out = [](const at::Tensor& g, const at::Tensor& like) {
    at::Tensor out = new_output(like.sizes(), like.options());
    out.copy_(g);
    return out;
  };
  at::Tensor dk = param_out(dk_acc, k);
  at::Tensor dk_rev = k_rev ? param_out(dk_rev_acc, *k_rev) : k.new_empty({0});
  at::Tensor dD = D ? param_out(dD_acc, *D) : k.new_empty({0});
  return {du, dk, dD, dk_rev, dpregate, dpostgate};
}

}  // namespace fftconv
}  // namespace ssmk
