// selective_scan and selective_state_update: parameters, argument checks and the host-side
// drivers shared by the CPU and CUDA implementations (each device supplies its kernel launcher).
#pragma once

#include <ATen/ATen.h>

#include <numeric>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/output.h"
#include "selective_scan/selective_scan_math.h"

namespace ssmk {

// Element strides; all sizes and offsets are 64-bit. "w" is the state type: acc_t (float for
// float/half/bfloat16 inputs, double for double) or c10::complex<acc_t> for complex A.
struct SelectiveScanParams {
  int64_t batch, dim, seqlen, dstate, n_chunks;
  bool is_complex, softplus;

  const void* u;  // [B, D, L] input dtype
  int64_t u_batch_stride, u_dim_stride, u_l_stride;
  const void* delta;  // [B, D, L] input dtype
  int64_t delta_batch_stride, delta_dim_stride, delta_l_stride;
  const void* z;  // [B, D, L] input dtype, or nullptr
  int64_t z_batch_stride, z_dim_stride, z_l_stride;
  const void* A;  // [D, N] w, contiguous

  // B and C: fixed ([D, N] w, contiguous) or variable ([B, G, N, L], input dtype for real A and
  // w for complex A, any strides; variable without groups is G = 1).
  bool B_variable, C_variable;
  int64_t B_groups, C_groups;
  const void* B;
  int64_t B_batch_stride, B_group_stride, B_n_stride, B_l_stride;
  const void* C;
  int64_t C_batch_stride, C_group_stride, C_n_stride, C_l_stride;

  const void* D;           // [D] acc_t, or nullptr
  const void* delta_bias;  // [D] acc_t, or nullptr
  const void* initial_state;  // [B, D, N] w, any strides, or nullptr
  int64_t init_batch_stride, init_dim_stride, init_n_stride;

  void* out;          // [B, D, L] input dtype, contiguous
  void* last_state;   // [B, D, N] w, contiguous
  void* checkpoints;  // [B, D, n_chunks, N] w, contiguous: the state before each chunk

