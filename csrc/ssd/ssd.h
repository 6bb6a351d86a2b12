// ssd_scan (Mamba-2 chunked SSD): parameters, argument checks and the host-side driver shared by
// the CPU and CUDA implementations.
//
// The driver runs the SSD decomposition (see ssd_math.h) as a fixed sequence of stages on
// chunk-major accumulation-dtype buffers ([B, nchunks, H, Q, ...], the sequence zero-padded to a
// multiple of the chunk size Q). Each device supplies a `Stages` object with the batched GEMMs
// (BLAS on the CPU, hand-written tensor-core kernels on the GPU) and the stage kernels for the
// rest (cumulative sums, masked decays, the scans across chunks, the epilogues and the
// backward's reductions). Both devices therefore run the same algorithm on the same buffers.
//
// Heads of one group are adjacent (head h uses group h / (H / G)), so the per-head products with
// a group's B or C are one GEMM per (batch, chunk, group) on the heads stacked along P.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/output.h"
#include "ssd/ssd_math.h"

namespace ssmk {

struct SsdParams {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk, nchunks;
  bool softplus, clamp;
  double dt_lo, dt_hi;

  // Inputs in their own dtype and strides.
  const void* x;  // [B, L, H, P] x dtype
  int64_t x_batch_stride, x_l_stride, x_h_stride, x_p_stride;
  const void* dt;  // [B, L, H] x dtype
  int64_t dt_batch_stride, dt_l_stride, dt_h_stride;
  const void* z;  // [B, L, H, P] x dtype, or nullptr
  int64_t z_batch_stride, z_l_stride, z_h_stride, z_p_stride;
  const void* dout;  // [B, L, H, P] x dtype (backward)
  int64_t dout_batch_stride, dout_l_stride, dout_h_stride, dout_p_stride;

  // Parameters, accumulation dtype, contiguous.
  const void* A;        // [H]
  const void* dt_bias;  // [H] or nullptr
  const void* D;        // [H, P] or nullptr
  const int32_t* seg;   // [B, nchunks * Q] seq_idx padded with its last value, or nullptr

  // Chunk buffers, accumulation dtype, contiguous.
  void* dtv;     // [B, nc, H, Q] processed dt (0 on padding)
  void* acs;     // [B, nc, H, Q] cumulative sum of dt * A within the chunk
  void* e;       // [B, nc, H, Q] e^{Acs_last - Acs_s}, masked to the last position's sequence
  void* r;       // [B, nc, H, Q] e^{Acs_t}, masked to the previous chunk's last sequence
  void* kdecay;  // [B, nc, H] e^{Acs_last}, 0 when the chunk starts a new sequence
  const void* cb;  // [B, nc, G, Q, Q] C_t . B_s
  void* gl;        // [B, nc, H, Q, Q] GL = CB masked and decayed: (C_t . B_s) e^{Acs_t - Acs_s};
                   // only where a device materialises it (the CUDA float64 path)

  void* states;        // [B, nc, H, P, N] in: chunk states S_c; out: state before chunk c
  const void* init;    // [B, H, P, N] or nullptr
  void* final_states;  // [B, H, P, N]

  const void* y_intra;   // [B, nc, H, Q, P] GL @ (dt x)
  const void* y_interT;  // [B, nc, H, P, Q] H_{c-1} @ C^T (without the e^{Acs_t} factor)
  void* out;             // [B, L, H, P] x dtype, contiguous

