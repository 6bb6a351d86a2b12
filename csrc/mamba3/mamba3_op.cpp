// mamba3_scan and mamba3_step ops: the argument lists, checks, allocation and params fill shared
// by both devices; and the test hook (end of file).
#include <string>

#include "common/dispatch.h"
#include "common/op_library.h"
#include "common/output.h"
#include "common/varlen.h"
#include "mamba3/mamba3.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

#define MAMBA3_INPUT_ARGS(X)                                                                                \
  X(Tensor, q) X(Tensor, k) X(Tensor, v) X(Tensor, adt) X(Tensor, dt) X(Tensor, trap) X(OptTensor, q_bias) \
  X(OptTensor, k_bias) X(OptTensor, angles) X(OptTensor, D) X(OptTensor, z) X(OptTensor, mimo_v)           \
  X(OptTensor, mimo_z) X(OptTensor, mimo_o)
#define MAMBA3_SCAN_ARGS(X)                                                                              \
  MAMBA3_INPUT_ARGS(X) X(OptTensor, initial_angle) X(OptTensor, initial_ssm) X(OptTensor, initial_k) \
  X(OptTensor, initial_v) X(Int, chunk_size)
// cu_seqlens (default None) comes last in both lists, so calls written before it keep working.
// save_for_backward: whether the CPU forward keeps its chunk states and y before the gate for the
// backward (the Python layer sets it where autograd will need them).
#define MAMBA3_FWD_ARGS(X) MAMBA3_SCAN_ARGS(X) X(Bool, save_for_backward) X(OptTensorDefaultNone, cu_seqlens)
// The backward's chunk_states and gate_input are the forward's outputs of those names (None or
// empty: recomputed from the inputs, as the CUDA backward always does).
#define MAMBA3_BWD_ARGS(X)                                                                               \
  MAMBA3_SCAN_ARGS(X) X(Tensor, dout) X(OptTensor, dfinal_angle) X(OptTensor, dfinal_ssm)               \
  X(OptTensor, dfinal_k) X(OptTensor, dfinal_v) X(OptTensorDefaultNone, cu_seqlens)                     \
  X(OptTensorDefaultNone, chunk_states) X(OptTensorDefaultNone, gate_input)
// The four states come first: they are updated in place.
#define MAMBA3_STEP_ARGS(X)                                                                              \
  X(MutTensorOf<'a'>, angle_state) X(MutTensorOf<'b'>, ssm_state) X(MutTensorOf<'c'>, k_state)          \
  X(MutTensorOf<'d'>, v_state) MAMBA3_INPUT_ARGS(X) X(OptTensor, state_batch_indices)
SSMK_OP_ARGS(Mamba3FwdArgs, MAMBA3_FWD_ARGS)
SSMK_OP_ARGS(Mamba3BwdArgs, MAMBA3_BWD_ARGS)
SSMK_OP_ARGS(Mamba3StepArgs, MAMBA3_STEP_ARGS)

// The sizes every check compares against; `seq` is false for the decode step (no L axis).
struct Shape {
  int64_t batch, seqlen, nheads, ngroups, rank, dqk, dv, nangles;
  bool mimo;
};

void check_param(const std::optional<at::Tensor>& t, at::IntArrayRef expected, const at::Tensor& ref,
                 const char* name) {
  if (!t) return;
  check_floating(*t, name);
  check_shape(*t, expected, name);
  check_same_device(*t, ref, name);
}