  // Backward. Channels are processed in slices of slice_channels consecutive channels (one CPU
  // task or CUDA block each, channels in order), so the gradients of variable B/C, summed over the
  // channels of a group, are reduced without atomics: each slice writes its own partial sum.
  const void* dout;  // [B, D, L] input dtype, any strides
  int64_t dout_batch_stride, dout_dim_stride, dout_l_stride;
  const void* dlast_state;  // [B, D, N] w, any strides, or nullptr
  int64_t dlast_batch_stride, dlast_dim_stride, dlast_n_stride;
  int64_t slice_channels, n_slices;  // n_slices = dim / slice_channels
  void* du;      // [B, D, L] input dtype, contiguous
  void* ddelta;  // [B, D, L] input dtype, contiguous
  void* dz;      // [B, D, L] input dtype, contiguous, or nullptr
  void* dA_rows;     // [B, D, N] w: per-row partial sums over time
  void* dB_rows;     // fixed B: [B, D, N] w
  void* dC_rows;     // fixed C: [B, D, N] w
  void* dB_partial;  // variable B: [n_slices, B, N, L] w (CUDA) or [n_slices, B, L, N] w (CPU)
  void* dC_partial;
  void* dD_rows;     // [B, D] acc_t
  void* ddelta_bias_rows;  // [B, D] acc_t
  void* dinitial_state;    // [B, D, N] w, contiguous
};

struct SelectiveStateUpdateParams {
  int64_t batch, nheads, headdim, dstate, groups, state_batch;
  bool softplus;
  void* state;  // [B_state, H, P, N] state dtype, any strides
  int64_t state_batch_stride, state_head_stride, state_dim_stride, state_n_stride;
  const void* x;  // [B, H, P] input dtype
  int64_t x_batch_stride, x_head_stride, x_dim_stride;
  const void* dt;
  int64_t dt_batch_stride, dt_head_stride, dt_dim_stride;
  const void* z;  // or nullptr
  int64_t z_batch_stride, z_head_stride, z_dim_stride;
  const void* A;           // [H, P, N] acc_t, contiguous
  const void* B;           // [B, G, N] acc_t, contiguous
  const void* C;           // [B, G, N] acc_t, contiguous
  const void* D;           // [H, P] acc_t, contiguous, or nullptr
  const void* dt_bias;     // [H, P] acc_t, contiguous, or nullptr
  const int64_t* state_indices;  // [B] or nullptr; negative = padding row
  void* out;               // [B, H, P] input dtype, contiguous
};

// What differs between the devices in the backward: how many independent tasks to aim for when
// slicing channels, and the layout of the variable-B/C partial sums.
struct SelectiveScanDeviceConfig {
  int64_t target_tasks;
  bool partial_time_major;  // [S, B, L, N] (CPU) instead of [S, B, N, L] (CUDA)
};

namespace selective_scan {

inline at::ScalarType acc_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::ScalarType state_dtype(const at::Tensor& u, bool is_complex) {
  const auto acc = acc_dtype(u);
  if (!is_complex) return acc;
  return acc == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
}

// The converted inputs the kernels read (kept alive for the duration of the call).
struct Prepared {
  bool is_complex;
  int64_t batch, dim, seqlen, dstate;
  at::Tensor A;                 // [D, N] w
  at::Tensor B, C;              // fixed: [D, N] w; variable: [B, G, N, L] (a view of the input)
  std::optional<at::Tensor> D, delta_bias;  // [D] acc
  std::optional<at::Tensor> initial_state;  // [B, D, N] w
};

inline void check_bc(const at::Tensor& t, const char* name, const at::Tensor& u, const at::Tensor& A) {
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

// The checks behind the Python wrapper's messages, repeated so a direct torch.ops call cannot
// reach a kernel with inconsistent arguments.
inline void check_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias,
                       const std::optional<at::Tensor>& initial_state) {
  SSMK_CHECK_VALUE(u.dim() == 3, "u: expected 3 dims (batch, dim, seqlen), got shape ", u.sizes());
  check_floating(u, "u");
  const int64_t Bt = u.size(0), Dm = u.size(1), L = u.size(2);
  SSMK_CHECK_VALUE(L >= 1, "u: expected seqlen >= 1, got ", L);
  check_shape(delta, u.sizes(), "delta");
  check_dtype(delta, u.scalar_type(), "delta");
  check_same_device(delta, u, "delta");
  SSMK_CHECK_VALUE(A.dim() == 2 && A.size(0) == Dm, "A: expected shape (dim=", Dm, ", dstate), got ",
                   A.sizes());
  SSMK_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble ||
                      A.scalar_type() == at::kComplexFloat || A.scalar_type() == at::kComplexDouble,
                  "A: expected dtype float32 or complex64, got ", A.scalar_type());
  check_same_device(A, u, "A");
  const int64_t N = A.size(1);
  SSMK_CHECK_VALUE(N >= 1 && N <= kMaxDstate, "A: expected dstate in [1, ", kMaxDstate, "], got ", N);
  check_bc(B, "B", u, A);
  check_bc(C, "C", u, A);
  if (D) {
    check_shape(*D, {Dm}, "D");
    check_floating(*D, "D");
    check_same_device(*D, u, "D");
  }
  if (delta_bias) {
    check_shape(*delta_bias, {Dm}, "delta_bias");
    check_floating(*delta_bias, "delta_bias");
    check_same_device(*delta_bias, u, "delta_bias");
  }
  if (z) {
    check_shape(*z, u.sizes(), "z");
    check_dtype(*z, u.scalar_type(), "z");
    check_same_device(*z, u, "z");
  }
  if (initial_state) {
    check_shape(*initial_state, {Bt, Dm, N}, "initial_state");
    SSMK_CHECK_TYPE(initial_state->is_complex() == A.is_complex(), "initial_state: expected a ",
                    A.is_complex() ? "complex" : "real", " tensor like A, got ",
                    initial_state->scalar_type());
    if (!initial_state->is_complex()) check_floating(*initial_state, "initial_state");
    check_same_device(*initial_state, u, "initial_state");
  }
}

inline Prepared prepare(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& delta_bias,
                        const std::optional<at::Tensor>& initial_state) {
  Prepared pr;
  pr.is_complex = A.is_complex();
  pr.batch = u.size(0);
  pr.dim = u.size(1);
  pr.seqlen = u.size(2);
  pr.dstate = A.size(1);
  const auto w = state_dtype(u, pr.is_complex);
  const auto acc = acc_dtype(u);
  pr.A = A.to(w).contiguous();
  auto bc = [&](const at::Tensor& t) {
    if (t.dim() == 2) return t.to(w).contiguous();
    // Complex variable B/C are read in the state type; real ones in u's dtype (as given).
    const at::Tensor v = pr.is_complex ? t.to(w) : t;
    return v.dim() == 3 ? v.unsqueeze(1) : v;
  };
  pr.B = bc(B);
  pr.C = bc(C);
  if (D) pr.D = D->to(acc).contiguous();
  if (delta_bias) pr.delta_bias = delta_bias->to(acc).contiguous();
  if (initial_state) pr.initial_state = initial_state->to(w);
  return pr;
}

inline void set_common_params(SelectiveScanParams& p, const Prepared& pr, const at::Tensor& u,
                              const at::Tensor& delta, const std::optional<at::Tensor>& z,
                              bool softplus) {
  p = SelectiveScanParams{};
  p.batch = pr.batch;
  p.dim = pr.dim;
  p.seqlen = pr.seqlen;
  p.dstate = pr.dstate;
  p.n_chunks = num_chunks(pr.seqlen);
  p.is_complex = pr.is_complex;
  p.softplus = softplus;
  p.u = u.data_ptr();
  p.u_batch_stride = u.stride(0);
  p.u_dim_stride = u.stride(1);
  p.u_l_stride = u.stride(2);
  p.delta = delta.data_ptr();
  p.delta_batch_stride = delta.stride(0);
  p.delta_dim_stride = delta.stride(1);
  p.delta_l_stride = delta.stride(2);
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_dim_stride = z->stride(1);
    p.z_l_stride = z->stride(2);
  }
  p.A = pr.A.data_ptr();
  p.B_variable = pr.B.dim() == 4;
  p.C_variable = pr.C.dim() == 4;
  p.B = pr.B.data_ptr();
  p.C = pr.C.data_ptr();
  if (p.B_variable) {
    p.B_groups = pr.B.size(1);
    p.B_batch_stride = pr.B.stride(0);
    p.B_group_stride = pr.B.stride(1);
    p.B_n_stride = pr.B.stride(2);
    p.B_l_stride = pr.B.stride(3);
  }
  if (p.C_variable) {
    p.C_groups = pr.C.size(1);
    p.C_batch_stride = pr.C.stride(0);
    p.C_group_stride = pr.C.stride(1);
    p.C_n_stride = pr.C.stride(2);
    p.C_l_stride = pr.C.stride(3);
  }
  p.D = pr.D ? pr.D->data_ptr() : nullptr;
  p.delta_bias = pr.delta_bias ? pr.delta_bias->data_ptr() : nullptr;
  if (pr.initial_state) {
    p.initial_state = pr.initial_state->data_ptr();
    p.init_batch_stride = pr.initial_state->stride(0);
    p.init_dim_stride = pr.initial_state->stride(1);
    p.init_n_stride = pr.initial_state->stride(2);
  }
}

