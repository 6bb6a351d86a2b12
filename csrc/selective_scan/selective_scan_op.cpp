// selective_scan and selective_state_update ops: the argument lists, checks, allocation, params
// fill and the reductions of the per-row gradients, shared by both devices.
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>

#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"
#include "common/static_switch.h"
#include "common/varlen.h"
#include "selective_scan/selective_scan.h"

namespace ssmk {
namespace {

using selective_scan::kMaxDstate;
using selective_scan::num_chunks;

#define SELECTIVE_SCAN_INPUT_ARGS(X)                                                                \
  X(Tensor, u) X(Tensor, delta) X(Tensor, A) X(Tensor, B) X(Tensor, C) X(OptTensor, D) X(OptTensor, z) \
  X(OptTensor, delta_bias) X(Bool, delta_softplus) X(OptTensor, initial_state)
#define SELECTIVE_SCAN_PACKING_ARGS(X) X(OptTensorDefaultNone, cu_seqlens) X(OptTensorDefaultNone, seq_idx)
#define SELECTIVE_SCAN_FWD_ARGS(X) SELECTIVE_SCAN_INPUT_ARGS(X) SELECTIVE_SCAN_PACKING_ARGS(X)
// The backward also reads the forward's checkpoints and the gradients of out and last_state.
#define SELECTIVE_SCAN_BWD_ARGS(X)                                                                  \
  SELECTIVE_SCAN_INPUT_ARGS(X) X(Tensor, checkpoints) X(Tensor, dout) X(OptTensor, dlast_state) \
  SELECTIVE_SCAN_PACKING_ARGS(X)
// state is updated in place.
#define SELECTIVE_STATE_UPDATE_ARGS(X)                                                            \
  X(MutTensor, state) X(Tensor, x) X(Tensor, dt) X(Tensor, A) X(Tensor, B) X(Tensor, C) X(OptTensor, D) \
  X(OptTensor, z) X(OptTensor, dt_bias) X(Bool, dt_softplus) X(OptTensor, state_batch_indices)
SSMK_OP_ARGS(SelectiveScanFwdArgs, SELECTIVE_SCAN_FWD_ARGS)
SSMK_OP_ARGS(SelectiveScanBwdArgs, SELECTIVE_SCAN_BWD_ARGS)
SSMK_OP_ARGS(SelectiveStateUpdateArgs, SELECTIVE_STATE_UPDATE_ARGS)

at::ScalarType state_dtype(const at::Tensor& u, bool is_complex) {
  const auto acc = acc_dtype(u.scalar_type());
  if (!is_complex) return acc;
  return acc == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
}

// The CUDA grid's y dimension is the batch.
void check_grid(const at::Tensor& u) {
  SSMK_CHECK_VALUE(u.is_cpu() || u.size(0) <= 65535, "u: expected batch <= 65535 on CUDA, got ", u.size(0));
}

void check_bc(const at::Tensor& t, const char* name, const at::Tensor& u, const at::Tensor& A) {
  const int64_t B = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1);
  check_same_device(t, u, name);
  if (t.dim() == 2) {
    SSMK_CHECK_VALUE(t.size(0) == D && t.size(1) == N, name, ": expected fixed shape (dim=", D,
                     ", dstate=", N, "), got ", t.sizes());
    SSMK_CHECK_TYPE(t.is_complex() == A.is_complex(), name, ": expected a ",
                    A.is_complex() ? "complex" : "real", " tensor like A, got ", t.scalar_type());
    if (!t.is_complex()) check_floating(t, name);
    return;
  }
  SSMK_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, name,
                   ": expected 2 (fixed), 3 (variable) or 4 (grouped) dims, got shape ", t.sizes());
  if (t.dim() == 3) {
    SSMK_CHECK_VALUE(t.size(0) == B && t.size(1) == N && t.size(2) == L, name,
                     ": expected variable shape (batch=", B, ", dstate=", N, ", seqlen=", L,
                     "), got ", t.sizes());
  } else {
    SSMK_CHECK_VALUE(t.size(0) == B && t.size(1) >= 1 && t.size(2) == N && t.size(3) == L, name,
                     ": expected grouped shape (batch=", B, ", groups, dstate=", N, ", seqlen=", L,
                     "), got ", t.sizes());
    SSMK_CHECK_VALUE(D % t.size(1) == 0, name, ": expected groups dividing dim=", D, ", got groups=",
                     t.size(1));
  }
  if (A.is_complex()) {
    SSMK_CHECK_TYPE(t.scalar_type() == A.scalar_type(), name, ": expected dtype ", A.scalar_type(),
                    " (variable B/C are complex like A), got ", t.scalar_type());
  } else {
    SSMK_CHECK_TYPE(t.scalar_type() == u.scalar_type(), name, ": expected the dtype of u (",
                    u.scalar_type(), "), got ", t.scalar_type());
  }
}

