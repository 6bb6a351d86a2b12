// linear_scan ops: the argument lists, checks, allocation and params fill shared by both devices.
#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"
#include "common/varlen.h"
#include "linear_scan/linear_scan.h"

namespace ssmk {
namespace {

#define LINEAR_SCAN_FWD_ARGS(X)                                                              \
  X(Tensor, a) X(Tensor, b) X(OptTensor, initial_state) X(Bool, reverse) X(OptTensorDefaultNone, cu_seqlens) \
  X(OptTensorDefaultNone, seq_idx)
// The backward reads the forward's output h instead of b.
#define LINEAR_SCAN_BWD_ARGS(X)                                                            \
  X(Tensor, a) X(Tensor, h) X(OptTensor, initial_state) X(Tensor, dh) X(OptTensor, dlast_state) \
  X(Bool, reverse) X(OptTensorDefaultNone, cu_seqlens) X(OptTensorDefaultNone, seq_idx)
SSMK_OP_ARGS(LinearScanFwdArgs, LINEAR_SCAN_FWD_ARGS)
SSMK_OP_ARGS(LinearScanBwdArgs, LINEAR_SCAN_BWD_ARGS)

bool supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble ||
         s == at::kComplexFloat || s == at::kComplexDouble;
}

std::vector<int64_t> leading_shape(const at::Tensor& a) {
  return std::vector<int64_t>(a.sizes().begin(), a.sizes().end() - 1);
}

// The shape of initial_state and last_state: the leading shape [...], or with cu_seqlens
// [num_seqs, ...] (the batch axis, of size 1, replaced by the sequences).
std::vector<int64_t> state_shape(const at::Tensor& a, const Varlen& v) {
  std::vector<int64_t> s = leading_shape(a);
  if (v.packed()) s[0] = v.num_seqs;
  return s;
}

// `b` is the forward's b or the backward's h: the same shape, dtype and device as a. Packed
// sequences run along the last axis; the first axis is the batch (of size 1 with cu_seqlens).
template <typename Args>
Varlen check_common(const Args& in, const at::Tensor& b, const char* b_name) {
  const at::Tensor& a = in.a;
  SSMK_CHECK_VALUE(a.dim() >= 1, "a: expected at least 1 dim (..., seqlen), got shape ", a.sizes());
  SSMK_CHECK_TYPE(supported_dtype(a.scalar_type()), "a: expected dtype float32, float16, bfloat16, "
                  "float64, complex64 or complex128, got ", a.scalar_type());
  check_dtype(b, a.scalar_type(), b_name);
  check_shape(b, a.sizes(), b_name);
  check_same_device(b, a, b_name);
  SSMK_CHECK_VALUE(a.size(-1) >= 1, "a: expected seqlen >= 1, got ", a.size(-1));
  for (const auto& [t, name] : {std::pair{&in.cu_seqlens, "cu_seqlens"}, std::pair{&in.seq_idx, "seq_idx"}}) {
    SSMK_CHECK_VALUE(!*t || a.dim() >= 2, name, ": expected a of at least 2 dims (batch, ..., seqlen), got shape ",
                     a.sizes());
  }
  const Varlen v = check_cu_seqlens(in.cu_seqlens, in.seq_idx, a.size(0), a.size(-1), a);
  if (in.seq_idx) check_seq_idx(*in.seq_idx, a.size(0), a.size(-1), a);
  if (in.initial_state) {
    check_shape(*in.initial_state, state_shape(a, v), "initial_state");
    const auto s = in.initial_state->scalar_type();
    SSMK_CHECK_TYPE(at::isComplexType(s) ? a.is_complex() : at::isFloatingType(s) && !a.is_complex(),
                    "initial_state: expected a ", a.is_complex() ? "complex" : "real floating-point",
                    " dtype like a's, got ", s);
    check_same_device(*in.initial_state, a, "initial_state");
  }
  return v;
}

int64_t rows_of(const at::Tensor& a) { return a.numel() / a.size(-1); }

// The views of [..., L] as [R, L] and of [...] as [R], the state in the accumulation dtype.
at::Tensor rows_view(const at::Tensor& t) { return t.reshape({rows_of(t), t.size(-1)}); }
std::optional<at::Tensor> state_view(const std::optional<at::Tensor>& t, const at::Tensor& a) {
  return t ? std::optional<at::Tensor>(t->to(acc_dtype(a.scalar_type())).reshape({-1})) : std::nullopt;
}

template <typename T, typename Args>
void fill_common(LinearScanCommon<T>& p, const at::Tensor& a2, const std::optional<at::Tensor>& init,
                 const Args& in, const Varlen& v) {
  p.rows = a2.size(0);
  p.seqlen = a2.size(1);
  p.reverse = in.reverse;
  p.a = view<const T, 2>(a2);
  p.initial_state = view<const acc_t<T>, 1>(init);
  p.seqs = PackedSeqs{v.packed() ? ptr<int64_t>(v.offsets) : nullptr, v.num_seqs,
                      view<const int32_t, 2>(in.seq_idx)};
  p.rows_per_batch = in.a.dim() >= 2 ? p.rows / std::max<int64_t>(in.a.size(0), 1) : p.rows;
}

// The chained-carry workspace of the CUDA kernels (zeroed; empty for rows of one chunk).
template <typename T>
at::Tensor cuda_workspace(const at::Tensor& a) {
  const int64_t ints = linear_scan::cuda_workspace_ints<T>(rows_of(a), a.size(-1));
  const int64_t blocks = rows_of(a) * ((a.size(-1) + linear_scan::kChunk - 1) / linear_scan::kChunk);
  check_cuda_grid(blocks, "a");
  return at::zeros({std::max<int64_t>(ints, 1)}, a.options().dtype(at::kInt));
}

std::tuple<at::Tensor, at::Tensor> linear_scan_fwd(const LinearScanFwdArgs& in) {
  const Varlen v = check_common(in, in.b, "b");
  const auto acc = acc_dtype(in.a.scalar_type());
  at::Tensor h = new_output(in.a.sizes(), in.a.options());
  at::Tensor last = new_output(state_shape(in.a, v), in.a.options().dtype(acc));
  const auto init = state_view(in.initial_state, in.a);
  // The kernels write the final state of every non-empty sequence; an empty one keeps its
  // initial state.
  if (v.packed()) init ? last.view({-1}).copy_(*init) : last.zero_();
  if (in.a.numel() == 0) return {h, last};
  const at::Tensor a2 = rows_view(in.a), b2 = rows_view(in.b);
  SSMK_DISPATCH_FLOAT_AND_COMPLEX(in.a.scalar_type(), "linear_scan_fwd", [&] {
    using T = scalar_t;
    LinearScanFwdParams<T> p{};
    fill_common(p, a2, init, in, v);
    p.b = view<const T, 2>(b2);
    p.h = ptr<T>(h);
    p.last_state = ptr<acc_t<T>>(last);
    launch(in.a, [&] { linear_scan_fwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             linear_scan_fwd_cuda(p, ptr<int>(cuda_workspace<T>(in.a)), ctx);
           }));
  });
  return {h, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd(const LinearScanBwdArgs& in) {
  const Varlen v = check_common(in, in.h, "h");
  check_shape(in.dh, in.a.sizes(), "dh");
  check_same_device(in.dh, in.a, "dh");
  const auto dtype = in.a.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto lead = state_shape(in.a, v);
  if (in.dlast_state) {
    check_shape(*in.dlast_state, lead, "dlast_state");
    check_same_device(*in.dlast_state, in.a, "dlast_state");
  }
  // Gradients arrive in whatever dtype autograd produced; the kernels read them in a's dtype
  // (dh) and the accumulation dtype (dlast_state).
  const at::Tensor dh = in.dh.to(dtype);
  std::optional<at::Tensor> dlast;
  if (in.dlast_state) dlast = in.dlast_state->to(acc).reshape({-1});
  at::Tensor da = new_output(in.a.sizes(), in.a.options());
  at::Tensor db = new_output(in.a.sizes(), in.a.options());
  // The kernels always write the state's gradient; it is returned only for a given state.
  at::Tensor dinit = new_output(lead, in.a.options().dtype(acc));
  // An empty sequence passes its final state's gradient to its initial state unchanged.
  if (v.packed()) dlast ? dinit.view({-1}).copy_(*dlast) : dinit.zero_();
  const auto result = [&] {
    return std::make_tuple(da, db,
                           in.initial_state ? dinit.to(in.initial_state->scalar_type()) : new_grad({}, in.a));
  };
  if (in.a.numel() == 0) return result();
  const at::Tensor a2 = rows_view(in.a), h2 = rows_view(in.h), dh2 = rows_view(dh);
  const auto init = state_view(in.initial_state, in.a);
  SSMK_DISPATCH_FLOAT_AND_COMPLEX(dtype, "linear_scan_bwd", [&] {
    using T = scalar_t;
    LinearScanBwdParams<T> p{};
    fill_common(p, a2, init, in, v);
    p.h = view<const T, 2>(h2);
    p.dh = view<const T, 2>(dh2);
    p.dlast_state = view<const acc_t<T>, 1>(dlast);
    p.da = ptr<T>(da);
    p.db = ptr<T>(db);
    p.dinitial_state = ptr<acc_t<T>>(dinit);
    launch(in.a, [&] { linear_scan_bwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             linear_scan_bwd_cuda(p, ptr<int>(cuda_workspace<T>(in.a)), ctx);
           }));
  });
  return result();
}

}  // namespace
}  // namespace ssmk

// last_state is always returned (it is tiny); the Python wrapper drops it if unwanted.
SSMK_OP(linear_scan_fwd, LinearScanFwdArgs, "(Tensor h, Tensor last_state)")
SSMK_OP(linear_scan_bwd, LinearScanBwdArgs, "(Tensor da, Tensor db, Tensor dinitial_state)")