// Forward driver: returns (out, last_state, checkpoints). `launch(params, prepared, u_dtype)`
// runs the device kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, Launch&& launch) {
  check_args(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const Prepared pr = prepare(u, A, B, C, D, delta_bias, initial_state);
  const auto w = state_dtype(u, pr.is_complex);
  const int64_t nc = num_chunks(pr.seqlen);
  at::Tensor out = new_output({pr.batch, pr.dim, pr.seqlen}, u.options());
  at::Tensor last_state = new_output({pr.batch, pr.dim, pr.dstate}, u.options().dtype(w));
  at::Tensor checkpoints = new_output({pr.batch, pr.dim, nc, pr.dstate}, u.options().dtype(w));
  SelectiveScanParams p;
  set_common_params(p, pr, u, delta, z, delta_softplus);
  p.out = out.data_ptr();
  p.last_state = last_state.data_ptr();
  p.checkpoints = checkpoints.data_ptr();
  launch(p, pr, u.scalar_type());
  return {out, last_state, checkpoints};
}

// Channels per backward slice: a divisor of the group sizes of every variable B/C (a slice never
// straddles two groups). The largest one that still gives `target` independent tasks, so the
// partial sums stay small. Depends only on the shapes, so the summation order (and the result) is
// the same on every run.
inline int64_t choose_slice_channels(const SelectiveScanParams& p, int64_t target) {
  if (!p.B_variable && !p.C_variable) return 1;
  int64_t g = p.dim;
  if (p.B_variable) g = std::gcd(g, p.dim / p.B_groups);
  if (p.C_variable) g = std::gcd(g, p.dim / p.C_groups);
  for (int64_t cs = g; cs > 1; --cs) {
    if (g % cs == 0 && p.batch * (p.dim / cs) >= target) return cs;
  }
  return 1;
}

