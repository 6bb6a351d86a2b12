// causal_conv1d ops: the argument lists, checks, allocation and params fill shared by both devices.
#include "causal_conv1d/causal_conv1d.h"
#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"
#include "common/varlen.h"

namespace ssmk {
namespace {

using causal_conv1d::kMaxWidth;
using causal_conv1d::kMinWidth;

#define CAUSAL_CONV1D_FWD_ARGS(X)                                                  \
  X(Tensor, x) X(Tensor, weight) X(OptTensor, bias) X(OptTensor, initial_states) \
  X(OptTensor, seq_idx) X(Bool, silu)
#define CAUSAL_CONV1D_BWD_ARGS(X)                                                  \
  X(Tensor, x) X(Tensor, weight) X(OptTensor, bias) X(OptTensor, initial_states) \
  X(OptTensor, seq_idx) X(Tensor, dout) X(OptTensor, dfinal_states) X(Bool, silu)
// conv_state is written in place.
#define CAUSAL_CONV1D_UPDATE_ARGS(X)                                        \
  X(Tensor, x) X(MutTensor, conv_state) X(Tensor, weight) X(OptTensor, bias) \
  X(OptTensor, conv_state_indices) X(Bool, silu)
SSMK_OP_ARGS(CausalConv1dFwdArgs, CAUSAL_CONV1D_FWD_ARGS)
SSMK_OP_ARGS(CausalConv1dBwdArgs, CAUSAL_CONV1D_BWD_ARGS)
SSMK_OP_ARGS(CausalConv1dUpdateArgs, CAUSAL_CONV1D_UPDATE_ARGS)

// weight [D, W] with W in [kMinWidth, kMaxWidth], and bias [D]: any float dtype, x's device.
void check_weight_bias(const at::Tensor& x, int64_t D, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_floating(weight, "weight");
  SSMK_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == D,
                   "weight: expected shape (dim=", D, ", width), got ", weight.sizes());
  const int64_t W = weight.size(1);
  SSMK_CHECK_VALUE(W >= kMinWidth && W <= kMaxWidth, "weight: expected width in [", kMinWidth, ", ",
                   kMaxWidth, "], got ", W);
  check_same_device(weight, x, "weight");
  if (bias) {
    check_floating(*bias, "bias");
    check_shape(*bias, {D}, "bias");
    check_same_device(*bias, x, "bias");
  }
}

// The arguments the forward and backward share.
template <typename Args>
void check_common(const Args& in) {
  SSMK_CHECK_VALUE(in.x.dim() == 3, "x: expected 3 dims (batch, dim, seqlen), got shape ", in.x.sizes());
  check_floating(in.x, "x");
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2);
  SSMK_CHECK_VALUE(L >= 1, "x: expected seqlen >= 1, got ", L);
  check_weight_bias(in.x, D, in.weight, in.bias);
  const int64_t W = in.weight.size(1);
  if (in.initial_states) {
    check_shape(*in.initial_states, {B, D, W - 1}, "initial_states");
    check_dtype(*in.initial_states, in.x.scalar_type(), "initial_states");
    check_same_device(*in.initial_states, in.x, "initial_states");
  }
  if (in.seq_idx) {
    check_seq_idx(*in.seq_idx, B, L, in.x);
  }
}

// The kernels read the weight and bias contiguous, in the accumulation dtype.
at::Tensor weight_acc(const at::Tensor& weight, const at::Tensor& x) {
  return weight.to(acc_dtype(x.scalar_type())).contiguous();
}
std::optional<at::Tensor> bias_acc(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  return bias ? std::optional<at::Tensor>(weight_acc(*bias, x)) : std::nullopt;
}

// The CUDA forward and backward run one block per (batch, channel, chunk).
[[maybe_unused]] int64_t cuda_blocks(const at::Tensor& x) {
  return x.size(0) * x.size(1) * causal_conv1d::num_chunks(x.size(2));
}