// The forward's inputs, which the backward takes too (Args: either op's args). Returns the packed
// layout (initial_state and last_state are [num_seqs, D, N] with cu_seqlens).
template <typename Args>
Varlen check_scan_args(const Args& in) {
  const at::Tensor& u = in.u;
  SSMK_CHECK_VALUE(u.dim() == 3, "u: expected 3 dims (batch, dim, seqlen), got shape ", u.sizes());
  check_floating(u, "u");
  const int64_t Bt = u.size(0), Dm = u.size(1), L = u.size(2);
  SSMK_CHECK_VALUE(L >= 1, "u: expected seqlen >= 1, got ", L);
  check_shape(in.delta, u.sizes(), "delta");
  check_dtype(in.delta, u.scalar_type(), "delta");
  check_same_device(in.delta, u, "delta");
  const at::Tensor& A = in.A;
  SSMK_CHECK_VALUE(A.dim() == 2 && A.size(0) == Dm, "A: expected shape (dim=", Dm, ", dstate), got ",
                   A.sizes());
  SSMK_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble ||
                      A.scalar_type() == at::kComplexFloat || A.scalar_type() == at::kComplexDouble,
                  "A: expected dtype float32 or complex64, got ", A.scalar_type());
  check_same_device(A, u, "A");
  const int64_t N = A.size(1);
  SSMK_CHECK_VALUE(N >= 1 && N <= kMaxDstate, "A: expected dstate in [1, ", kMaxDstate, "], got ", N);
  check_bc(in.B, "B", u, A);
  check_bc(in.C, "C", u, A);
  for (const auto& [t, name] : {std::pair{&in.D, "D"}, std::pair{&in.delta_bias, "delta_bias"}}) {
    if (!*t) continue;
    check_shape(**t, {Dm}, name);
    check_floating(**t, name);
    check_same_device(**t, u, name);
  }
  if (in.z) {
    check_shape(*in.z, u.sizes(), "z");
    check_dtype(*in.z, u.scalar_type(), "z");
    check_same_device(*in.z, u, "z");
  }
  const Varlen v = check_cu_seqlens(in.cu_seqlens, in.seq_idx, Bt, L, u);
  if (in.seq_idx) check_seq_idx(*in.seq_idx, Bt, L, u);
  if (in.initial_state) {
    const at::Tensor& s = *in.initial_state;
    check_shape(s, {v.packed() ? v.num_seqs : Bt, Dm, N}, "initial_state");
    SSMK_CHECK_TYPE(s.is_complex() == A.is_complex(), "initial_state: expected a ",
                    A.is_complex() ? "complex" : "real", " tensor like A, got ", s.scalar_type());
    if (!s.is_complex()) check_floating(s, "initial_state");
    check_same_device(s, u, "initial_state");
  }
  return v;
}

// The inputs in the dtypes the kernels read (kept alive for the duration of the call).
struct Prepared {
  bool is_complex;
  int64_t batch, dim, seqlen, dstate;
  Varlen varlen;
  int64_t state_batch;                      // batch, or num_seqs with cu_seqlens
  at::Tensor A;                             // [D, N] W
  at::Tensor B, C;                          // fixed: [D, N] W; variable: [B, G, N, L] (a view)
  std::optional<at::Tensor> D, delta_bias;  // [D] acc
  std::optional<at::Tensor> initial_state;  // [state_batch, D, N] W
};