// The checks shared by the scan (seq = true: a length axis after batch) and the step.
template <typename Args>
Shape check_inputs(const Args& in, bool seq) {
  const at::Tensor& v = in.v;
  const char* vdims = seq ? "4 dims (batch, seqlen, nheads, headdim_v)" : "3 dims (batch, nheads, headdim_v)";
  SSMK_CHECK_VALUE(v.dim() == (seq ? 4 : 3), "v: expected ", vdims, ", got shape ", v.sizes());
  check_floating(v, "v");
  Shape s{};
  s.batch = v.size(0);
  s.seqlen = seq ? v.size(1) : 1;
  s.nheads = v.size(seq ? 2 : 1);
  s.dv = v.size(seq ? 3 : 2);
  SSMK_CHECK_VALUE(s.seqlen >= 1, "v: expected seqlen >= 1, got ", s.seqlen);
  SSMK_CHECK_VALUE(s.nheads >= 1 && s.dv >= 1, "v: expected nheads >= 1 and headdim_v >= 1, got shape ", v.sizes());
  s.mimo = in.mimo_v.has_value();
  const at::Tensor& q = in.q;
  const int64_t lead = seq ? 2 : 1;  // axes before the (rank,) heads, dim axes
  const int64_t qdims = lead + (s.mimo ? 3 : 2);
  SSMK_CHECK_VALUE(q.dim() == qdims, "q: expected ", qdims, " dims (batch", seq ? ", seqlen" : "",
                   s.mimo ? ", mimo_rank" : "", ", nheads_qk, headdim_qk)", s.mimo ? " with mimo_v" : "",
                   ", got shape ", q.sizes());
  check_dtype(q, v.scalar_type(), "q");
  check_same_device(q, v, "q");
  SSMK_CHECK_VALUE(q.size(0) == s.batch && (!seq || q.size(1) == s.seqlen), "q: expected batch=", s.batch,
                   seq ? " and seqlen=" : "", seq ? std::to_string(s.seqlen) : std::string(), " like v, got shape ",
                   q.sizes());
  s.rank = s.mimo ? q.size(lead) : 1;
  s.ngroups = q.size(-2);
  s.dqk = q.size(-1);
  SSMK_CHECK_VALUE(s.rank >= 1 && s.rank <= mamba3::kMaxRank, "q: expected 1 <= mimo_rank <= ", mamba3::kMaxRank,
                   ", got ", s.rank);
  SSMK_CHECK_VALUE(s.ngroups >= 1 && s.nheads % s.ngroups == 0, "q: expected nheads_qk dividing nheads=", s.nheads,
                   ", got nheads_qk=", s.ngroups);
  SSMK_CHECK_VALUE(s.dqk >= 2 && s.dqk % 2 == 0, "q: expected an even headdim_qk (rotary pairs), got ", s.dqk);
  check_shape(in.k, q.sizes(), "k");
  check_dtype(in.k, v.scalar_type(), "k");
  check_same_device(in.k, v, "k");
  const std::vector<int64_t> step_shape =
      seq ? std::vector<int64_t>{s.batch, s.nheads, s.seqlen} : std::vector<int64_t>{s.batch, s.nheads};
  check_param(in.adt, step_shape, v, "adt");
  check_param(in.dt, step_shape, v, "dt");
  check_param(in.trap, step_shape, v, "trap");
  const std::vector<int64_t> bias_shape =
      s.mimo ? std::vector<int64_t>{s.nheads, s.rank, s.dqk} : std::vector<int64_t>{s.nheads, s.dqk};
  check_param(in.q_bias, bias_shape, v, "q_bias");
  check_param(in.k_bias, bias_shape, v, "k_bias");
  s.nangles = 0;
  if (in.angles) {
    const at::Tensor& a = *in.angles;
    check_floating(a, "angles");
    check_same_device(a, v, "angles");
    SSMK_CHECK_VALUE(a.dim() == lead + 2 && a.size(0) == s.batch && (!seq || a.size(1) == s.seqlen) &&
                         a.size(lead) == s.nheads,
                     "angles: expected shape (batch=", s.batch, seq ? ", seqlen=" : "",
                     seq ? std::to_string(s.seqlen) : std::string(), ", nheads=", s.nheads, ", pairs), got ",
                     a.sizes());
    s.nangles = a.size(-1);
    SSMK_CHECK_VALUE(2 * s.nangles <= s.dqk, "angles: expected at most headdim_qk / 2 = ", s.dqk / 2,
                     " rotary pairs, got ", s.nangles);
  }
  check_param(in.D, {s.nheads}, v, "D");
  if (in.z) {
    check_shape(*in.z, v.sizes(), "z");
    check_dtype(*in.z, v.scalar_type(), "z");
    check_same_device(*in.z, v, "z");
  }
  const std::vector<int64_t> mix = {s.nheads, s.rank, s.dv};
  if (s.mimo) {
    check_param(in.mimo_v, mix, v, "mimo_v");
    SSMK_CHECK_VALUE(in.mimo_o.has_value(), "mimo_o: expected the output mixing weights with mimo_v, got None");
    check_param(in.mimo_o, mix, v, "mimo_o");
    SSMK_CHECK_VALUE(in.mimo_z.has_value() == in.z.has_value(), "mimo_z: expected ",
                     in.z ? "the gate mixing weights with z and mimo_v" : "None without z", ", got ",
                     in.mimo_z ? "a tensor" : "None");
    check_param(in.mimo_z, mix, v, "mimo_z");
  } else {
    SSMK_CHECK_VALUE(!in.mimo_o && !in.mimo_z, in.mimo_o ? "mimo_o" : "mimo_z",
                     ": expected None without mimo_v (SISO), got a tensor");
  }
  return s;
}