template <typename T, typename Args>
void fill_common(CausalConv1dCommon<T>& p, const Args& in, const at::Tensor& w,
                 const std::optional<at::Tensor>& b) {
  p.batch = in.x.size(0);
  p.dim = in.x.size(1);
  p.seqlen = in.x.size(2);
  p.width = in.weight.size(1);
  p.silu = in.silu;
  p.x = view<const T, 3>(in.x);
  p.weight = ptr<acc_t<T>>(w);
  p.bias = ptr<acc_t<T>>(b);
  p.initial_states = view<const T, 3>(in.initial_states);
  p.seq_idx = view<const int32_t, 2>(in.seq_idx);
}

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const CausalConv1dFwdArgs& in) {
  check_common(in);
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2), W = in.weight.size(1);
  const at::Tensor w = weight_acc(in.weight, in.x);
  const auto b = bias_acc(in.bias, in.x);
  at::Tensor out = new_output({B, D, L}, in.x.options());
  at::Tensor final_states = new_output({B, D, W - 1}, in.x.options());
  SSMK_DISPATCH_FLOAT(in.x.scalar_type(), "causal_conv1d_fwd", [&] {
    using T = scalar_t;
    CausalConv1dFwdParams<T> p{};
    fill_common(p, in, w, b);
    p.out = ptr<T>(out);
    p.final_states = ptr<T>(final_states);
    launch(in.x, [&] { causal_conv1d_fwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             check_cuda_grid(cuda_blocks(in.x), "x");
             causal_conv1d_fwd_cuda(p, ctx);
           }));
  });
  return {out, final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(const CausalConv1dBwdArgs& in) {
  check_common(in);
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2), W = in.weight.size(1);
  check_shape(in.dout, {B, D, L}, "dout");
  check_same_device(in.dout, in.x, "dout");
  if (in.dfinal_states) {
    check_shape(*in.dfinal_states, {B, D, W - 1}, "dfinal_states");
    check_same_device(*in.dfinal_states, in.x, "dfinal_states");
  }
  // Gradients arrive in whatever dtype autograd produced; the kernels read them in x's dtype.
  const auto dtype = in.x.scalar_type();
  const auto acc = acc_dtype(dtype);
  const at::Tensor dout = in.dout.to(dtype);
  std::optional<at::Tensor> dfinal;
  if (in.dfinal_states) dfinal = in.dfinal_states->to(dtype);
  const at::Tensor w = weight_acc(in.weight, in.x);
  const auto b = bias_acc(in.bias, in.x);
  at::Tensor dx = new_output({B, D, L}, in.x.options());
  at::Tensor dweight = new_output({D, W}, in.x.options().dtype(acc));
  // The kernels always write the bias and initial-state gradients; returned only for given inputs.
  at::Tensor dbias = new_output({D}, in.x.options().dtype(acc));
  at::Tensor dinit = new_output({B, D, W - 1}, in.x.options());
  SSMK_DISPATCH_FLOAT(dtype, "causal_conv1d_bwd", [&] {
    using T = scalar_t;
    CausalConv1dBwdParams<T> p{};
    fill_common(p, in, w, b);
    p.dout = view<const T, 3>(dout);
    p.dfinal_states = view<const T, 3>(dfinal);
    p.dx = ptr<T>(dx);
    p.dinitial_states = ptr<T>(dinit);
    p.dweight = ptr<acc_t<T>>(dweight);
    p.dbias = ptr<acc_t<T>>(dbias);
    launch(in.x, [&] { causal_conv1d_bwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             check_cuda_grid(cuda_blocks(in.x), "x");
             const at::Tensor partials =
                 at::empty({D, B * causal_conv1d::num_chunks(L), causal_conv1d::kBwdPartials}, dweight.options());
             causal_conv1d_bwd_cuda(p, ptr<acc_t<T>>(partials), ctx);
           }));
  });
  return {dx, dweight.to(in.weight.scalar_type()),
          in.bias ? dbias.to(in.bias->scalar_type()) : new_grad({}, in.x),
          in.initial_states ? dinit : new_grad({}, in.x)};
}

at::Tensor causal_conv1d_update(const CausalConv1dUpdateArgs& in) {
  SSMK_CHECK_VALUE(in.x.dim() == 2 || in.x.dim() == 3,
                   "x: expected shape (batch, dim) or (batch, dim, seqlen), got ", in.x.sizes());
  check_floating(in.x, "x");
  check_floating(in.conv_state, "conv_state");
  const at::Tensor x = in.x.dim() == 2 ? in.x.unsqueeze(-1) : in.x;  // [B, D, L]
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  check_weight_bias(x, D, in.weight, in.bias);
  const int64_t W = in.weight.size(1);
  const at::Tensor& state = in.conv_state;
  SSMK_CHECK_VALUE(state.dim() == 3 && state.size(1) == D && state.size(2) >= W - 1,
                   "conv_state: expected shape (batch, dim=", D, ", state_len >= ", W - 1, "), got ",
                   state.sizes());
  check_same_device(state, x, "conv_state");
  const auto& indices = in.conv_state_indices;
  if (indices) {
    check_shape(*indices, {B}, "conv_state_indices");
    check_dtype(*indices, at::kInt, "conv_state_indices");
    check_same_device(*indices, x, "conv_state_indices");
    // Reading CUDA indices here would synchronise; the kernels treat an index >= the state batch
    // like a negative one (a padding row).
    if (indices->is_cpu() && B > 0) {
      const int64_t hi = indices->max().item<int32_t>();
      SSMK_CHECK_VALUE(hi < state.size(0), "conv_state_indices: expected values < conv_state batch ",
                       state.size(0), ", got ", hi);
    }
  } else {
    SSMK_CHECK_VALUE(state.size(0) == B, "conv_state: expected batch ", B, ", got ", state.size(0));
  }
  const at::Tensor w = weight_acc(in.weight, x);
  const auto b = bias_acc(in.bias, x);
  at::Tensor out = new_output({B, D, L}, x.options());
  SSMK_DISPATCH_FLOAT(x.scalar_type(), "causal_conv1d_update", [&] {
    using T = scalar_t;
    SSMK_DISPATCH_FLOAT(state.scalar_type(), "causal_conv1d_update", [&] {
      using S = scalar_t;
      CausalConv1dUpdateParams<T, S> p{};
      p.batch = B;
      p.dim = D;
      p.seqlen = L;
      p.width = W;
      p.silu = in.silu;
      p.state_batch = state.size(0);
      p.state_len = state.size(2);
      p.x = view<const T, 3>(x);
      p.conv_state = view<S, 3>(state);
      p.conv_state_indices = view<const int32_t, 1>(indices);
      p.weight = ptr<acc_t<T>>(w);
      p.bias = ptr<acc_t<T>>(b);
      p.out = ptr<T>(out);
      launch(x, [&] { causal_conv1d_update_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
               causal_conv1d_update_cuda(p, ctx);
             }));
    });
  });
  return in.x.dim() == 2 ? out.squeeze(-1) : out;
}

}  // namespace
}  // namespace ssmk

// final_states is always returned (it is tiny); the Python wrapper drops it if unwanted.
SSMK_OP(causal_conv1d_fwd, CausalConv1dFwdArgs, "(Tensor out, Tensor final_states)")
SSMK_OP(causal_conv1d_bwd, CausalConv1dBwdArgs, "(Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)")
SSMK_OP(causal_conv1d_update, CausalConv1dUpdateArgs, "Tensor")