  // Backward.
  void* dstates;         // [B, nc, H, P, N] in: d loss / d H_{c-1} through chunk c's outputs;
                         // out: d loss / d H_c (state at the end of chunk c)
  const void* dfinal;    // [B, H, P, N] or nullptr
  void* dinit;           // [B, H, P, N]
  void* ddecay;          // [B, nc, H, nsplit] partial sums of d loss / d Acs_last via kdecay
  int64_t nsplit;
  void* dgl;             // Q x Q per task, where the device's wsum stage finds it: in: dY (dt x)^T;
                         // out: (dY (dt x)^T) * decay mask
  void* dacs;            // [B, nc, H, Q] intra-chunk part of d loss / d Acs
  const void* dy;        // [B, nc, H, Q, P] d loss / d y (y before the z gate)
  const void* dyrT;      // [B, nc, H, P, Q] dy^T scaled by r
  const void* xdt;       // [B, nc, H, Q, P] dt x
  const void* dxdt;      // [B, nc, H, Q, P] GL^T dy (intra part of d loss / d (dt x))
  const void* zT;        // [B, nc, H, P, Q] (B dH_c^T)^T: state part of d loss / d (dt x), before e
  void* dx;              // [B, L, H, P] x dtype, contiguous
  void* ddt;             // [B, L, H] accumulation dtype, contiguous (gradient of raw dt)
  void* dz;              // [B, L, H, P] x dtype, contiguous, or nullptr
  void* dA_part;         // [B, nc, H]
  void* dD_part;         // [B, nc, H, P] or nullptr
};

namespace ssd {

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The checks behind the Python wrapper's messages, repeated here so that a direct torch.ops call
// cannot reach a kernel with inconsistent arguments.
inline void check_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, int64_t chunk_size,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& dt_bias, double dt_lo, double dt_hi,
                       const std::optional<at::Tensor>& initial_states,
                       const std::optional<at::Tensor>& seq_idx) {
  SSMK_CHECK_VALUE(x.dim() == 4, "x: expected 4 dims (batch, seqlen, nheads, headdim), got shape ",
                   x.sizes());
  check_floating(x, "x");
  const int64_t Bn = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  SSMK_CHECK_VALUE(L >= 1, "x: expected seqlen >= 1, got ", L);
  SSMK_CHECK_VALUE(H >= 1 && P >= 1 && P <= kMaxHeaddim, "x: expected nheads >= 1 and 1 <= headdim <= ",
                   kMaxHeaddim, ", got shape ", x.sizes());
  check_shape(dt, {Bn, L, H}, "dt");
  check_dtype(dt, x.scalar_type(), "dt");
  check_same_device(dt, x, "dt");
  check_floating(A, "A");
  check_shape(A, {H}, "A");
  check_same_device(A, x, "A");
  SSMK_CHECK_VALUE(B.dim() == 4 && B.size(0) == Bn && B.size(1) == L,
                   "B: expected shape (batch=", Bn, ", seqlen=", L, ", groups, dstate), got ", B.sizes());
  const int64_t G = B.size(2), N = B.size(3);
  SSMK_CHECK_VALUE(G >= 1 && H % G == 0, "B: expected groups dividing nheads=", H, ", got groups=", G);
  SSMK_CHECK_VALUE(N >= 1 && N <= kMaxDstate, "B: expected 1 <= dstate <= ", kMaxDstate, ", got ", N);
  check_dtype(B, x.scalar_type(), "B");
  check_same_device(B, x, "B");
  check_shape(C, {Bn, L, G, N}, "C");
  check_dtype(C, x.scalar_type(), "C");
  check_same_device(C, x, "C");
  SSMK_CHECK_VALUE(is_pow2(chunk_size) && chunk_size >= kMinChunk && chunk_size <= kMaxChunk,
                   "chunk_size: expected a power of two in [", kMinChunk, ", ", kMaxChunk, "], got ",
                   chunk_size);
  if (D) {
    check_floating(*D, "D");
    SSMK_CHECK_VALUE((D->dim() == 1 && D->size(0) == H) ||
                         (D->dim() == 2 && D->size(0) == H && D->size(1) == P),
                     "D: expected shape (nheads=", H, ",) or (nheads=", H, ", headdim=", P, "), got ",
                     D->sizes());
    check_same_device(*D, x, "D");
  }
  if (z) {
    check_shape(*z, {Bn, L, H, P}, "z");
    check_dtype(*z, x.scalar_type(), "z");
    check_same_device(*z, x, "z");
  }
  if (dt_bias) {
    check_floating(*dt_bias, "dt_bias");
    check_shape(*dt_bias, {H}, "dt_bias");
    check_same_device(*dt_bias, x, "dt_bias");
  }
  SSMK_CHECK_VALUE(!(dt_lo > dt_hi) && !std::isnan(dt_lo) && !std::isnan(dt_hi),
                   "dt_limit: expected lo <= hi, got (", dt_lo, ", ", dt_hi, ")");
  if (initial_states) {
    check_floating(*initial_states, "initial_states");
    check_shape(*initial_states, {Bn, H, P, N}, "initial_states");
    check_same_device(*initial_states, x, "initial_states");
  }
  if (seq_idx) {
    check_shape(*seq_idx, {Bn, L}, "seq_idx");
    check_dtype(*seq_idx, at::kInt, "seq_idx");
    check_same_device(*seq_idx, x, "seq_idx");
  }
}

// Everything the forward and the backward share: processed parameters, packed chunk buffers,
// the masked decay matrices and the chunk states (before the scan).
struct Prepared {
  at::Tensor A, dt_bias, D, seg, init;
  at::Tensor dtv, acs, e, r, kdecay;
  at::Tensor Bc, Cc, cb, xdt, xwT, states;
};

// [B, L, K1, K2] (any dtype and strides) -> [B, nc, K1, Q, K2] accumulation dtype, contiguous,
// positions >= L zero.
inline at::Tensor pack_chunks(const at::Tensor& t, int64_t nc, int64_t Q, at::ScalarType acc) {
  const int64_t Bn = t.size(0), L = t.size(1), K1 = t.size(2), K2 = t.size(3);
  at::Tensor a = t.to(acc);
  if (nc * Q != L) a = at::constant_pad_nd(a, {0, 0, 0, 0, 0, nc * Q - L});
  return a.reshape({Bn, nc, Q, K1, K2}).permute({0, 1, 3, 2, 4}).contiguous();
}

// Inverse of pack_chunks for [B, nc, K1, Q, K2] -> [B, L, K1, K2] in `dtype`.
inline at::Tensor unpack_chunks(const at::Tensor& t, int64_t L, at::ScalarType dtype) {
  const int64_t Bn = t.size(0), nc = t.size(1), K1 = t.size(2), Q = t.size(3), K2 = t.size(4);
  return t.permute({0, 1, 3, 2, 4}).reshape({Bn, nc * Q, K1, K2}).narrow(1, 0, L).to(dtype).contiguous();
}

// Zero structure of a product's operand or result that a device's GEMM may exploit (results are
// the same either way, up to rounding): kLowerA: A[m, k] = 0 for k > m; kUpperA: A[m, k] = 0 for
// k < m; kLowerOut: only out[m, n] with n <= m is used (the rest may be anything finite).
// Both devices apply them per block of kGemmRowBlock rows of A (the GPU GEMM's tile height).
enum class Tri : int { kNone = 0, kLowerA = 1, kUpperA = 2, kLowerOut = 3 };
constexpr int64_t kGemmRowBlock = 64;

inline void set_input_params(SsdParams& p, const at::Tensor& x, const at::Tensor& dt,
                             const std::optional<at::Tensor>& z, int64_t G, int64_t N, int64_t Q,
                             bool softplus, double lo, double hi) {
  p = SsdParams{};
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.nheads = x.size(2);
  p.headdim = x.size(3);
  p.ngroups = G;
  p.dstate = N;
  p.chunk = Q;
  p.nchunks = (p.seqlen + Q - 1) / Q;
  p.softplus = softplus;
  p.clamp = dt_limit_active(lo, hi);
  p.dt_lo = lo;
  p.dt_hi = hi;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_l_stride = x.stride(1);
  p.x_h_stride = x.stride(2);
  p.x_p_stride = x.stride(3);
  p.dt = dt.data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_l_stride = dt.stride(1);
  p.dt_h_stride = dt.stride(2);
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_l_stride = z->stride(1);
    p.z_h_stride = z->stride(2);
    p.z_p_stride = z->stride(3);
  }
}

