// causal_conv1d ops: the argument lists, checks, allocation and params fill shared by both devices.
#include "causal_conv1d/causal_conv1d.h"
#include "common/dispatch.h"
#include "common/op_library.h"
#include "common/output.h"
#include "common/varlen.h"

#include <atomic>

namespace ssmk {
namespace {

// Packed sequences: the CPU kernels walk each sequence as a segment of the row (offsets read on
// the host). CUDA runs the extended row below (offsets only read on the device); a test switch
// runs the CPU through it too, so the CUDA path's host logic is tested without a GPU.
std::atomic<bool>& extended_row_on_cpu() {
  static std::atomic<bool> flag{false};
  return flag;
}
bool set_packed_extended_row(bool enable) { return extended_row_on_cpu().exchange(enable); }

bool packed_via_extended_row(const at::Tensor& x) {
  return !x.is_cpu() || extended_row_on_cpu().load(std::memory_order_relaxed);
}

using causal_conv1d::kMaxWidth;
using causal_conv1d::kMinWidth;

#define CAUSAL_CONV1D_FWD_ARGS(X)                                                  \
  X(Tensor, x) X(Tensor, weight) X(OptTensor, bias) X(OptTensor, initial_states) \
  X(OptTensor, seq_idx) X(Bool, silu) X(OptTensorDefaultNone, cu_seqlens)
#define CAUSAL_CONV1D_BWD_ARGS(X)                                                  \
  X(Tensor, x) X(Tensor, weight) X(OptTensor, bias) X(OptTensor, initial_states) \
  X(OptTensor, seq_idx) X(Tensor, dout) X(OptTensor, dfinal_states) X(Bool, silu) X(OptTensorDefaultNone, cu_seqlens)
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

// The arguments the forward and backward share; returns the packed-sequence layout.
template <typename Args>
Varlen check_common(const Args& in) {
  SSMK_CHECK_VALUE(in.x.dim() == 3, "x: expected 3 dims (batch, dim, seqlen), got shape ", in.x.sizes());
  check_floating(in.x, "x");
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2);
  SSMK_CHECK_VALUE(L >= 1, "x: expected seqlen >= 1, got ", L);
  check_weight_bias(in.x, D, in.weight, in.bias);
  const int64_t W = in.weight.size(1);
  const Varlen v = check_cu_seqlens(in.cu_seqlens, in.seq_idx, B, L, in.x);
  if (in.initial_states) {
    // Packed sequences: one initial state per sequence.
    check_shape(*in.initial_states, {v.packed() ? v.num_seqs : B, D, W - 1}, "initial_states");
    check_dtype(*in.initial_states, in.x.scalar_type(), "initial_states");
    check_same_device(*in.initial_states, in.x, "initial_states");
  }
  if (in.seq_idx) {
    check_seq_idx(*in.seq_idx, B, L, in.x);
  }
  return v;
}

// Packed sequences run as one plain row in which each sequence is preceded by its W-1 history
// slots (its initial state, or zeros): sequence s occupies [off[s] + s (W-1), off[s + 1] +
// (s + 1)(W-1)) of the extended row. Taps then never reach another sequence, and the last W-1
// entries of a sequence's segment are its final state (its initial state filling in when it is
// shorter than W-1). The maps are built on the device from the offsets; sizes come from shapes.
struct ConvPacking {
  int64_t num_seqs = 0, width = 0, ext_len = 0;
  at::Tensor token_pos;    // [L] int64: extended position of each token
  at::Tensor history_pos;  // [S * (W-1)] int64: extended positions of the history slots, (s, j) order
  at::Tensor final_pos;    // [S * (W-1)] int64: extended positions of the final states, (s, j) order
  at::Tensor source;       // [ext_len] int64: column of cat(x row, history slots) at each position