// Sums the per-slice partials of a variable B/C gradient over the slices of each group (in slice
// order) into the gradient's shape [B, G, N, L] (or [B, N, L] for ungrouped variable input).
inline at::Tensor reduce_partial(const at::Tensor& partial, const SelectiveScanParams& p,
                                 int64_t groups, bool time_major, const at::Tensor& like) {
  const int64_t S = p.n_slices, per_group = S / groups;
  at::Tensor g;
  if (time_major) {
    g = partial.view({groups, per_group, p.batch, p.seqlen, p.dstate}).sum(1).permute({1, 0, 3, 2});
  } else {
    g = partial.view({groups, per_group, p.batch, p.dstate, p.seqlen}).sum(1).permute({1, 0, 2, 3});
  }
  g = g.to(like.scalar_type()).contiguous();
  return like.dim() == 3 ? g.squeeze(1) : g;
}

// Backward driver: returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state). dz is
// empty when z is None; dD and ddelta_bias are always computed (cheap).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const at::Tensor& checkpoints,
    const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state,
    const SelectiveScanDeviceConfig& config, Launch&& launch) {
  check_args(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const Prepared pr = prepare(u, A, B, C, D, delta_bias, initial_state);
  const auto w = state_dtype(u, pr.is_complex);
  const auto acc = acc_dtype(u);
  const int64_t Bt = pr.batch, Dm = pr.dim, L = pr.seqlen, N = pr.dstate;
  const int64_t nc = num_chunks(L);
  check_shape(checkpoints, {Bt, Dm, nc, N}, "checkpoints");
  check_dtype(checkpoints, w, "checkpoints");
  check_same_device(checkpoints, u, "checkpoints");
  SSMK_CHECK_VALUE(checkpoints.is_contiguous(), "checkpoints: expected a contiguous tensor");
  check_shape(dout, u.sizes(), "dout");
  check_same_device(dout, u, "dout");
  const at::Tensor dout_u = dout.scalar_type() == u.scalar_type() ? dout : dout.to(u.scalar_type());
  std::optional<at::Tensor> dlast;
  if (dlast_state) {
    check_shape(*dlast_state, {Bt, Dm, N}, "dlast_state");
    check_same_device(*dlast_state, u, "dlast_state");
    dlast = dlast_state->to(w);
  }

  SelectiveScanParams p;
  set_common_params(p, pr, u, delta, z, delta_softplus);
  p.checkpoints = checkpoints.data_ptr();
  p.dout = dout_u.data_ptr();
  p.dout_batch_stride = dout_u.stride(0);
  p.dout_dim_stride = dout_u.stride(1);
  p.dout_l_stride = dout_u.stride(2);
  if (dlast) {
    p.dlast_state = dlast->data_ptr();
    p.dlast_batch_stride = dlast->stride(0);
    p.dlast_dim_stride = dlast->stride(1);
    p.dlast_n_stride = dlast->stride(2);
  }
  p.slice_channels = choose_slice_channels(p, config.target_tasks);
  p.n_slices = Dm / p.slice_channels;

  const auto wopt = u.options().dtype(w);
  at::Tensor du = new_output({Bt, Dm, L}, u.options());
  at::Tensor ddelta = new_output({Bt, Dm, L}, u.options());
  at::Tensor dz = z ? new_output({Bt, Dm, L}, u.options()) : at::empty({0}, u.options());
  at::Tensor dA_rows = new_output({Bt, Dm, N}, wopt);
  at::Tensor dinit = new_output({Bt, Dm, N}, wopt);
  at::Tensor dD_rows = new_output({Bt, Dm}, u.options().dtype(acc));
  at::Tensor ddb_rows = new_output({Bt, Dm}, u.options().dtype(acc));
  auto bc_buffer = [&](bool variable) {
    if (!variable) return new_output({Bt, Dm, N}, wopt);
    if (config.partial_time_major) return new_output({p.n_slices, Bt, L, N}, wopt);
    return new_output({p.n_slices, Bt, N, L}, wopt);
  };
  at::Tensor dB_buf = bc_buffer(p.B_variable);
  at::Tensor dC_buf = bc_buffer(p.C_variable);
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z ? dz.data_ptr() : nullptr;
  p.dA_rows = dA_rows.data_ptr();
  p.dinitial_state = dinit.data_ptr();
  p.dD_rows = dD_rows.data_ptr();
  p.ddelta_bias_rows = ddb_rows.data_ptr();
  (p.B_variable ? p.dB_partial : p.dB_rows) = dB_buf.data_ptr();
  (p.C_variable ? p.dC_partial : p.dC_rows) = dC_buf.data_ptr();
  launch(p, pr, u.scalar_type());

  // The reductions over batch (and over the slices of a group) run in a fixed order.
  const at::Tensor dA = dA_rows.sum(0).to(A.scalar_type());
  const at::Tensor dB = p.B_variable ? reduce_partial(dB_buf, p, p.B_groups, config.partial_time_major, B)
                                     : dB_buf.sum(0).to(B.scalar_type());
  const at::Tensor dC = p.C_variable ? reduce_partial(dC_buf, p, p.C_groups, config.partial_time_major, C)
                                     : dC_buf.sum(0).to(C.scalar_type());
  const at::Tensor dD = dD_rows.sum(0).to(D ? D->scalar_type() : acc);
  const at::Tensor ddb = ddb_rows.sum(0).to(delta_bias ? delta_bias->scalar_type() : acc);
  const at::Tensor dinit_out = initial_state ? dinit.to(initial_state->scalar_type()) : dinit;
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, dinit_out};
}