// Stages 1-4 of the decomposition up to (not including) the scan across chunks. GL itself is never
// stored: the stages that use it (intra_fwd, intra_bwd, wsum) rebuild it from CB and Acs.
template <typename Stages>
Prepared prepare(SsdParams& p, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bm,
                 const at::Tensor& Cm, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& dt_bias,
                 const std::optional<at::Tensor>& initial_states,
                 const std::optional<at::Tensor>& seq_idx, Stages& stages) {
  const auto acc = acc_dtype(x);
  const auto in_dtype = x.scalar_type();
  const auto opts = x.options().dtype(acc);
  const int64_t Bn = p.batch, L = p.seqlen, H = p.nheads, P = p.headdim, G = p.ngroups;
  const int64_t N = p.dstate, Q = p.chunk, nc = p.nchunks, Hg = H / G;
  Prepared s;
  s.A = A.to(acc).contiguous();
  p.A = s.A.data_ptr();
  if (dt_bias) {
    s.dt_bias = dt_bias->to(acc).contiguous();
    p.dt_bias = s.dt_bias.data_ptr();
  }
  if (D) {
    s.D = (D->dim() == 1 ? D->to(acc).unsqueeze(1).expand({H, P}) : D->to(acc)).contiguous();
    p.D = s.D.data_ptr();
  }
  if (seq_idx) {
    s.seg = seq_idx->contiguous();
    if (nc * Q != L) {
      s.seg = at::cat({s.seg, s.seg.narrow(1, L - 1, 1).expand({Bn, nc * Q - L})}, 1).contiguous();
    }
    p.seg = s.seg.data_ptr<int32_t>();
  }
  if (initial_states) {
    s.init = initial_states->to(acc).contiguous();
    p.init = s.init.data_ptr();
  }

  s.dtv = at::empty({Bn, nc, H, Q}, opts);
  s.acs = at::empty({Bn, nc, H, Q}, opts);
  s.e = at::empty({Bn, nc, H, Q}, opts);
  s.r = at::empty({Bn, nc, H, Q}, opts);
  s.kdecay = at::empty({Bn, nc, H}, opts);
  p.dtv = s.dtv.data_ptr();
  p.acs = s.acs.data_ptr();
  p.e = s.e.data_ptr();
  p.r = s.r.data_ptr();
  p.kdecay = s.kdecay.data_ptr();
  stages.prep(p, in_dtype);

  s.Bc = pack_chunks(Bm, nc, Q, acc);  // [B, nc, G, Q, N]
  s.Cc = pack_chunks(Cm, nc, Q, acc);  // [B, nc, G, Q, N]
  const at::Tensor Bg = s.Bc.view({Bn * nc * G, Q, N});
  const at::Tensor Cg = s.Cc.view({Bn * nc * G, Q, N});
  s.cb = stages.gemm(Cg, Bg.transpose(1, 2), in_dtype, Tri::kLowerOut);  // [B*nc*G, Q, Q]
  p.cb = s.cb.data_ptr();

  // Not in place: with one head and no padding the packed tensor can alias x itself.
  s.xdt = pack_chunks(x, nc, Q, acc) * s.dtv.unsqueeze(-1);  // [B, nc, H, Q, P]
  s.xwT = (s.xdt * s.e.unsqueeze(-1)).transpose(-1, -2).contiguous();  // [B, nc, H, P, Q]
  // S_c = sum_s e_s dt_s x_s B_s^T, heads of a group stacked along P.
  s.states = stages.gemm(s.xwT.view({Bn * nc * G, Hg * P, Q}), Bg, in_dtype);
  p.states = s.states.data_ptr();
  p.xdt = s.xdt.data_ptr();
  return s;
}