// State shapes: angle [B, H, A], ssm [B, H, P, N], k [B, H, (R,) N], v [B, H, (R,) P].
std::vector<int64_t> angle_state_shape(const Shape& s, int64_t b) { return {b, s.nheads, s.nangles}; }
std::vector<int64_t> ssm_state_shape(const Shape& s, int64_t b) { return {b, s.nheads, s.dv, s.dqk}; }
std::vector<int64_t> k_state_shape(const Shape& s, int64_t b) {
  return s.mimo ? std::vector<int64_t>{b, s.nheads, s.rank, s.dqk} : std::vector<int64_t>{b, s.nheads, s.dqk};
}
std::vector<int64_t> v_state_shape(const Shape& s, int64_t b) {
  return s.mimo ? std::vector<int64_t>{b, s.nheads, s.rank, s.dv} : std::vector<int64_t>{b, s.nheads, s.dv};
}

// The rows of the scan's states: the batch, or one per sequence with cu_seqlens.
int64_t state_rows(const Shape& s, const Varlen& vl) { return vl.packed() ? vl.num_seqs : s.batch; }

// The scan's packed sequences (common/varlen.h) and its initial states, [state rows, ...].
template <typename Args>
Varlen check_initial(const Args& in, const Shape& s) {
  const Varlen vl = check_cu_seqlens(in.cu_seqlens, std::nullopt, s.batch, s.seqlen, in.v);
  const int64_t Bs = state_rows(s, vl);
  check_param(in.initial_angle, angle_state_shape(s, Bs), in.v, "initial_angle");
  check_param(in.initial_ssm, ssm_state_shape(s, Bs), in.v, "initial_ssm");
  check_param(in.initial_k, k_state_shape(s, Bs), in.v, "initial_k");
  check_param(in.initial_v, v_state_shape(s, Bs), in.v, "initial_v");
  SSMK_CHECK_VALUE(in.chunk_size >= 1 && in.chunk_size <= mamba3::kMaxChunk, "chunk_size: expected 1 <= chunk_size <= ",
                   mamba3::kMaxChunk, ", got ", in.chunk_size);
  return vl;
}

// A contiguous accumulation-dtype copy (or view) of an optional input; undefined when absent.
at::Tensor acc_copy(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t ? t->to(acc).contiguous() : at::Tensor();
}
template <typename A>
const A* opt(const at::Tensor& t) {
  return t.defined() ? static_cast<const A*>(t.data_ptr()) : nullptr;
}

// The accumulation-dtype buffers of the small inputs (kept alive while the kernel runs).
struct AccInputs {
  at::Tensor adt, dt, trap, angles, q_bias, k_bias, D, mimo_v, mimo_z, mimo_o;
  at::Tensor init_angle, init_ssm, init_k, init_v;
};

template <typename Args>
AccInputs acc_inputs(const Args& in, at::ScalarType acc) {
  AccInputs a;
  a.adt = in.adt.to(acc).contiguous();
  a.dt = in.dt.to(acc).contiguous();
  a.trap = in.trap.to(acc).contiguous();
  a.angles = acc_copy(in.angles, acc);
  a.q_bias = acc_copy(in.q_bias, acc);
  a.k_bias = acc_copy(in.k_bias, acc);
  a.D = acc_copy(in.D, acc);
  a.mimo_v = acc_copy(in.mimo_v, acc);
  a.mimo_z = acc_copy(in.mimo_z, acc);
  a.mimo_o = acc_copy(in.mimo_o, acc);
  return a;
}

// The coefficients of the scan and of the step alike.
template <typename Acc>
void fill_coeffs(Mamba3Coeffs<Acc>& p, const AccInputs& a) {
  p.adt = opt<Acc>(a.adt);
  p.dt = opt<Acc>(a.dt);
  p.trap = opt<Acc>(a.trap);
  p.angles = opt<Acc>(a.angles);
  p.q_bias = opt<Acc>(a.q_bias);
  p.k_bias = opt<Acc>(a.k_bias);
  p.D = opt<Acc>(a.D);
  p.mimo_v = opt<Acc>(a.mimo_v);
  p.mimo_z = opt<Acc>(a.mimo_z);
  p.mimo_o = opt<Acc>(a.mimo_o);
}