template <typename Args>
Prepared prepare(const Args& in, const Varlen& v) {
  Prepared pr;
  pr.varlen = v;
  pr.is_complex = in.A.is_complex();
  pr.batch = in.u.size(0);
  pr.dim = in.u.size(1);
  pr.seqlen = in.u.size(2);
  pr.dstate = in.A.size(1);
  pr.state_batch = v.packed() ? v.num_seqs : pr.batch;
  const auto w = state_dtype(in.u, pr.is_complex);
  const auto acc = acc_dtype(in.u.scalar_type());
  pr.A = in.A.to(w).contiguous();
  auto bc = [&](const at::Tensor& t) {
    if (t.dim() == 2) return t.to(w).contiguous();
    // Complex variable B/C are read in the state type; real ones in u's dtype (as given).
    const at::Tensor v = pr.is_complex ? t.to(w) : t;
    return v.dim() == 3 ? v.unsqueeze(1) : v;
  };
  pr.B = bc(in.B);
  pr.C = bc(in.C);
  if (in.D) pr.D = in.D->to(acc).contiguous();
  if (in.delta_bias) pr.delta_bias = in.delta_bias->to(acc).contiguous();
  if (in.initial_state) pr.initial_state = in.initial_state->to(w);
  return pr;
}

template <typename BC>
BC bc_param(const at::Tensor& t) {
  using W = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<BC>().fixed)>>;
  using V = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<BC>().var.data)>>;
  BC op{};
  op.variable = t.dim() == 4;
  if (op.variable) {
    op.groups = t.size(1);
    op.var = view<const V, 4>(t);
  } else {
    op.fixed = ptr<W>(t);
  }
  return op;
}

template <typename T, bool kComplex, typename Args>
void fill_common(SelectiveScanCommon<T, kComplex>& p, const Prepared& pr, const Args& in) {
  using P = SelectiveScanCommon<T, kComplex>;
  using W = typename P::W;
  p.batch = pr.batch;
  p.dim = pr.dim;
  p.seqlen = pr.seqlen;
  p.dstate = pr.dstate;
  p.n_chunks = num_chunks(pr.seqlen);
  p.delta_softplus = in.delta_softplus;
  p.u = view<const T, 3>(in.u);
  p.delta = view<const T, 3>(in.delta);
  p.z = view<const T, 3>(in.z);
  p.A = ptr<W>(pr.A);
  p.B = bc_param<typename P::BC>(pr.B);
  p.C = bc_param<typename P::BC>(pr.C);
  p.D = ptr<acc_t<T>>(pr.D);
  p.delta_bias = ptr<acc_t<T>>(pr.delta_bias);
  p.initial_state = view<const W, 3>(pr.initial_state);
  p.seqs = PackedSeqs{pr.varlen.packed() ? ptr<int64_t>(pr.varlen.offsets) : nullptr, pr.varlen.num_seqs,
                      view<const int32_t, 2>(in.seq_idx)};
}

// The CPU kernels' layout (selective_scan.h): complex [..., N] values split into [..., 2, N] real
// blocks; variable B/C as [B, G, L, NW] in acc.
at::Tensor split_complex(const at::Tensor& t) {
  const at::Tensor r = at::view_as_real(t);  // [..., N, 2]
  return r.transpose(-1, -2).contiguous();
}

at::Tensor cpu_operand_data(const at::Tensor& t, bool is_complex, at::ScalarType acc) {
  if (t.dim() == 2) return is_complex ? split_complex(t) : t.contiguous();  // [D, NW]
  const at::Tensor tl = t.transpose(2, 3);                                   // [B, G, L, N]
  return is_complex ? split_complex(tl.to(t.scalar_type())) : tl.to(acc).contiguous();
}

struct CpuLayoutTensors {
  at::Tensor A, B, C;
};