// y_inter^T per head: H_{c-1} (P x N) @ C^T (N x Q), heads of a group stacked along P.
template <typename Stages>
at::Tensor inter_outputs(const Prepared& s, const SsdParams& p, at::ScalarType in_dtype, const Stages& stages) {
  const int64_t BncG = p.batch * p.nchunks * p.ngroups, Hg = p.nheads / p.ngroups;
  return stages.gemm(s.states.view({BncG, Hg * p.headdim, p.dstate}),
                     s.Cc.view({BncG, p.chunk, p.dstate}).transpose(1, 2), in_dtype);
}

template <typename Stages>
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                       const at::Tensor& Bm, const at::Tensor& Cm, int64_t chunk_size,
                                       const std::optional<at::Tensor>& D,
                                       const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                       double dt_lo, double dt_hi,
                                       const std::optional<at::Tensor>& initial_states,
                                       const std::optional<at::Tensor>& seq_idx, Stages&& stages) {
  check_args(x, dt, A, Bm, Cm, chunk_size, D, z, dt_bias, dt_lo, dt_hi, initial_states, seq_idx);
  const auto acc = acc_dtype(x);
  const auto in_dtype = x.scalar_type();
  SsdParams p;
  set_input_params(p, x, dt, z, Bm.size(2), Bm.size(3), chunk_size, dt_softplus, dt_lo, dt_hi);
  Prepared s = prepare(p, x, A, Bm, Cm, D, dt_bias, initial_states, seq_idx, stages);

  at::Tensor final_states = new_output({p.batch, p.nheads, p.headdim, p.dstate}, x.options().dtype(acc));
  p.final_states = final_states.data_ptr();
  stages.scan_fwd(p, in_dtype);

  const at::Tensor y_intra = stages.intra_fwd(p, s.xdt, in_dtype);
  const at::Tensor y_interT = inter_outputs(s, p, in_dtype, stages);
  at::Tensor out = new_output({p.batch, p.seqlen, p.nheads, p.headdim}, x.options());
  p.y_intra = y_intra.data_ptr();
  p.y_interT = y_interT.data_ptr();
  p.out = out.data_ptr();
  stages.epilogue_fwd(p, in_dtype);
  return {out, final_states};
}