// The kernels' sizes (mamba3.h), from the checked shape and packing.
Mamba3Dims dims_of(const Shape& s, const Varlen& vl, int64_t chunk) {
  Mamba3Dims d{};
  d.batch = s.batch;
  d.seqlen = s.seqlen;
  d.nheads = s.nheads;
  d.ngroups = s.ngroups;
  d.rank = s.rank;
  d.headdim_qk = s.dqk;
  d.headdim_v = s.dv;
  d.nangles = s.nangles;
  d.chunk = chunk;
  d.mimo = s.mimo;
  d.cu_seqlens = vl.packed() ? vl.offsets.data_ptr<int64_t>() : nullptr;
  d.num_seqs = vl.num_seqs;
  return d;
}

template <typename T, typename Args>
void fill_inputs(Mamba3Inputs<T>& p, const Args& in, const Shape& s, const AccInputs& a, const Varlen& vl) {
  using acc = acc_t<T>;
  static_cast<Mamba3Dims&>(p) = dims_of(s, vl, in.chunk_size);
  p.q = view<const T, 5>(s.mimo ? in.q : in.q.unsqueeze(2));
  p.k = view<const T, 5>(s.mimo ? in.k : in.k.unsqueeze(2));
  p.v = view<const T, 4>(in.v);
  p.z = view<const T, 4>(in.z);
  fill_coeffs(p, a);
  p.init_angle = opt<acc>(a.init_angle);
  p.init_ssm = opt<acc>(a.init_ssm);
  p.init_k = opt<acc>(a.init_k);
  p.init_v = opt<acc>(a.init_v);
}

template <typename Args>
void acc_initial(AccInputs& a, const Args& in, at::ScalarType acc) {
  a.init_angle = acc_copy(in.initial_angle, acc);
  a.init_ssm = acc_copy(in.initial_ssm, acc);
  a.init_k = acc_copy(in.initial_k, acc);
  a.init_v = acc_copy(in.initial_v, acc);
}

// The CUDA kernels' scratch in the accumulation dtype: `per_task` elements for each of `tasks`
// tasks (the decode step: one block each, mamba3_cuda.cu).
[[maybe_unused]] at::Tensor cuda_scratch(const at::Tensor& ref, int64_t tasks, int64_t per_task) {
  check_cuda_grid(tasks, "v");
  return at::empty({tasks * per_task}, ref.options().dtype(acc_dtype(ref.scalar_type())));
}

// The CUDA scan's scratch: its stages' shared buffers and work areas (mamba3_task.h's
// ChunkBuffers, for chunk_blocks() blocks on this device).
[[maybe_unused]] at::Tensor cuda_scan_scratch(const at::Tensor& ref, const Mamba3Dims& d, bool grads, int sms) {
  check_cuda_grid(d.tasks(), "v");
  const int64_t size = mamba3::ChunkBuffers<float>(d, grads, mamba3::chunk_blocks(d, grads, sms), nullptr).size;
  return at::empty({size}, ref.options().dtype(acc_dtype(ref.scalar_type())));
}

// On the CPU, half and bfloat16 scans run the float kernels on float copies of the T-typed
// inputs (q, k, v, z, dout): exact, since the kernels widen every element as they load it, and
// the T-typed outputs are rounded once, as the kernels' own stores round them. That halves the
// scan's CPU template instances (docs/build.md, "Template instances per op"); the copies cost
// about 20% of a bfloat16 scan (docs/mamba3.md), the decode step keeps its own kernels.
bool widened_on_cpu(const at::Tensor& v) {
  return v.is_cpu() && (v.scalar_type() == at::kHalf || v.scalar_type() == at::kBFloat16);
}

template <typename Args>
Args widen_inputs(const Args& in) {
  Args f = in;
  f.q = in.q.to(at::kFloat);
  f.k = in.k.to(at::kFloat);
  f.v = in.v.to(at::kFloat);
  if (in.z) f.z = in.z->to(at::kFloat);
  return f;
}