// Decode step: normalises the no-heads layout to heads = 1, checks, converts the small
// parameters to acc_t and runs `launch(params, x_dtype, state_dtype)`.
template <typename Launch>
at::Tensor update(const at::Tensor& state_in, const at::Tensor& x_in, const at::Tensor& dt_in,
                  const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
                  const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& z_in,
                  const std::optional<at::Tensor>& dt_bias_in, bool dt_softplus,
                  const std::optional<at::Tensor>& state_batch_indices, Launch&& launch) {
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
  SSMK_CHECK_VALUE(x.size(1) == H && x.size(2) == P, "x: expected shape (batch, ",
                   heads ? "nheads, headdim" : "dim", ") matching state ", state_in.sizes(),
                   ", got ", x_in.sizes());
  SSMK_CHECK_VALUE(N >= 1 && N <= kMaxDstate, "state: expected dstate in [1, ", kMaxDstate, "], got ", N);
  const auto acc = acc_dtype(x_in);
  SSMK_CHECK_TYPE(state.scalar_type() == acc, "state: expected dtype ", acc, ", got ",
                  state.scalar_type());
  check_same_device(state_in, x_in, "state");
  check_shape(dt_in, x_in.sizes(), "dt");
  check_dtype(dt_in, x_in.scalar_type(), "dt");
  check_same_device(dt_in, x_in, "dt");
  const at::Tensor dt = lift(dt_in, 1);
  const at::Tensor A = lift(A_in, 0);
  SSMK_CHECK_VALUE(A.dim() == 3 && A.size(0) == H && A.size(1) == P && A.size(2) == N, "A: expected shape ",
                   heads ? "(nheads, headdim, dstate)" : "(dim, dstate)", " matching state ",
                   state_in.sizes(), ", got ", A_in.sizes());
  check_floating(A_in, "A");
  check_same_device(A_in, x_in, "A");
  auto bc = [&](const at::Tensor& t, const char* name) {
    check_floating(t, name);
    check_same_device(t, x_in, name);
    const at::Tensor v = lift(t, 1);
    SSMK_CHECK_VALUE(v.dim() == 3 && v.size(0) == Bt && v.size(1) >= 1 && H % v.size(1) == 0 &&
                         v.size(2) == N,
                     name, ": expected shape ", heads ? "(batch, groups, dstate) with groups dividing nheads" : "(batch, dstate)",
                     " for batch=", Bt, ", dstate=", N, ", got ", t.sizes());
    return v.to(acc).contiguous();
  };
  const at::Tensor B = bc(B_in, "B"), C = bc(C_in, "C");
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
  const auto D = hp(D_in, "D"), dt_bias = hp(dt_bias_in, "dt_bias");
  std::optional<at::Tensor> z;
  if (z_in) {
    check_shape(*z_in, x_in.sizes(), "z");
    check_dtype(*z_in, x_in.scalar_type(), "z");
    check_same_device(*z_in, x_in, "z");
    z = lift(*z_in, 1);
  }
  std::optional<at::Tensor> idx;
  if (state_batch_indices) {
    check_shape(*state_batch_indices, {Bt}, "state_batch_indices");
    SSMK_CHECK_TYPE(state_batch_indices->scalar_type() == at::kInt ||
                        state_batch_indices->scalar_type() == at::kLong,
                    "state_batch_indices: expected dtype int32 or int64, got ",
                    state_batch_indices->scalar_type());
    check_same_device(*state_batch_indices, x_in, "state_batch_indices");
    idx = state_batch_indices->to(at::kLong).contiguous();
  } else {
    SSMK_CHECK_VALUE(state.size(0) == Bt, "state: expected batch ", Bt, ", got ", state.size(0));
  }
  const at::Tensor A_acc = A.to(acc).contiguous();
  at::Tensor out = new_output({Bt, H, P}, x.options());

  SelectiveStateUpdateParams p{};
  p.batch = Bt;
  p.nheads = H;
  p.headdim = P;
  p.dstate = N;
  p.groups = B.size(1);
  p.state_batch = state.size(0);
  p.softplus = dt_softplus;
  p.state = state.data_ptr();
  p.state_batch_stride = state.stride(0);
  p.state_head_stride = state.stride(1);
  p.state_dim_stride = state.stride(2);
  p.state_n_stride = state.stride(3);
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.x_dim_stride = x.stride(2);
  p.dt = dt.data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_head_stride = dt.stride(1);
  p.dt_dim_stride = dt.stride(2);
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_head_stride = z->stride(1);
    p.z_dim_stride = z->stride(2);
  }
  p.A = A_acc.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = D ? D->data_ptr() : nullptr;
  p.dt_bias = dt_bias ? dt_bias->data_ptr() : nullptr;
  p.state_indices = idx ? idx->data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  launch(p, x.scalar_type());
  return heads ? out : out.squeeze(1);
}

}  // namespace selective_scan
}  // namespace ssmk
