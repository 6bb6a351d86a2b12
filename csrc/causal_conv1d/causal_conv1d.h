// causal_conv1d: parameters, argument checks and the host-side driver shared by the CPU and CUDA
// implementations (each device only supplies its kernel launcher).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "causal_conv1d/causal_conv1d_math.h"
#include "common/checks.h"
#include "common/output.h"

namespace ssmk {

struct CausalConv1dParams {
  int64_t batch, dim, seqlen, width;
  bool silu;

  const void* x;  // [B, D, L], any strides
  int64_t x_batch_stride, x_dim_stride, x_l_stride;
  const void* weight;  // [D, W] contiguous, accumulation dtype
  const void* bias;    // [D] accumulation dtype, or nullptr
  const void* initial_states;  // [B, D, W-1], x dtype, or nullptr
  int64_t init_batch_stride, init_dim_stride, init_l_stride;
  const int32_t* seq_idx;  // [B, L] or nullptr
  int64_t seq_batch_stride, seq_l_stride;

  void* out;           // [B, D, L] contiguous
  void* final_states;  // [B, D, W-1] contiguous

  const void* dout;  // [B, D, L], any strides
  int64_t dout_batch_stride, dout_dim_stride, dout_l_stride;
  const void* dfinal_states;  // [B, D, W-1], any strides, or nullptr
  int64_t dfinal_batch_stride, dfinal_dim_stride, dfinal_l_stride;
  void* dx;                // [B, D, L] contiguous
  void* dinitial_states;   // [B, D, W-1] contiguous
  void* dweight;           // [D, W] accumulation dtype
  void* dbias;             // [D] accumulation dtype
};

struct CausalConv1dUpdateParams {
  int64_t batch, dim, seqlen, width, state_len;
  bool silu;
  const void* x;  // [B, D, L], any strides
  int64_t x_batch_stride, x_dim_stride, x_l_stride;
  void* conv_state;  // [B_state, D, S], any strides, updated in place
  int64_t state_batch, state_batch_stride, state_dim_stride, state_l_stride;
  const int32_t* state_indices;  // [B] or nullptr; negative = padding row
  int64_t indices_stride;
  const void* weight;  // [D, W] contiguous, accumulation dtype
  const void* bias;    // [D] or nullptr
  void* out;           // [B, D, L] contiguous
};

namespace causal_conv1d {

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The checks behind the Python wrapper's messages, repeated here so that a direct torch.ops call
// cannot reach a kernel with inconsistent arguments.
inline void check_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& initial_states,
                       const std::optional<at::Tensor>& seq_idx) {
  SSMK_CHECK_VALUE(x.dim() == 3, "x: expected 3 dims (batch, dim, seqlen), got shape ", x.sizes());
  check_floating(x, "x");
  check_floating(weight, "weight");
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  SSMK_CHECK_VALUE(L >= 1, "x: expected seqlen >= 1, got ", L);
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
  if (initial_states) {
    check_shape(*initial_states, {B, D, W - 1}, "initial_states");
    check_dtype(*initial_states, x.scalar_type(), "initial_states");
    check_same_device(*initial_states, x, "initial_states");
  }
  if (seq_idx) {
    check_shape(*seq_idx, {B, L}, "seq_idx");
    check_dtype(*seq_idx, at::kInt, "seq_idx");
    check_same_device(*seq_idx, x, "seq_idx");
  }
}

inline void set_common_params(CausalConv1dParams& p, const at::Tensor& x, const at::Tensor& weight_acc,
                              const std::optional<at::Tensor>& bias_acc,
                              const std::optional<at::Tensor>& initial_states,
                              const std::optional<at::Tensor>& seq_idx, bool silu) {
  p = CausalConv1dParams{};
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = weight_acc.size(1);
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_dim_stride = x.stride(1);
  p.x_l_stride = x.stride(2);
  p.weight = weight_acc.data_ptr();
  p.bias = bias_acc ? bias_acc->data_ptr() : nullptr;
  if (initial_states) {
    p.initial_states = initial_states->data_ptr();
    p.init_batch_stride = initial_states->stride(0);
    p.init_dim_stride = initial_states->stride(1);
    p.init_l_stride = initial_states->stride(2);
  }
  if (seq_idx) {
    p.seq_idx = seq_idx->data_ptr<int32_t>();
    p.seq_batch_stride = seq_idx->stride(0);
    p.seq_l_stride = seq_idx->stride(1);
  }
}

// Forward driver: checks, allocation, parameters; `launch(params, x_dtype)` runs the device kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& initial_states,
                                       const std::optional<at::Tensor>& seq_idx, bool silu,
                                       Launch&& launch) {
  check_args(x, weight, bias, initial_states, seq_idx);
  const auto acc = acc_dtype(x);
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  std::optional<at::Tensor> bias_acc;
  if (bias) bias_acc = bias->to(acc).contiguous();
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  at::Tensor out = new_output({B, D, L}, x.options());
  at::Tensor final_states = new_output({B, D, W - 1}, x.options());
  CausalConv1dParams p;
  set_common_params(p, x, weight_acc, bias_acc, initial_states, seq_idx, silu);
  p.out = out.data_ptr();
  p.final_states = final_states.data_ptr();
  launch(p, x.scalar_type());
  return {out, final_states};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx,
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, bool silu,
    Launch&& launch) {
  check_args(x, weight, bias, initial_states, seq_idx);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  check_shape(dout, {B, D, L}, "dout");
  check_same_device(dout, x, "dout");
  const auto acc = acc_dtype(x);
  // dout arrives in whatever dtype autograd produced; kernels read it in x's dtype.
  const at::Tensor dout_x = dout.scalar_type() == x.scalar_type() ? dout : dout.to(x.scalar_type());
  std::optional<at::Tensor> dfinal_x;
  if (dfinal_states) {
    check_shape(*dfinal_states, {B, D, W - 1}, "dfinal_states");
    check_same_device(*dfinal_states, x, "dfinal_states");
    dfinal_x = dfinal_states->to(x.scalar_type());
  }
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  std::optional<at::Tensor> bias_acc;
  if (bias) bias_acc = bias->to(acc).contiguous();

  at::Tensor dx = new_output({B, D, L}, x.options());
  at::Tensor dinit = new_output({B, D, W - 1}, x.options());
  at::Tensor dweight = new_output({D, W}, x.options().dtype(acc));
  at::Tensor dbias = new_output({D}, x.options().dtype(acc));
  CausalConv1dParams p;
  set_common_params(p, x, weight_acc, bias_acc, initial_states, seq_idx, silu);
  p.dout = dout_x.data_ptr();
  p.dout_batch_stride = dout_x.stride(0);
  p.dout_dim_stride = dout_x.stride(1);
  p.dout_l_stride = dout_x.stride(2);
  if (dfinal_x) {
    p.dfinal_states = dfinal_x->data_ptr();
    p.dfinal_batch_stride = dfinal_x->stride(0);
    p.dfinal_dim_stride = dfinal_x->stride(1);
    p.dfinal_l_stride = dfinal_x->stride(2);
  }
  p.dx = dx.data_ptr();
  p.dinitial_states = dinit.data_ptr();
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
  launch(p, x.scalar_type());
  const auto bias_dtype = bias ? bias->scalar_type() : weight.scalar_type();
  return {dx, dweight.to(weight.scalar_type()), dbias.to(bias_dtype), dinit};
}