// The scan's CPU kernel for the params' type: those exist for float and double only (above).
template <template <typename> class Params, typename T>
void scan_cpu(const Params<T>& p) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    TORCH_INTERNAL_ASSERT(false, "mamba3_scan: the CPU kernels take float or double; half and bfloat16 are widened");
  } else if constexpr (std::is_same_v<Params<T>, Mamba3FwdParams<T>>) {
    mamba3_fwd_cpu(p);
  } else {
    mamba3_bwd_cpu(p);
  }
}

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What the CPU forward keeps for the backward: the state before every chunk ([slots, P, N], the
// slots of mamba3_task.h's bwd_state_slots; zeros with cu_seqlens, whose layout leaves slots
// unused) and y before the gate ([B, H, L, R, P]). Empty on CUDA, whose backward recomputes them,
// and where save_for_backward is false.
std::vector<int64_t> saved_states_shape(const Shape& s, const Varlen& vl, int64_t chunk) {
  return {mamba3::bwd_state_slots(dims_of(s, vl, chunk)), s.dv, s.dqk};
}

// The forward on checked arguments.
FwdResult scan_fwd(const Mamba3FwdArgs& in, const Shape& s, const Varlen& vl) {
  const int64_t Bs = state_rows(s, vl);
  const auto dtype = in.v.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto aopts = in.v.options().dtype(acc);
  at::Tensor out = new_output(in.v.sizes(), in.v.options());
  at::Tensor final_angle = new_output(angle_state_shape(s, Bs), aopts);
  at::Tensor final_ssm = new_output(ssm_state_shape(s, Bs), aopts);
  at::Tensor final_k = new_output(k_state_shape(s, Bs), aopts);
  at::Tensor final_v = new_output(v_state_shape(s, Bs), aopts);
  at::Tensor chunk_states, gate_input;
  if (in.v.is_cpu() && in.save_for_backward) {
    const std::vector<int64_t> states_shape = saved_states_shape(s, vl, in.chunk_size);
    chunk_states = vl.packed() ? at::zeros(states_shape, aopts) : new_output(states_shape, aopts);
    gate_input = new_output({s.batch, s.nheads, s.seqlen, s.rank, s.dv}, aopts);
  } else {
    chunk_states = at::empty({0}, aopts);
    gate_input = at::empty({0}, aopts);
  }
  if (s.batch == 0) return {out, final_angle, final_ssm, final_k, final_v, chunk_states, gate_input};
  AccInputs a = acc_inputs(in, acc);
  acc_initial(a, in, acc);
  SSMK_DISPATCH_FLOAT(dtype, "mamba3_scan_fwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    Mamba3FwdParams<T> p{};
    fill_inputs(p, in, s, a, vl);
    p.out = ptr<T>(out);
    p.final_angle = ptr<A>(final_angle);
    p.final_ssm = ptr<A>(final_ssm);
    p.final_k = ptr<A>(final_k);
    p.final_v = ptr<A>(final_v);
    p.chunk_states = chunk_states.numel() > 0 ? ptr<A>(chunk_states) : nullptr;
    p.gate_input = gate_input.numel() > 0 ? ptr<A>(gate_input) : nullptr;
    launch(in.v, [&] { scan_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             mamba3_fwd_cuda(p, ptr<A>(cuda_scan_scratch(in.v, p, false, ctx.sms)), ctx);
           }));
  });
  return {out, final_angle, final_ssm, final_k, final_v, chunk_states, gate_input};
}

FwdResult mamba3_scan_fwd(const Mamba3FwdArgs& in) {
  const Shape s = check_inputs(in, true);
  const Varlen vl = check_initial(in, s);
  if (!widened_on_cpu(in.v)) return scan_fwd(in, s, vl);
  FwdResult r = scan_fwd(widen_inputs(in), s, vl);
  std::get<0>(r) = std::get<0>(r).to(in.v.scalar_type());
  return r;
}

// The forward's saved tensor `t` for the CPU backward: checked and contiguous, or undefined where
// it is absent or empty (recomputed).
at::Tensor saved_input(const std::optional<at::Tensor>& t, std::vector<int64_t> shape, at::ScalarType acc,
                       const at::Tensor& ref, const char* name) {
  if (!t || t->numel() == 0) return at::Tensor();
  check_shape(*t, shape, name);
  SSMK_CHECK_TYPE(t->scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t->scalar_type());
  check_same_device(*t, ref, name);
  return t->contiguous();
}