  // [1, D, ext_len]: the x row with each sequence's history in front of it.
  at::Tensor extend(const at::Tensor& x, const std::optional<at::Tensor>& init) const {
    const int64_t D = x.size(1), W1 = width - 1;
    const at::Tensor hist = init ? init->permute({1, 0, 2}).reshape({D, num_seqs * W1})
                                 : at::zeros({D, num_seqs * W1}, x.options());
    return at::cat({x.select(0, 0), hist}, 1).index_select(1, source).unsqueeze(0);
  }
  // [1, D, ext_len] -> [S, D, W-1] at `pos` ((s, j) order).
  at::Tensor per_sequence(const at::Tensor& ext, const at::Tensor& pos) const {
    const int64_t D = ext.size(1);
    return ext.select(0, 0).index_select(1, pos).view({D, num_seqs, width - 1}).permute({1, 0, 2}).contiguous();
  }
};

ConvPacking make_conv_packing(const Varlen& v, int64_t L, int64_t W) {
  ConvPacking k;
  const at::Tensor& off = v.offsets;
  const int64_t S = v.num_seqs, W1 = W - 1;
  k.num_seqs = S;
  k.width = W;
  k.ext_len = L + S * W1;
  const auto opts = off.options();
  const at::Tensor tokens = at::arange(L, opts);
  const at::Tensor seq = at::searchsorted(off, tokens, /*out_int32=*/false, /*right=*/true) - 1;
  k.token_pos = tokens + (seq + 1) * W1;
  const at::Tensor seqs = at::arange(S, opts).unsqueeze(1);  // [S, 1]
  const at::Tensor j = at::arange(W1, opts).unsqueeze(0);    // [1, W-1]
  k.history_pos = (off.narrow(0, 0, S).unsqueeze(1) + seqs * W1 + j).reshape({-1});
  k.final_pos = (off.narrow(0, 1, S).unsqueeze(1) + seqs * W1 + j).reshape({-1});
  k.source = at::empty({k.ext_len}, opts)
                 .index_copy_(0, k.token_pos, tokens)
                 .index_copy_(0, k.history_pos, at::arange(L, L + S * W1, opts));
  return k;
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
                 const std::optional<at::Tensor>& b, const Varlen& v) {
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
  p.offsets = v.packed() ? v.offsets.data_ptr<int64_t>() : nullptr;  // CPU only (see above)
  p.num_seqs = v.num_seqs;
}

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const CausalConv1dFwdArgs& in) {
  const Varlen v = check_common(in);
  if (v.packed() && packed_via_extended_row(in.x)) {
    const ConvPacking k = make_conv_packing(v, in.x.size(2), in.weight.size(1));
    CausalConv1dFwdArgs ext = in;
    ext.x = k.extend(in.x, in.initial_states);
    ext.initial_states = std::nullopt;
    ext.cu_seqlens = std::nullopt;
    const auto [out_ext, unused] = causal_conv1d_fwd(ext);
    return {out_ext.index_select(2, k.token_pos), k.per_sequence(ext.x, k.final_pos)};
  }
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2), W = in.weight.size(1);
  const at::Tensor w = weight_acc(in.weight, in.x);
  const auto b = bias_acc(in.bias, in.x);
  at::Tensor out = new_output({B, D, L}, in.x.options());
  at::Tensor final_states = new_output({v.packed() ? v.num_seqs : B, D, W - 1}, in.x.options());
  SSMK_DISPATCH_FLOAT(in.x.scalar_type(), "causal_conv1d_fwd", [&] {
    using T = scalar_t;
    CausalConv1dFwdParams<T> p{};
    fill_common(p, in, w, b, v);
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
  const Varlen v = check_common(in);
  const int64_t B = in.x.size(0), D = in.x.size(1), L = in.x.size(2), W = in.weight.size(1);
  check_shape(in.dout, {B, D, L}, "dout");
  check_same_device(in.dout, in.x, "dout");
  if (in.dfinal_states) {
    check_shape(*in.dfinal_states, {v.packed() ? v.num_seqs : B, D, W - 1}, "dfinal_states");
    check_same_device(*in.dfinal_states, in.x, "dfinal_states");
  }
  if (v.packed() && packed_via_extended_row(in.x)) {
    // The plain backward on the extended row; the final states' gradients land on their slots,
    // and the history slots' gradients are the initial states'.
    const ConvPacking k = make_conv_packing(v, L, W);
    CausalConv1dBwdArgs ext = in;
    ext.x = k.extend(in.x, in.initial_states);
    ext.initial_states = std::nullopt;
    ext.cu_seqlens = std::nullopt;
    ext.dfinal_states = std::nullopt;
    ext.dout = at::zeros({1, D, k.ext_len}, in.x.options()).index_copy_(2, k.token_pos, in.dout.to(in.x.scalar_type()));
    auto [dx_ext, dweight, dbias, unused] = causal_conv1d_bwd(ext);
    if (in.dfinal_states) {
      const at::Tensor dfin = in.dfinal_states->to(in.x.scalar_type()).permute({1, 0, 2}).reshape({D, -1});
      dx_ext.select(0, 0).index_add_(1, k.final_pos, dfin);
    }
    at::Tensor dx = dx_ext.index_select(2, k.token_pos);
    at::Tensor dinit = in.initial_states ? k.per_sequence(dx_ext, k.history_pos) : new_grad({}, in.x);
    return {dx, dweight, dbias, dinit};
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
  at::Tensor dinit = new_output({v.packed() ? v.num_seqs : B, D, W - 1}, in.x.options());
  SSMK_DISPATCH_FLOAT(dtype, "causal_conv1d_bwd", [&] {
    using T = scalar_t;
    CausalConv1dBwdParams<T> p{};
    fill_common(p, in, w, b, v);
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

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  // Packed causal_conv1d on the CPU through the CUDA path's extended row; returns the old value.
  m.def("set_causal_conv1d_packed_extended_row(bool enable) -> bool", &ssmk::set_packed_extended_row);
}