template <typename Stages>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
bwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
    const at::Tensor& Cm, int64_t chunk_size, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    double dt_lo, double dt_hi, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout_in,
    const std::optional<at::Tensor>& dfinal_states, Stages&& stages) {
  check_args(x, dt, A, Bm, Cm, chunk_size, D, z, dt_bias, dt_lo, dt_hi, initial_states, seq_idx);
  const int64_t Bn = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t G = Bm.size(2), N = Bm.size(3);
  check_shape(dout_in, {Bn, L, H, P}, "dout");
  check_same_device(dout_in, x, "dout");
  if (dfinal_states) {
    check_shape(*dfinal_states, {Bn, H, P, N}, "dfinal_states");
    check_same_device(*dfinal_states, x, "dfinal_states");
  }
  const auto acc = acc_dtype(x);
  const auto in_dtype = x.scalar_type();
  const auto opts = x.options().dtype(acc);
  // dout arrives in whatever dtype autograd produced; kernels read it in x's dtype.
  const at::Tensor dout = dout_in.scalar_type() == in_dtype ? dout_in : dout_in.to(in_dtype);

  SsdParams p;
  set_input_params(p, x, dt, z, G, N, chunk_size, dt_softplus, dt_lo, dt_hi);
  p.dout = dout.data_ptr();
  p.dout_batch_stride = dout.stride(0);
  p.dout_l_stride = dout.stride(1);
  p.dout_h_stride = dout.stride(2);
  p.dout_p_stride = dout.stride(3);
  const int64_t Q = p.chunk, nc = p.nchunks, Hg = H / G;
  const int64_t BncG = Bn * nc * G;
  Prepared s = prepare(p, x, A, Bm, Cm, D, dt_bias, initial_states, seq_idx, stages);

  // dy = dout * silu(z): the gradient of y before the gate.
  at::Tensor dy_l = dout.to(acc);
  if (z) dy_l = dy_l * at::silu(z->to(acc));
  const at::Tensor dy = pack_chunks(dy_l, nc, Q, acc);  // [B, nc, H, Q, P]
  const at::Tensor dyrT = (dy * s.r.unsqueeze(-1)).transpose(-1, -2).contiguous();  // [B, nc, H, P, Q]
  // d loss / d H_{c-1} through chunk c's inter-chunk outputs: (r dy)^T C.
  at::Tensor dstates = stages.gemm(dyrT.view({BncG, Hg * P, Q}), s.Cc.view({BncG, Q, N}), in_dtype);
  std::optional<at::Tensor> dfinal;
  if (dfinal_states) dfinal = dfinal_states->to(acc).contiguous();

  at::Tensor final_states = at::empty({Bn, H, P, N}, opts);
  at::Tensor dinit = new_output({Bn, H, P, N}, opts);
  p.nsplit = stages.scan_splits(p);
  at::Tensor ddecay = at::empty({Bn, nc, H, p.nsplit}, opts);
  p.final_states = final_states.data_ptr();
  p.dstates = dstates.data_ptr();
  p.dfinal = dfinal ? dfinal->data_ptr() : nullptr;
  p.dinit = dinit.data_ptr();
  p.ddecay = ddecay.data_ptr();
  stages.scan_bwd(p, in_dtype);  // states -> H_{c-1}, dstates -> d H_c

  const at::Tensor y_interT = inter_outputs(s, p, in_dtype, stages);
  at::Tensor y_intra;
  if (z) y_intra = stages.intra_fwd(p, s.xdt, in_dtype);  // only the z gate's gradient needs y
  const at::Tensor dxdt =
      stages.intra_bwd(p, dy, in_dtype);  // GL^T dy
  // dGL = dY (dt x)^T; then W = dGL * GL gives dacs (the intra part of d loss / d Acs), and
  // dCB = dGL * decay summed over the heads of each group.
  at::Tensor dacs = at::empty({Bn, nc, H, Q}, opts);
  p.dacs = dacs.data_ptr();
  const at::Tensor dcb = stages.intra_dcb(p, dy, s.xdt, in_dtype);  // [B * nc * G, Q, Q]
  const at::Tensor Bg = s.Bc.view({BncG, Q, N}), Cg = s.Cc.view({BncG, Q, N});
  const at::Tensor states_g = s.states.view({BncG, Hg * P, N});
  const at::Tensor dstates_g = dstates.view({BncG, Hg * P, N});
  // dcb is lower triangular (wsum masked it).
  at::Tensor dC = stages.gemm(dcb, Bg, in_dtype, Tri::kLowerA);
  stages.gemm_add(dC, dyrT.view({BncG, Hg * P, Q}).transpose(1, 2), states_g, in_dtype);
  at::Tensor dB = stages.gemm(dcb.transpose(1, 2), Cg, in_dtype, Tri::kUpperA);
  stages.gemm_add(dB, s.xwT.view({BncG, Hg * P, Q}).transpose(1, 2), dstates_g, in_dtype);
  const at::Tensor zT = stages.gemm(dstates_g, Bg.transpose(1, 2), in_dtype);  // [B, nc, H, P, Q]

  at::Tensor dx = new_output({Bn, L, H, P}, x.options());
  at::Tensor ddt = at::empty({Bn, L, H}, opts);
  at::Tensor dz = z ? new_output({Bn, L, H, P}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA_part = at::empty({Bn, nc, H}, opts);
  at::Tensor dD_part = D ? at::empty({Bn, nc, H, P}, opts) : at::Tensor();
  p.y_intra = z ? y_intra.data_ptr() : nullptr;
  p.y_interT = y_interT.data_ptr();
  p.dy = dy.data_ptr();
  p.dyrT = dyrT.data_ptr();
  p.dxdt = dxdt.data_ptr();
  p.zT = zT.data_ptr();
  p.dx = dx.data_ptr();
  p.ddt = ddt.data_ptr();
  p.dz = z ? dz.data_ptr() : nullptr;
  p.dA_part = dA_part.data_ptr();
  p.dD_part = D ? dD_part.data_ptr() : nullptr;
  stages.final_bwd(p, in_dtype);

  // Reductions over batch and chunks in a fixed order (deterministic).
  at::Tensor dA = dA_part.sum(at::IntArrayRef{0, 1}).to(A.scalar_type());
  at::Tensor dD = at::empty({0}, x.options().dtype(acc));
  if (D) {
    dD = dD_part.sum(at::IntArrayRef{0, 1});
    if (D->dim() == 1) dD = dD.sum(1);
    dD = dD.to(D->scalar_type());
  }
  at::Tensor ddt_bias = dt_bias ? ddt.sum(at::IntArrayRef{0, 1}).to(dt_bias->scalar_type()) : at::empty({0}, opts);
  at::Tensor dinit_out = initial_states ? dinit.to(initial_states->scalar_type()) : at::empty({0}, opts);
  const at::Tensor dB_out = unpack_chunks(dB.view({Bn, nc, G, Q, N}), L, Bm.scalar_type());
  const at::Tensor dC_out = unpack_chunks(dC.view({Bn, nc, G, Q, N}), L, Cm.scalar_type());
  return {dx, ddt.to(dt.scalar_type()), dA, dB_out, dC_out, dD, dz, ddt_bias, dinit_out};
}

// The test hook's checks (shared by both devices): the GEMM itself trusts its caller.
inline void check_test_gemm_args(const at::Tensor& a, const at::Tensor& b, int64_t tri,
                                 const std::optional<at::Tensor>& acc) {
  SSMK_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
                   "a, b: expected [batch, M, K] and [batch, K, N], got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1 && a.size(2) >= 1 && b.size(2) >= 1,
                   "a, b: expected non-empty matrices, got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_TYPE((a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) &&
                      b.scalar_type() == a.scalar_type(),
                  "a, b: expected both float32 or both float64, got ", a.scalar_type(), " and ", b.scalar_type());
  SSMK_CHECK_VALUE(b.device() == a.device(), "b: expected device ", a.device(), ", got ", b.device());
  SSMK_CHECK_VALUE(tri >= 0 && tri <= 3, "tri: expected 0..3, got ", tri);
  if (acc) {
    SSMK_CHECK_VALUE(tri == 0, "tri: accumulation supports tri = 0 only, got ", tri);
    check_shape(*acc, {a.size(0), a.size(1), b.size(2)}, "acc");
    check_dtype(*acc, a.scalar_type(), "acc");
    SSMK_CHECK_VALUE(acc->device() == a.device(), "acc: expected device ", a.device(), ", got ", acc->device());
  }
}

template <typename Stages>
at::Tensor test_gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype, int64_t tri,
                     const std::optional<at::Tensor>& acc, const Stages& stages) {
  check_test_gemm_args(a, b, tri, acc);
  if (acc) {
    at::Tensor out = acc->contiguous().clone();
    stages.gemm_add(out, a, b, in_dtype);
    return out;
  }
  return stages.gemm(a, b, in_dtype, static_cast<Tri>(tri));
}

}  // namespace ssd
}  // namespace ssmk