template <typename Launch>
at::Tensor update(const at::Tensor& x_in, const at::Tensor& conv_state, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& conv_state_indices, bool silu, Launch&& launch) {
  SSMK_CHECK_VALUE(x_in.dim() == 2 || x_in.dim() == 3,
                   "x: expected shape (batch, dim) or (batch, dim, seqlen), got ", x_in.sizes());
  check_floating(x_in, "x");
  check_floating(conv_state, "conv_state");
  check_floating(weight, "weight");
  const at::Tensor x = x_in.dim() == 2 ? x_in.unsqueeze(-1) : x_in;
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  SSMK_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == D,
                   "weight: expected shape (dim=", D, ", width), got ", weight.sizes());
  const int64_t W = weight.size(1);
  SSMK_CHECK_VALUE(W >= kMinWidth && W <= kMaxWidth, "weight: expected width in [", kMinWidth, ", ",
                   kMaxWidth, "], got ", W);
  SSMK_CHECK_VALUE(conv_state.dim() == 3 && conv_state.size(1) == D && conv_state.size(2) >= W - 1,
                   "conv_state: expected shape (batch, dim=", D, ", state_len >= ", W - 1,
                   "), got ", conv_state.sizes());
  check_same_device(conv_state, x, "conv_state");
  check_same_device(weight, x, "weight");
  if (conv_state_indices) {
    check_shape(*conv_state_indices, {B}, "conv_state_indices");
    check_dtype(*conv_state_indices, at::kInt, "conv_state_indices");
    check_same_device(*conv_state_indices, x, "conv_state_indices");
  } else {
    SSMK_CHECK_VALUE(conv_state.size(0) == B, "conv_state: expected batch ", B, ", got ",
                     conv_state.size(0));
  }
  if (bias) {
    check_floating(*bias, "bias");
    check_shape(*bias, {D}, "bias");
    check_same_device(*bias, x, "bias");
  }
  const auto acc = acc_dtype(x);
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  std::optional<at::Tensor> bias_acc;
  if (bias) bias_acc = bias->to(acc).contiguous();
  at::Tensor out = new_output({B, D, L}, x.options());

  CausalConv1dUpdateParams p{};
  p.batch = B;
  p.dim = D;
  p.seqlen = L;
  p.width = W;
  p.state_len = conv_state.size(2);
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_dim_stride = x.stride(1);
  p.x_l_stride = x.stride(2);
  p.conv_state = conv_state.data_ptr();
  p.state_batch = conv_state.size(0);
  p.state_batch_stride = conv_state.stride(0);
  p.state_dim_stride = conv_state.stride(1);
  p.state_l_stride = conv_state.stride(2);
  if (conv_state_indices) {
    p.state_indices = conv_state_indices->data_ptr<int32_t>();
    p.indices_stride = conv_state_indices->stride(0);
  }
  p.weight = weight_acc.data_ptr();
  p.bias = bias_acc ? bias_acc->data_ptr() : nullptr;
  p.out = out.data_ptr();
  launch(p, x.scalar_type(), conv_state.scalar_type());
  return x_in.dim() == 2 ? out.squeeze(-1) : out;
}

}  // namespace causal_conv1d
}  // namespace ssmk