// The gradient of an optional input from its accumulation-dtype value, or an empty one of `absent`.
at::Tensor grad_as(const at::Tensor& g, const std::optional<at::Tensor>& input, const at::TensorOptions& absent) {
  return input ? g.reshape(input->sizes()).to(input->scalar_type()) : at::empty({0}, absent);
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct BwdShape {
  Shape s;
  Varlen vl;
  int64_t Bs;
};

BwdShape check_bwd(const Mamba3BwdArgs& in) {
  const Shape s = check_inputs(in, true);
  const Varlen vl = check_initial(in, s);
  const int64_t Bs = state_rows(s, vl);
  check_shape(in.dout, in.v.sizes(), "dout");
  check_floating(in.dout, "dout");
  check_same_device(in.dout, in.v, "dout");
  check_param(in.dfinal_angle, angle_state_shape(s, Bs), in.v, "dfinal_angle");
  check_param(in.dfinal_ssm, ssm_state_shape(s, Bs), in.v, "dfinal_ssm");
  check_param(in.dfinal_k, k_state_shape(s, Bs), in.v, "dfinal_k");
  check_param(in.dfinal_v, v_state_shape(s, Bs), in.v, "dfinal_v");
  return {s, vl, Bs};
}

// The backward on checked arguments; `gdtype` is the dtype of the gradients of q, k, v and z and
// of the empty ones of absent inputs (v's before widened_on_cpu).
BwdResult scan_bwd(const Mamba3BwdArgs& in, const BwdShape& shape, at::ScalarType gdtype) {
  const Shape& s = shape.s;
  const Varlen& vl = shape.vl;
  const int64_t Bs = shape.Bs;
  const auto dtype = in.v.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto aopts = in.v.options().dtype(acc);
  const int64_t Bn = s.batch, L = s.seqlen, H = s.nheads, R = s.rank, N = s.dqk, P = s.dv, A = s.nangles;
  const at::Tensor dout = in.dout.to(dtype);
  AccInputs a = acc_inputs(in, acc);
  acc_initial(a, in, acc);
  const at::Tensor dfinal_angle = acc_copy(in.dfinal_angle, acc), dfinal_ssm = acc_copy(in.dfinal_ssm, acc);
  const at::Tensor dfinal_k = acc_copy(in.dfinal_k, acc), dfinal_v = acc_copy(in.dfinal_v, acc);
  const at::Tensor chunk_states =
      saved_input(in.chunk_states, saved_states_shape(s, vl, in.chunk_size), acc, in.v, "chunk_states");
  const at::Tensor gate_input = saved_input(in.gate_input, {Bn, H, L, R, P}, acc, in.v, "gate_input");

  at::Tensor dq = at::empty({Bn, L, R, H, N}, aopts), dk = at::empty({Bn, L, R, H, N}, aopts);
  at::Tensor dv = new_output(in.v.sizes(), in.v.options());
  at::Tensor dz = new_grad(in.z, in.v);
  at::Tensor dadt = at::empty({Bn, H, L}, aopts), ddt = at::empty({Bn, H, L}, aopts);
  at::Tensor dtrap = at::empty({Bn, H, L}, aopts);
  at::Tensor dangles = at::empty({Bn, L, H, A}, aopts);
  // Per state row (task): the parameters' parts, summed below, and the initial states' gradients.
  at::Tensor dq_bias = at::empty({Bs, H, R, N}, aopts), dk_bias = at::empty({Bs, H, R, N}, aopts);
  at::Tensor dD = at::empty({Bs, H}, aopts);
  at::Tensor dmimo_v = at::empty({Bs, H, R, P}, aopts), dmimo_z = at::empty({Bs, H, R, P}, aopts);
  at::Tensor dmimo_o = at::empty({Bs, H, R, P}, aopts);
  at::Tensor dinit_angle = at::empty({Bs, H, A}, aopts), dinit_ssm = at::empty({Bs, H, P, N}, aopts);
  at::Tensor dinit_k = at::empty({Bs, H, R, N}, aopts), dinit_v = at::empty({Bs, H, R, P}, aopts);
  if (Bn > 0) {
    SSMK_DISPATCH_FLOAT(dtype, "mamba3_scan_bwd", [&] {
      using T = scalar_t;
      using Ac = acc_t<T>;
      Mamba3BwdParams<T> p{};
      fill_inputs(p, in, s, a, vl);
      p.dout = view<const T, 4>(dout);
      p.dfinal_angle = opt<Ac>(dfinal_angle);
      p.dfinal_ssm = opt<Ac>(dfinal_ssm);
      p.dfinal_k = opt<Ac>(dfinal_k);
      p.dfinal_v = opt<Ac>(dfinal_v);
      p.chunk_states = opt<Ac>(chunk_states);
      p.gate_input = opt<Ac>(gate_input);
      p.dq = ptr<Ac>(dq);
      p.dk = ptr<Ac>(dk);
      p.dv = ptr<T>(dv);
      p.dz = in.z ? ptr<T>(dz) : nullptr;
      p.dadt = ptr<Ac>(dadt);
      p.ddt = ptr<Ac>(ddt);
      p.dtrap = ptr<Ac>(dtrap);
      p.dangles = A > 0 ? ptr<Ac>(dangles) : nullptr;
      p.dq_bias = ptr<Ac>(dq_bias);
      p.dk_bias = ptr<Ac>(dk_bias);
      p.dD = ptr<Ac>(dD);
      p.dmimo_v = ptr<Ac>(dmimo_v);
      p.dmimo_z = in.mimo_z ? ptr<Ac>(dmimo_z) : nullptr;
      p.dmimo_o = ptr<Ac>(dmimo_o);
      p.dinit_angle = ptr<Ac>(dinit_angle);
      p.dinit_ssm = ptr<Ac>(dinit_ssm);
      p.dinit_k = ptr<Ac>(dinit_k);
      p.dinit_v = ptr<Ac>(dinit_v);
      launch(in.v, [&] { scan_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
               mamba3_bwd_cuda(p, ptr<Ac>(cuda_scan_scratch(in.v, p, true, ctx.sms)), ctx);
             }));
    });
  } else {
    for (at::Tensor* t : {&dq, &dk, &dadt, &ddt, &dtrap, &dangles, &dq_bias, &dk_bias, &dD, &dmimo_v, &dmimo_z,
                          &dmimo_o, &dinit_angle, &dinit_ssm, &dinit_k, &dinit_v}) {
      t->zero_();
    }
  }
  // The sums over the heads of a query/key group and over the state rows, in a fixed order.
  const int64_t G = s.ngroups;
  auto group_sum = [&](const at::Tensor& g, const at::Tensor& input) {
    at::Tensor r = g.view({Bn, L, R, G, H / G, N}).sum(4);
    return r.reshape(input.sizes()).to(input.scalar_type());
  };
  const auto gopts = in.v.options().dtype(gdtype);
  return {group_sum(dq, in.q).to(gdtype),
          group_sum(dk, in.k).to(gdtype),
          dv.to(gdtype),
          dadt.to(in.adt.scalar_type()),
          ddt.to(in.dt.scalar_type()),
          dtrap.to(in.trap.scalar_type()),
          grad_as(dq_bias.sum(0), in.q_bias, gopts),
          grad_as(dk_bias.sum(0), in.k_bias, gopts),
          grad_as(dangles, in.angles, gopts),
          grad_as(dD.sum(0), in.D, gopts),
          dz.to(gdtype),
          grad_as(dmimo_v.sum(0), in.mimo_v, gopts),
          grad_as(dmimo_z.sum(0), in.mimo_z, gopts),
          grad_as(dmimo_o.sum(0), in.mimo_o, gopts),
          grad_as(dinit_angle, in.initial_angle, gopts),
          grad_as(dinit_ssm, in.initial_ssm, gopts),
          grad_as(dinit_k, in.initial_k, gopts),
          grad_as(dinit_v, in.initial_v, gopts)};
}