CpuLayoutTensors cpu_layout_tensors(const Prepared& pr, at::ScalarType acc) {
  return {pr.is_complex ? split_complex(pr.A) : pr.A, cpu_operand_data(pr.B, pr.is_complex, acc),
          cpu_operand_data(pr.C, pr.is_complex, acc)};
}

template <typename acc>
SelectiveScanCpuLayout<acc> cpu_layout(const Prepared& pr, const CpuLayoutTensors& t) {
  SelectiveScanCpuLayout<acc> lay{};
  lay.nw = pr.is_complex ? 2 * pr.dstate : pr.dstate;
  lay.A = ptr<acc>(t.A);
  auto operand = [&](const at::Tensor& src, const at::Tensor& data) {
    SelectiveScanCpuOperand<acc> op{ptr<acc>(data), src.dim() == 4, 1, 0};
    if (op.variable) {
      op.groups = src.size(1);
      op.step = lay.nw;
    }
    return op;
  };
  lay.B = operand(pr.B, t.B);
  lay.C = operand(pr.C, t.C);
  return lay;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(const SelectiveScanFwdArgs& in) {
  const Varlen v = check_scan_args(in);
  check_grid(in.u);
  const Prepared pr = prepare(in, v);
  const auto w = state_dtype(in.u, pr.is_complex);
  const int64_t nc = num_chunks(pr.seqlen);
  at::Tensor out = new_output({pr.batch, pr.dim, pr.seqlen}, in.u.options());
  at::Tensor last_state = new_output({pr.state_batch, pr.dim, pr.dstate}, in.u.options().dtype(w));
  // The kernels write the final state of every non-empty sequence; an empty one keeps its
  // initial state.
  if (v.packed()) pr.initial_state ? last_state.copy_(*pr.initial_state) : last_state.zero_();
  at::Tensor checkpoints = new_output({pr.batch, pr.dim, nc, pr.dstate}, in.u.options().dtype(w));
  if (in.u.numel() == 0) return {out, last_state, checkpoints};
  const auto acc = acc_dtype(in.u.scalar_type());
  const CpuLayoutTensors cpu = in.u.is_cpu() ? cpu_layout_tensors(pr, acc) : CpuLayoutTensors{};
  SSMK_DISPATCH_FLOAT(in.u.scalar_type(), "selective_scan_fwd", [&] {
    using T = scalar_t;
    SSMK_BOOL_SWITCH(pr.is_complex, kComplex, [&] {
      using W = selective_scan_state_t<T, kComplex>;
      SelectiveScanFwdParams<T, kComplex> p{};
      fill_common(p, pr, in);
      p.out = ptr<T>(out);
      p.last_state = ptr<W>(last_state);
      p.checkpoints = ptr<W>(checkpoints);
      launch(in.u, [&] { selective_scan_fwd_cpu(p, cpu_layout<acc_t<T>>(pr, cpu)); }
             SSMK_CUDA([&](const CudaContext& ctx) { selective_scan_fwd_cuda(p, ctx); }));
    });
  });
  return {out, last_state, checkpoints};
}

// Channels per backward slice: a divisor of the group sizes of every variable B/C (a slice never
// straddles two groups). The largest one that still gives `target` independent tasks (`rows` per
// slice: batch rows, or non-empty packed sequences), so the partial sums stay small. Depends only
// on the shapes and lengths, so the summation order (and the result) is the same on every run.
int64_t choose_slice_channels(const Prepared& pr, int64_t rows, int64_t target) {
  const bool bv = pr.B.dim() == 4, cv = pr.C.dim() == 4;
  if (!bv && !cv) return 1;
  int64_t g = pr.dim;
  if (bv) g = std::gcd(g, pr.dim / pr.B.size(1));
  if (cv) g = std::gcd(g, pr.dim / pr.C.size(1));
  for (int64_t cs = g; cs > 1; --cs) {
    if (g % cs == 0 && rows * (pr.dim / cs) >= target) return cs;
  }
  return 1;
}

// Sums the per-slice partials ([S, B, L, N] time-major on the CPU, [S, B, N, L] on CUDA, in W) of
// a variable B/C gradient over the slices of each group (in slice order) into the gradient's shape
// [B, G, N, L] (or [B, N, L] for ungrouped variable input).
at::Tensor reduce_partial(const at::Tensor& partial, const Prepared& pr, int64_t n_slices, int64_t groups,
                          bool time_major, const at::Tensor& like) {
  const int64_t per_group = n_slices / groups;
  at::Tensor g;
  if (time_major) {
    g = partial.view({groups, per_group, pr.batch, pr.seqlen, pr.dstate}).sum(1).permute({1, 0, 3, 2});
  } else {
    g = partial.view({groups, per_group, pr.batch, pr.dstate, pr.seqlen}).sum(1).permute({1, 0, 2, 3});
  }
  g = g.to(like.scalar_type()).contiguous();
  return like.dim() == 3 ? g.squeeze(1) : g;
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;

BwdResult selective_scan_bwd(const SelectiveScanBwdArgs& in) {
  const Varlen v = check_scan_args(in);
  check_grid(in.u);
  const at::Tensor& u = in.u;
  const Prepared pr = prepare(in, v);
  const auto w = state_dtype(u, pr.is_complex);
  const auto acc = acc_dtype(u.scalar_type());
  const int64_t Bt = pr.batch, Dm = pr.dim, L = pr.seqlen, N = pr.dstate, Bs = pr.state_batch;
  check_shape(in.checkpoints, {Bt, Dm, num_chunks(L), N}, "checkpoints");
  check_dtype(in.checkpoints, w, "checkpoints");
  check_same_device(in.checkpoints, u, "checkpoints");
  SSMK_CHECK_VALUE(in.checkpoints.is_contiguous(), "checkpoints: expected a contiguous tensor");
  check_shape(in.dout, u.sizes(), "dout");
  check_same_device(in.dout, u, "dout");
  if (in.dlast_state) {
    check_shape(*in.dlast_state, {Bs, Dm, N}, "dlast_state");
    check_same_device(*in.dlast_state, u, "dlast_state");
  }
  // Gradients arrive in whatever dtype autograd produced; the kernels read dout in u's dtype and
  // dlast_state in the state type.
  const at::Tensor dout = in.dout.to(u.scalar_type());
  std::optional<at::Tensor> dlast;
  if (in.dlast_state) dlast = in.dlast_state->to(w);

  const bool cpu = u.is_cpu();
  // The CPU splits packed rows over (slice, sequence) tasks with per-sequence sums over time
  // (rows of the sums buffers); CUDA over batch rows.
  const bool seq_rows = cpu && v.packed();
  int64_t task_rows = Bt;
  if (seq_rows) {
    const at::Tensor off = v.offsets;  // CPU: read on the host
    const int64_t* o = off.data_ptr<int64_t>();
    task_rows = 0;
    for (int64_t s = 0; s < v.num_seqs; ++s) task_rows += o[s + 1] > o[s] ? 1 : 0;
  }
  const int64_t sum_rows = seq_rows ? v.num_seqs : Bt;
  // 64 CPU tasks keep two to a few dozen cores busy while the variable-B/C partials stay small;
  // about a thousand CUDA blocks fill any current GPU several times over while bounding the
  // partials at ~1000 x N x L values.
  const int64_t slice_channels = choose_slice_channels(pr, task_rows, cpu ? 64 : 1024);
  const int64_t n_slices = Dm / slice_channels;
  const bool b_var = pr.B.dim() == 4, c_var = pr.C.dim() == 4;

  const auto wopt = u.options().dtype(w);
  at::Tensor du = new_output({Bt, Dm, L}, u.options());
  at::Tensor ddelta = new_output({Bt, Dm, L}, u.options());
  at::Tensor dz = in.z ? new_output({Bt, Dm, L}, u.options()) : new_grad({}, u);
  // The kernels always write these per-row sums (zeros for the rows of empty sequences); dD,
  // ddelta_bias and dinitial_state are returned only for a given input.
  const auto sums = [&](at::IntArrayRef shape, const at::TensorOptions& opt) {
    return seq_rows ? at::zeros(shape, opt) : new_output(shape, opt);
  };
  at::Tensor dA_rows = sums({sum_rows, Dm, N}, wopt);
  at::Tensor dinit = new_output({Bs, Dm, N}, wopt);
  // An empty sequence passes its final state's gradient to its initial state unchanged.
  if (v.packed()) dlast ? dinit.copy_(*dlast) : dinit.zero_();
  at::Tensor dD_rows = sums({sum_rows, Dm}, u.options().dtype(acc));
  at::Tensor ddb_rows = sums({sum_rows, Dm}, u.options().dtype(acc));
  // Fixed B/C: per-row sums [B, D, N] W. Variable: per-slice partials, on the CPU in acc with
  // complex values as (re, im) pairs, read back as W.
  const int64_t nw = pr.is_complex ? 2 * N : N;
  auto bc_buffer = [&](bool variable) {
    if (!variable) return sums({sum_rows, Dm, N}, wopt);
    if (cpu) return new_output({n_slices, Bt, L, nw}, u.options().dtype(acc));
    return new_output({n_slices, Bt, N, L}, wopt);
  };
  at::Tensor dB_buf = bc_buffer(b_var);
  at::Tensor dC_buf = bc_buffer(c_var);
  const auto partial_as_state = [&](const at::Tensor& t) {
    return cpu && pr.is_complex ? at::view_as_complex(t.view({n_slices, Bt, L, N, 2})) : t;
  };

  if (u.numel() > 0) {
    const CpuLayoutTensors cpu_tensors = cpu ? cpu_layout_tensors(pr, acc) : CpuLayoutTensors{};
    SSMK_DISPATCH_FLOAT(u.scalar_type(), "selective_scan_bwd", [&] {
      using T = scalar_t;
      SSMK_BOOL_SWITCH(pr.is_complex, kComplex, [&] {
        using W = selective_scan_state_t<T, kComplex>;
        SelectiveScanBwdParams<T, kComplex> p{};
        fill_common(p, pr, in);
        p.checkpoints = ptr<W>(in.checkpoints);
        p.dout = view<const T, 3>(dout);
        p.dlast_state = view<const W, 3>(dlast);
        p.slice_channels = slice_channels;
        p.n_slices = n_slices;
        p.du = ptr<T>(du);
        p.ddelta = ptr<T>(ddelta);
        p.dz = in.z ? ptr<T>(dz) : nullptr;
        p.dA_rows = ptr<W>(dA_rows);
        p.dinitial_state = ptr<W>(dinit);
        p.dD_rows = ptr<acc_t<T>>(dD_rows);
        p.ddelta_bias_rows = ptr<acc_t<T>>(ddb_rows);
        if (!b_var) p.dB_rows = ptr<W>(dB_buf);
        if (!c_var) p.dC_rows = ptr<W>(dC_buf);
        launch(
            u,
            [&] {
              auto lay = cpu_layout<acc_t<T>>(pr, cpu_tensors);
              if (b_var) lay.dB_partial = ptr<acc_t<T>>(dB_buf);
              if (c_var) lay.dC_partial = ptr<acc_t<T>>(dC_buf);
              selective_scan_bwd_cpu(p, lay);
            } SSMK_CUDA([&](const CudaContext& ctx) {
              if (b_var) p.dB_partial = ptr<W>(dB_buf);
              if (c_var) p.dC_partial = ptr<W>(dC_buf);
              selective_scan_bwd_cuda(p, ctx);
            }));
      });
    });
  }

  // The reductions over batch or sequences (and over the slices of a group) run in a fixed order.
  const at::Tensor dA = dA_rows.sum(0).to(in.A.scalar_type());
  const at::Tensor dB = b_var ? reduce_partial(partial_as_state(dB_buf), pr, n_slices, pr.B.size(1), cpu, in.B)
                              : dB_buf.sum(0).to(in.B.scalar_type());
  const at::Tensor dC = c_var ? reduce_partial(partial_as_state(dC_buf), pr, n_slices, pr.C.size(1), cpu, in.C)
                              : dC_buf.sum(0).to(in.C.scalar_type());
  const at::Tensor dD = in.D ? dD_rows.sum(0).to(in.D->scalar_type()) : new_grad({}, u);
  const at::Tensor ddb = in.delta_bias ? ddb_rows.sum(0).to(in.delta_bias->scalar_type()) : new_grad({}, u);
  const at::Tensor dinit_out = in.initial_state ? dinit.to(in.initial_state->scalar_type()) : new_grad({}, u);
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, dinit_out};
}

// Decode step: the no-heads layout is normalised to heads = 1; the small parameters are read in
// acc.
at::Tensor selective_state_update(const SelectiveStateUpdateArgs& in) {
  const at::Tensor& state_in = in.state;
  const at::Tensor& x_in = in.x;
  SSMK_CHECK_VALUE(state_in.dim() == 3 || state_in.dim() == 4,
                   "state: expected 3 dims (batch, dim, dstate) or 4 (batch, nheads, headdim, "
                   "dstate), got shape ", state_in.sizes());
  const bool heads = state_in.dim() == 4;
  check_floating(x_in, "x");
  SSMK_CHECK_VALUE(x_in.dim() == state_in.dim() - 1, "x: expected ", state_in.dim() - 1,
                   " dims, got shape ", x_in.sizes());
  const int64_t Bt = x_in.size(0);
  auto lift = [&](const at::Tensor& t, int64_t at_dim) { return heads ? t : t.unsqueeze(at_dim); };
  const at::Tensor state = lift(state_in, 1), x = lift(x_in, 1);
  const int64_t H = state.size(1), P = state.size(2), N = state.size(3);
  SSMK_CHECK_VALUE(x.size(1) == H && x.size(2) == P, "state: expected shape (batch, ",
                   heads ? "nheads, headdim" : "dim", ", dstate) matching x ", x_in.sizes(), ", got ",
                   state_in.sizes());
  SSMK_CHECK_VALUE(N >= 1 && N <= kMaxDstate, "state: expected dstate in [1, ", kMaxDstate, "], got ", N);
  const auto acc = acc_dtype(x_in.scalar_type());
  SSMK_CHECK_TYPE(state.scalar_type() == acc, "state: expected dtype ", acc, ", got ", state.scalar_type());
  check_same_device(state_in, x_in, "state");
  check_shape(in.dt, x_in.sizes(), "dt");
  check_dtype(in.dt, x_in.scalar_type(), "dt");
  check_same_device(in.dt, x_in, "dt");
  const at::Tensor dt = lift(in.dt, 1);
  const at::Tensor A = lift(in.A, 0);
  SSMK_CHECK_VALUE(A.dim() == 3 && A.size(0) == H && A.size(1) == P && A.size(2) == N, "A: expected shape ",
                   heads ? "(nheads, headdim, dstate)" : "(dim, dstate)", " matching state ",
                   state_in.sizes(), ", got ", in.A.sizes());
  check_floating(in.A, "A");
  check_same_device(in.A, x_in, "A");
  auto bc = [&](const at::Tensor& t, const char* name) {
    check_floating(t, name);
    check_same_device(t, x_in, name);
    const at::Tensor v = lift(t, 1);
    SSMK_CHECK_VALUE(v.dim() == 3 && v.size(0) == Bt && v.size(1) >= 1 && H % v.size(1) == 0 &&
                         v.size(2) == N,
                     name, ": expected shape ",
                     heads ? "(batch, groups, dstate) with groups dividing nheads" : "(batch, dstate)",
                     " for batch=", Bt, ", dstate=", N, ", got ", t.sizes());
    return v.to(acc).contiguous();
  };
  const at::Tensor B = bc(in.B, "B"), C = bc(in.C, "C");
  SSMK_CHECK_VALUE(B.size(1) == C.size(1), "C: expected the groups of B (", B.size(1), "), got ",
                   C.size(1));
  auto hp = [&](const std::optional<at::Tensor>& t, const char* name) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    check_floating(*t, name);
    check_same_device(*t, x_in, name);
    const at::Tensor v = lift(*t, 0);
    SSMK_CHECK_VALUE(v.dim() == 2 && v.size(0) == H && v.size(1) == P, name, ": expected shape ",
                     heads ? "(nheads, headdim)" : "(dim,)", " matching state ", state_in.sizes(),
                     ", got ", t->sizes());
    return v.to(acc).contiguous();
  };
  const auto D = hp(in.D, "D"), dt_bias = hp(in.dt_bias, "dt_bias");
  std::optional<at::Tensor> z;
  if (in.z) {
    check_shape(*in.z, x_in.sizes(), "z");
    check_dtype(*in.z, x_in.scalar_type(), "z");
    check_same_device(*in.z, x_in, "z");
    z = lift(*in.z, 1);
  }
  std::optional<at::Tensor> idx;
  if (in.state_batch_indices) {
    const at::Tensor& i = *in.state_batch_indices;
    check_shape(i, {Bt}, "state_batch_indices");
    SSMK_CHECK_TYPE(i.scalar_type() == at::kInt || i.scalar_type() == at::kLong,
                    "state_batch_indices: expected dtype int32 or int64, got ", i.scalar_type());
    check_same_device(i, x_in, "state_batch_indices");
    // Read on the host for CPU tensors only (no device sync); on CUDA the kernel treats an index
    // >= the state's batch like a negative one (a padding row).
    if (i.is_cpu() && i.numel() > 0) {
      const int64_t hi = i.max().item<int64_t>();
      SSMK_CHECK_VALUE(hi < state.size(0), "state_batch_indices: expected values < state batch ",
                       state.size(0), ", got ", hi);
    }
    idx = i.to(at::kLong).contiguous();
  } else {
    SSMK_CHECK_VALUE(state.size(0) == Bt, "state: expected batch ", Bt, ", got ", state.size(0));
  }
  const at::Tensor A_acc = A.to(acc).contiguous();
  at::Tensor out = new_output({Bt, H, P}, x.options());
  if (out.numel() > 0) {
    SSMK_DISPATCH_FLOAT(x.scalar_type(), "selective_state_update", [&] {
      using T = scalar_t;
      using Acc = acc_t<T>;
      SelectiveStateUpdateParams<T> p{};
      p.batch = Bt;
      p.nheads = H;
      p.headdim = P;
      p.dstate = N;
      p.groups = B.size(1);
      p.state_batch = state.size(0);
      p.dt_softplus = in.dt_softplus;
      p.state = view<Acc, 4>(state);
      p.x = view<const T, 3>(x);
      p.dt = view<const T, 3>(dt);
      p.z = view<const T, 3>(z);
      p.A = ptr<Acc>(A_acc);
      p.B = ptr<Acc>(B);
      p.C = ptr<Acc>(C);
      p.D = ptr<Acc>(D);
      p.dt_bias = ptr<Acc>(dt_bias);
      p.state_batch_indices = ptr<int64_t>(idx);
      p.out = ptr<T>(out);
      launch(x, [&] { selective_state_update_cpu(p); }
             SSMK_CUDA([&](const CudaContext& ctx) { selective_state_update_cuda(p, ctx); }));
    });
  }
  return heads ? out : out.squeeze(1);
}

}  // namespace
}  // namespace ssmk

// The forward also returns the state before every chunk of kChunkSize steps (checkpoints,
// [B, D, n_chunks, N]), from which the backward recomputes each chunk.
SSMK_OP(selective_scan_fwd, SelectiveScanFwdArgs, "(Tensor out, Tensor last_state, Tensor checkpoints)")
SSMK_OP(selective_scan_bwd, SelectiveScanBwdArgs, "(Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, Tensor dinitial_state)")
SSMK_OP(selective_state_update, SelectiveStateUpdateArgs, "Tensor")