BwdResult mamba3_scan_bwd(const Mamba3BwdArgs& in) {
  const BwdShape shape = check_bwd(in);
  const auto dtype = in.v.scalar_type();
  if (!widened_on_cpu(in.v)) return scan_bwd(in, shape, dtype);
  Mamba3BwdArgs f = widen_inputs(in);
  // dout rounded to v's dtype first, as the kernels for that dtype would take it.
  f.dout = in.dout.to(dtype).to(at::kFloat);
  return scan_bwd(f, shape, dtype);
}

void check_state(const at::Tensor& t, std::vector<int64_t> expected, at::ScalarType acc, const at::Tensor& ref,
                 const char* name) {
  check_shape(t, expected, name);
  SSMK_CHECK_TYPE(t.scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t.scalar_type());
  check_same_device(t, ref, name);
}

at::Tensor mamba3_step(const Mamba3StepArgs& in) {
  const Shape s = check_inputs(in, false);
  const auto dtype = in.v.scalar_type();
  const auto acc = acc_dtype(dtype);
  const int64_t Bs = in.ssm_state.dim() >= 1 ? in.ssm_state.size(0) : 0;
  check_state(in.angle_state, angle_state_shape(s, Bs), acc, in.v, "angle_state");
  check_state(in.ssm_state, ssm_state_shape(s, Bs), acc, in.v, "ssm_state");
  check_state(in.k_state, k_state_shape(s, Bs), acc, in.v, "k_state");
  check_state(in.v_state, v_state_shape(s, Bs), acc, in.v, "v_state");
  at::Tensor idx;
  if (in.state_batch_indices) {
    const at::Tensor& i = *in.state_batch_indices;
    check_shape(i, {s.batch}, "state_batch_indices");
    SSMK_CHECK_TYPE(i.scalar_type() == at::kInt || i.scalar_type() == at::kLong,
                    "state_batch_indices: expected dtype int32 or int64, got ", i.scalar_type());
    check_same_device(i, in.v, "state_batch_indices");
    if (i.is_cpu() && i.numel() > 0) {
      const int64_t hi = i.max().item<int64_t>();
      SSMK_CHECK_VALUE(hi < Bs, "state_batch_indices: expected values < state batch ", Bs, ", got ", hi);
    }
    idx = i.to(at::kLong).contiguous();
  } else {
    SSMK_CHECK_VALUE(Bs == s.batch, "ssm_state: expected batch ", s.batch, " like v, got ", Bs);
  }
  at::Tensor out = new_output(in.v.sizes(), in.v.options());
  if (s.batch == 0) return out;
  const AccInputs a = acc_inputs(in, acc);
  SSMK_DISPATCH_FLOAT(dtype, "mamba3_step", [&] {
    using T = scalar_t;
    using Ac = acc_t<T>;
    Mamba3StepParams<T> p{};
    static_cast<Mamba3Dims&>(p) = dims_of(s, Varlen{}, 1);
    p.state_batch = Bs;
    p.angle_state = view<Ac, 3>(in.angle_state);
    p.ssm_state = view<Ac, 4>(in.ssm_state);
    p.k_state = view<Ac, 4>(s.mimo ? at::Tensor(in.k_state) : in.k_state.unsqueeze(2));
    p.v_state = view<Ac, 4>(s.mimo ? at::Tensor(in.v_state) : in.v_state.unsqueeze(2));
    p.q = view<const T, 5>((s.mimo ? in.q : in.q.unsqueeze(1)).unsqueeze(1));
    p.k = view<const T, 5>((s.mimo ? in.k : in.k.unsqueeze(1)).unsqueeze(1));
    p.v = view<const T, 4>(in.v.unsqueeze(1));
    p.z = view<const T, 3>(in.z);
    fill_coeffs(p, a);
    p.state_batch_indices = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
    p.out = ptr<T>(out);
    launch(in.v, [&] { mamba3_step_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             const int64_t tasks = p.batch * p.nheads;
             mamba3_step_cuda(p, ptr<Ac>(cuda_scratch(in.v, tasks, mamba3::step_scratch(p))), ctx);
           }));
  });
  return out;
}

}  // namespace
}  // namespace ssmk

SSMK_OP(mamba3_scan_fwd, Mamba3FwdArgs,
        "(Tensor out, Tensor final_angle, Tensor final_ssm, Tensor final_k, Tensor final_v, Tensor chunk_states, "
        "Tensor gate_input)")
SSMK_OP(mamba3_scan_bwd, Mamba3BwdArgs,
        "(Tensor dq, Tensor dk, Tensor dv, Tensor dadt, Tensor ddt, Tensor dtrap, Tensor dq_bias, Tensor dk_bias, "
        "Tensor dangles, Tensor dD, Tensor dz, Tensor dmimo_v, Tensor dmimo_z, Tensor dmimo_o, Tensor dinitial_angle, "
        "Tensor dinitial_ssm, Tensor dinitial_k, Tensor dinitial_v)")
SSMK_OP(mamba3_step, Mamba3StepArgs, "Tensor")

// mamba3 test hook (CPU): switches the CPU scan to mamba3_task.h's stages, the code the GPU runs,
// so that the CPU tests check it as well as the blocked CPU kernels.
TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  m.def("mamba3_cpu_task_kernels(bool on) -> bool", [](bool on) { return ssmk::mamba3_cpu_task_kernels(on); });
  m.def("mamba3_cpu_task_order_reversed(bool on) -> bool",
        [](bool on) { return ssmk::mamba3_cpu_task_order_reversed(on); });
}
