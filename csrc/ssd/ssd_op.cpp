// ssd_scan ops: the argument lists, checks, buffers and the stage sequence shared by both devices
// (the stages themselves: ssd_host.h); and the test hooks (end of file).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dispatch.h"
#include "common/op_library.h"
#include "common/output.h"
#include "common/varlen.h"
#include "ssd/ssd_host.h"

namespace ssmk {
namespace {

using cuda::Triangle;

// dt_limit = (lo, hi) clamps dt only when it differs from (0, inf).
#define SSD_SCAN_INPUT_ARGS(X)                                                                        \
  X(Tensor, x) X(Tensor, dt) X(Tensor, A) X(Tensor, B) X(Tensor, C) X(Int, chunk_size) X(OptTensor, D) \
  X(OptTensor, z) X(OptTensor, dt_bias) X(Bool, dt_softplus) X(FloatList, dt_limit)                    \
  X(OptTensor, initial_states) X(OptTensor, seq_idx)
// cu_seqlens (default None) comes last in both lists.
#define SSD_SCAN_FWD_ARGS(X) SSD_SCAN_INPUT_ARGS(X) X(OptTensorDefaultNone, cu_seqlens)
#define SSD_SCAN_BWD_ARGS(X) \
  SSD_SCAN_INPUT_ARGS(X) X(Tensor, dout) X(OptTensor, dfinal_states) X(OptTensorDefaultNone, cu_seqlens)
SSMK_OP_ARGS(SsdScanFwdArgs, SSD_SCAN_FWD_ARGS)
SSMK_OP_ARGS(SsdScanBwdArgs, SSD_SCAN_BWD_ARGS)

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The forward's arguments (the backward has them all); returns the packed-sequence layout.
template <typename Args>
Varlen check_inputs(const Args& in) {
  const at::Tensor& x = in.x;
  SSMK_CHECK_VALUE(x.dim() == 4, "x: expected 4 dims (batch, seqlen, nheads, headdim), got shape ", x.sizes());
  check_floating(x, "x");
  const int64_t Bn = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  SSMK_CHECK_VALUE(L >= 1, "x: expected seqlen >= 1, got ", L);
  SSMK_CHECK_VALUE(H >= 1 && P >= 1 && P <= ssd::kMaxHeaddim, "x: expected nheads >= 1 and 1 <= headdim <= ",
                   ssd::kMaxHeaddim, ", got shape ", x.sizes());
  check_shape(in.dt, {Bn, L, H}, "dt");
  check_dtype(in.dt, x.scalar_type(), "dt");
  check_same_device(in.dt, x, "dt");
  check_floating(in.A, "A");
  check_shape(in.A, {H}, "A");
  check_same_device(in.A, x, "A");
  const at::Tensor& B = in.B;
  SSMK_CHECK_VALUE(B.dim() == 4 && B.size(0) == Bn && B.size(1) == L,
                   "B: expected shape (batch=", Bn, ", seqlen=", L, ", groups, dstate), got ", B.sizes());
  const int64_t G = B.size(2), N = B.size(3);
  SSMK_CHECK_VALUE(G >= 1 && H % G == 0, "B: expected groups dividing nheads=", H, ", got groups=", G);
  SSMK_CHECK_VALUE(N >= 1 && N <= ssd::kMaxDstate, "B: expected 1 <= dstate <= ", ssd::kMaxDstate, ", got ", N);
  check_dtype(B, x.scalar_type(), "B");
  check_same_device(B, x, "B");
  check_shape(in.C, {Bn, L, G, N}, "C");
  check_dtype(in.C, x.scalar_type(), "C");
  check_same_device(in.C, x, "C");
  SSMK_CHECK_VALUE(is_pow2(in.chunk_size) && in.chunk_size >= ssd::kMinChunk && in.chunk_size <= ssd::kMaxChunk,
                   "chunk_size: expected a power of two in [", ssd::kMinChunk, ", ", ssd::kMaxChunk, "], got ",
                   in.chunk_size);
  if (in.D) {
    const at::Tensor& D = *in.D;
    check_floating(D, "D");
    SSMK_CHECK_VALUE((D.dim() == 1 && D.size(0) == H) || (D.dim() == 2 && D.size(0) == H && D.size(1) == P),
                     "D: expected shape (nheads=", H, ",) or (nheads=", H, ", headdim=", P, "), got ", D.sizes());
    check_same_device(D, x, "D");
  }
  if (in.z) {
    check_shape(*in.z, {Bn, L, H, P}, "z");
    check_dtype(*in.z, x.scalar_type(), "z");
    check_same_device(*in.z, x, "z");
  }
  if (in.dt_bias) {
    check_floating(*in.dt_bias, "dt_bias");
    check_shape(*in.dt_bias, {H}, "dt_bias");
    check_same_device(*in.dt_bias, x, "dt_bias");
  }
  SSMK_CHECK_VALUE(in.dt_limit.size() == 2, "dt_limit: expected 2 floats (lo, hi), got ", in.dt_limit.size());
  const double lo = in.dt_limit[0], hi = in.dt_limit[1];
  SSMK_CHECK_VALUE(!(lo > hi) && !std::isnan(lo) && !std::isnan(hi), "dt_limit: expected lo <= hi, got (", lo,
                   ", ", hi, ")");
  const Varlen v = check_cu_seqlens(in.cu_seqlens, in.seq_idx, Bn, L, x);
  if (in.initial_states) {
    check_floating(*in.initial_states, "initial_states");
    // Packed sequences: one initial state per sequence.
    check_shape(*in.initial_states, {v.packed() ? v.num_seqs : Bn, H, P, N}, "initial_states");
    check_same_device(*in.initial_states, x, "initial_states");
  }
  if (in.seq_idx) {
    check_seq_idx(*in.seq_idx, Bn, L, x);
  }
  return v;
}

// Packed sequences run chunk-aligned: each sequence starts at a chunk boundary and the rest of
// its last chunk is padding (dt = 0 there, so the state passes through unchanged and the state
// after the chunk is the state at the sequence's last token). Every chunk then holds one
// sequence: no masking inside chunks, and the scan restarts each sequence from its own initial
// state and stops at its last chunk. An empty sequence gets one padding chunk (its final state is
// its initial state).
//
// CPU: the offsets are read on the host into a chunk map (SsdDims::chunk_token, chunk_len) with
// exactly sum_s max(1, ceil(len_s / Q)) chunks; the stages read the packed row through it and
// write their outputs straight to the packed row, and the chunk-major buffers are gathered from
// it in one pass (ssd_cpu_gather_chunks, which unpacked rows use too): nothing else is copied.
// CUDA: reading the offsets on the host would synchronise, so the row is copied into a
// chunk-aligned row built on the device, with sizes known from shapes only (ceil(L / Q) +
// num_seqs chunks bound the aligned length; chunks past the last sequence are padding), the
// normal kernels run on it and the results are copied back.
struct Packing {
  int64_t num_seqs = 0;
  at::Tensor chunk_seq;  // [nc] int32: sequence of each chunk, num_seqs past the last one
  // CPU: the chunk map.
  int64_t nchunks = 0;
  at::Tensor chunk_token, chunk_len;  // [nc] int64
  // CUDA: the aligned copy.
  at::Tensor pos;        // [L] int64: aligned position of each token
  at::Tensor valid;      // [nc * Q] uint8: 1 at a token, 0 on padding
  int64_t padded_len = 0;
  bool packed() const { return num_seqs > 0; }
  bool aligned() const { return pos.defined(); }  // runs on an aligned copy of the row

  // [1, L, ...] -> [1, padded_len, ...] (zeros on padding), contiguous. Moved as whole rows of
  // a [positions, rest] matrix (one contiguous copy per position).
  at::Tensor align(const at::Tensor& t) const {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[1] = padded_len;
    const at::Tensor rows = t.select(0, 0).reshape({t.size(1), -1});
    return at::zeros({padded_len, rows.size(1)}, t.options()).index_copy_(0, pos, rows).view(sizes);
  }
  // [1, padded_len, ...] -> [1, L, ...], contiguous.
  at::Tensor unalign(const at::Tensor& t) const {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[1] = pos.size(0);
    return t.select(0, 0).reshape({t.size(1), -1}).index_select(0, pos).view(sizes);
  }
};

Packing make_cpu_chunk_map(const Varlen& v, int64_t Q) {
  Packing k;
  const int64_t S = v.num_seqs;
  const int64_t* off = v.offsets.const_data_ptr<int64_t>();  // checked by check_cu_seqlens
  k.num_seqs = S;
  for (int64_t s = 0; s < S; ++s) k.nchunks += std::max<int64_t>(1, (off[s + 1] - off[s] + Q - 1) / Q);
  const auto i64 = v.offsets.options();
  k.chunk_token = at::empty({k.nchunks}, i64);
  k.chunk_len = at::empty({k.nchunks}, i64);
  k.chunk_seq = at::empty({k.nchunks}, i64.dtype(at::kInt));
  int64_t* token = k.chunk_token.mutable_data_ptr<int64_t>();
  int64_t* len = k.chunk_len.mutable_data_ptr<int64_t>();
  int32_t* seq = k.chunk_seq.mutable_data_ptr<int32_t>();
  int64_t c = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = off[s + 1] - off[s];
    for (int64_t j = 0; j == 0 || j * Q < n; ++j, ++c) {
      token[c] = off[s] + j * Q;
      len[c] = std::min(Q, n - j * Q);
      seq[c] = static_cast<int32_t>(s);
    }
  }
  return k;
}

Packing make_packing(const Varlen& v, int64_t L, int64_t Q) {
  if (!v.packed()) return Packing{};
  if (v.offsets.is_cpu()) return make_cpu_chunk_map(v, Q);
  Packing k;
  const at::Tensor& off = v.offsets;  // [S + 1] int64
  const int64_t S = v.num_seqs;
  const int64_t nc = (L + Q - 1) / Q + S;
  k.num_seqs = S;
  k.padded_len = nc * Q;
  const at::Tensor lens = off.narrow(0, 1, S) - off.narrow(0, 0, S);
  const at::Tensor nchunks = at::clamp_min(at::floor_divide(lens + (Q - 1), Q), 1);
  const at::Tensor chunk_start = at::cat({at::zeros({1}, off.options()), at::cumsum(nchunks, 0)});  // [S + 1]
  const at::Tensor tokens = at::arange(L, off.options());
  const at::Tensor seq = at::searchsorted(off, tokens, /*out_int32=*/false, /*right=*/true) - 1;
  k.pos = chunk_start.index_select(0, seq) * Q + tokens - off.index_select(0, seq);
  k.valid = at::zeros({k.padded_len}, off.options().dtype(at::kByte))
                .index_fill_(0, k.pos, 1);
  const at::Tensor chunks = at::arange(nc, off.options());
  k.chunk_seq = at::clamp_max(at::searchsorted(chunk_start, chunks, false, true) - 1, S).to(at::kInt);
  return k;
}

// The arguments with x, dt, B, C, z (and the backward's dout) on the aligned row; no cu_seqlens.
template <typename Args>
Args aligned_args(const Args& in, const Packing& k) {
  Args a = in;
  a.x = k.align(in.x);
  a.dt = k.align(in.dt);
  a.B = k.align(in.B);
  a.C = k.align(in.C);
  if (in.z) a.z = k.align(*in.z);
  a.cu_seqlens = std::nullopt;
  return a;
}

template <typename Args>
SsdDims dims_of(const Args& in, const Packing& packing) {
  SsdDims d{};
  d.batch = in.x.size(0);
  d.seqlen = in.x.size(1);
  d.nheads = in.x.size(2);
  d.headdim = in.x.size(3);
  d.ngroups = in.B.size(2);
  d.dstate = in.B.size(3);
  d.chunk = in.chunk_size;
  d.nchunks = (d.seqlen + d.chunk - 1) / d.chunk;
  if (packing.packed() && !packing.aligned()) {
    d.nchunks = packing.nchunks;
    d.chunk_token = packing.chunk_token.const_data_ptr<int64_t>();
    d.chunk_len = packing.chunk_len.const_data_ptr<int64_t>();
  }
  return d;
}

// [B, L, K1, K2] (any dtype and strides) -> [B, nc, K1, Q, K2] accumulation dtype, contiguous,
// padding positions zero; times `scale` [B, nc, K1, Q] when defined. The CPU gathers in one pass,
// the scale included, through d's chunk map (packed sequences) or the plain one (chunk c holds
// tokens c Q .. min(c Q + Q, L) - 1 of each row): both layouts run the same code.
at::Tensor pack_chunks(const at::Tensor& t, const SsdDims& d, at::ScalarType acc, const at::Tensor& scale = {}) {
  if (t.is_cpu()) {
    return acc == at::kDouble ? ssd_cpu_gather_chunks<double>(t, d, scale) : ssd_cpu_gather_chunks<float>(t, d, scale);
  }
  const int64_t Bn = t.size(0), L = t.size(1), K1 = t.size(2), K2 = t.size(3), nc = d.nchunks, Q = d.chunk;
  at::Tensor a = t.to(acc);
  if (nc * Q != L) a = at::constant_pad_nd(a, {0, 0, 0, 0, 0, nc * Q - L});
  a = a.reshape({Bn, nc, Q, K1, K2}).permute({0, 1, 3, 2, 4}).contiguous();
  // Not in place: with one head and no padding `a` can alias t itself.
  return scale.defined() ? a * scale.unsqueeze(-1) : a;
}

// Inverse of pack_chunks for [B, nc, K1, Q, K2] -> [B, L, K1, K2] in `dtype` (one pass on the CPU).
at::Tensor unpack_chunks(const at::Tensor& t, const SsdDims& d, at::ScalarType dtype) {
  if (t.is_cpu()) {
    return t.scalar_type() == at::kDouble ? ssd_cpu_scatter_chunks<double>(t, d, dtype)
                                          : ssd_cpu_scatter_chunks<float>(t, d, dtype);
  }
  const int64_t Bn = t.size(0), nc = t.size(1), K1 = t.size(2), Q = t.size(3), K2 = t.size(4);
  return t.permute({0, 1, 3, 2, 4}).reshape({Bn, nc * Q, K1, K2}).narrow(1, 0, d.seqlen).to(dtype).contiguous();
}

// Everything the forward and the backward share: processed parameters, packed chunk buffers,
// the masked decay factors and the chunk states (before the scan).
struct Prepared {
  SsdDims d;
  at::Tensor A, dt_bias, D, seg, init;  // accumulation dtype (seg: int32), contiguous
  at::Tensor dtv, acs, e, r, kdecay;     // [B, nc, H, Q] ([B, nc, H] kdecay)
  at::Tensor Bc, Cc;                     // [B, nc, G, Q, N]
  at::Tensor cb;                         // [B * nc * G, Q, Q] C_t . B_s
  at::Tensor xdt;                        // [B, nc, H, Q, P] dt x
  at::Tensor xwT;                        // [B, nc, H, P, Q] (e dt x)^T
  at::Tensor states;                     // [B * nc * G, Hg * P, N] chunk states S_c
  const Packing* packing;                // packed sequences (on the aligned row), or not packed
};

template <typename T, typename Args>
SsdDtParams<T> dt_params(const Args& in, const Prepared& s) {
  SsdDtParams<T> p{};
  p.dt = view<const T, 3>(in.dt);
  p.A = ptr<acc_t<T>>(s.A);
  p.dt_bias = s.dt_bias.defined() ? ptr<acc_t<T>>(s.dt_bias) : nullptr;
  p.softplus = in.dt_softplus;
  p.dt_limit[0] = in.dt_limit[0];
  p.dt_limit[1] = in.dt_limit[1];
  p.clamp = ssd::dt_limit_active(p.dt_limit[0], p.dt_limit[1]);
  return p;
}

template <typename Acc>
const Acc* opt_ptr(const at::Tensor& t) {
  return t.defined() ? ptr<Acc>(t) : nullptr;
}

template <typename T>
SsdGlParams<acc_t<T>> gl_params(const Prepared& s) {
  SsdGlParams<acc_t<T>> p{};
  static_cast<SsdDims&>(p) = s.d;
  p.cb = ptr<acc_t<T>>(s.cb);
  p.acs = ptr<acc_t<T>>(s.acs);
  p.seg = opt_ptr<int32_t>(s.seg);
  return p;
}

// Stages 1-4 of the decomposition up to (not including) the scan across chunks. GL itself is never
// stored: the stages that use it (intra, intra_dcb) rebuild it from CB and Acs.
template <typename T, typename Args, typename Stages>
Prepared prepare(const Args& in, const Packing& packing, const Stages& st, GemmOperands ops) {
  using acc = acc_t<T>;
  const auto acc_type = acc_dtype(in.x.scalar_type());
  const auto opts = in.x.options().dtype(acc_type);
  Prepared s;
  s.packing = &packing;
  s.d = dims_of(in, packing);
  const SsdDims& d = s.d;
  const int64_t Bn = d.batch, L = d.seqlen, H = d.nheads, P = d.headdim, G = d.ngroups, N = d.dstate;
  const int64_t Q = d.chunk, nc = d.nchunks, Hg = H / G;
  s.A = in.A.to(acc_type).contiguous();
  if (in.dt_bias) s.dt_bias = in.dt_bias->to(acc_type).contiguous();
  if (in.D) s.D = (in.D->dim() == 1 ? in.D->to(acc_type).unsqueeze(1).expand({H, P}) : in.D->to(acc_type)).contiguous();
  if (in.seq_idx) {
    s.seg = in.seq_idx->contiguous();
    if (nc * Q != L) s.seg = at::cat({s.seg, s.seg.narrow(1, L - 1, 1).expand({Bn, nc * Q - L})}, 1).contiguous();
  }
  if (in.initial_states) s.init = in.initial_states->to(acc_type).contiguous();

  s.dtv = at::empty({Bn, nc, H, Q}, opts);
  s.acs = at::empty({Bn, nc, H, Q}, opts);
  s.e = at::empty({Bn, nc, H, Q}, opts);
  s.r = at::empty({Bn, nc, H, Q}, opts);
  s.kdecay = at::empty({Bn, nc, H}, opts);
  SsdPrepParams<T> p{};
  static_cast<SsdDims&>(p) = d;
  static_cast<SsdDtParams<T>&>(p) = dt_params<T>(in, s);
  p.seg = opt_ptr<int32_t>(s.seg);
  p.dtv = ptr<acc>(s.dtv);
  p.acs = ptr<acc>(s.acs);
  p.e = ptr<acc>(s.e);
  p.r = ptr<acc>(s.r);
  p.kdecay = ptr<acc>(s.kdecay);
  p.valid = packing.aligned() ? packing.valid.data_ptr<uint8_t>() : nullptr;
  st.prep(p);

  s.Bc = pack_chunks(in.B, d, acc_type);
  s.Cc = pack_chunks(in.C, d, acc_type);
  const at::Tensor Bg = s.Bc.view({Bn * nc * G, Q, N});
  const at::Tensor Cg = s.Cc.view({Bn * nc * G, Q, N});
  s.cb = st.gemm(Cg, Bg.transpose(1, 2), Triangle::kLowerOut);

  s.xdt = pack_chunks(in.x, d, acc_type, s.dtv);
  s.xwT = (s.xdt * s.e.unsqueeze(-1)).transpose(-1, -2).contiguous();
  // S_c = sum_s e_s dt_s x_s B_s^T, heads of a group stacked along P.
  s.states = st.gemm(s.xwT.view({Bn * nc * G, Hg * P, Q}), Bg, Triangle::kNone, ops);
  return s;
}

// The scan's params over s.states (in: S_c; out: H_{c-1}).
template <typename Acc>
void fill_scan(SsdScanParams<Acc>& p, const Prepared& s, const at::Tensor& final_states) {
  static_cast<SsdDims&>(p) = s.d;
  p.kdecay = ptr<Acc>(s.kdecay);
  p.init = opt_ptr<Acc>(s.init);
  p.states = ptr<Acc>(s.states);
  p.final_states = ptr<Acc>(final_states);
  const Packing& k = *s.packing;
  p.chunk_seq = k.packed() ? k.chunk_seq.data_ptr<int32_t>() : nullptr;
  p.num_seqs = k.num_seqs;
}

// [batch, H, P, N] per row, [num_seqs, H, P, N] for packed sequences.
int64_t state_count(const Prepared& s) { return s.packing->packed() ? s.packing->num_seqs : s.d.batch; }

// y_inter^T per head: H_{c-1} (P x N) @ C^T (N x Q), heads of a group stacked along P.
template <typename Stages>
at::Tensor inter_outputs(const Prepared& s, const Stages& st, GemmOperands ops) {
  const SsdDims& d = s.d;
  const int64_t BncG = d.batch * d.nchunks * d.ngroups, Hg = d.nheads / d.ngroups;
  return st.gemm(s.states.view({BncG, Hg * d.headdim, d.dstate}), s.Cc.view({BncG, d.chunk, d.dstate}).transpose(1, 2),
                 Triangle::kNone, ops);
}

template <typename T, typename Stages>
std::tuple<at::Tensor, at::Tensor> run_fwd(const SsdScanFwdArgs& in, const Packing& packing, const Stages& st) {
  using acc = acc_t<T>;
  const Prepared s = prepare<T>(in, packing, st, GemmOperands::kInput);
  const SsdDims& d = s.d;
  at::Tensor final_states =
      new_output({state_count(s), d.nheads, d.headdim, d.dstate}, in.x.options().dtype(acc_dtype(in.x.scalar_type())));
  SsdScanParams<acc> sp{};
  fill_scan(sp, s, final_states);
  st.scan(sp);

  const at::Tensor y_intra = st.intra(gl_params<T>(s), s.xdt, false);
  const at::Tensor y_interT = inter_outputs(s, st, GemmOperands::kInput);
  at::Tensor out = new_output(in.x.sizes(), in.x.options());
  SsdFwdParams<T> p{};
  static_cast<SsdDims&>(p) = d;
  p.x = view<const T, 4>(in.x);
  p.z = view<const T, 4>(in.z);
  p.D = opt_ptr<acc>(s.D);
  p.r = ptr<acc>(s.r);
  p.y_intra = ptr<acc>(y_intra);
  p.y_interT = ptr<acc>(y_interT);
  p.out = ptr<T>(out);
  st.epilogue(p);
  if (packing.aligned()) out = packing.unalign(out);
  return {out, final_states};
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor>;

template <typename T, typename Stages>
BwdResult run_bwd(const SsdScanBwdArgs& in, const at::Tensor& dout, const Packing& packing, const Stages& st) {
  using acc = acc_t<T>;
  const at::Tensor& x = in.x;
  const auto acc_type = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc_type);
  const Prepared s = prepare<T>(in, packing, st, ssd::kBwdOperands);
  const SsdDims& d = s.d;
  const int64_t Bn = d.batch, L = d.seqlen, H = d.nheads, P = d.headdim, G = d.ngroups, N = d.dstate;
  const int64_t Q = d.chunk, nc = d.nchunks, Hg = H / G, BncG = Bn * nc * G;

  // dy = dout * silu(z): the gradient of y before the gate.
  at::Tensor dy_l = dout.to(acc_type);
  if (in.z) dy_l = dy_l * at::silu(in.z->to(acc_type));
  const at::Tensor dy = pack_chunks(dy_l, d, acc_type);                                // [B, nc, H, Q, P]
  const at::Tensor dyrT = (dy * s.r.unsqueeze(-1)).transpose(-1, -2).contiguous();  // [B, nc, H, P, Q]
  // d loss / d H_{c-1} through chunk c's inter-chunk outputs: (r dy)^T C.
  at::Tensor dstates = st.gemm(dyrT.view({BncG, Hg * P, Q}), s.Cc.view({BncG, Q, N}), Triangle::kNone, ssd::kBwdOperands);
  at::Tensor dfinal;
  if (in.dfinal_states) dfinal = in.dfinal_states->to(acc_type).contiguous();

  at::Tensor final_states = at::empty({state_count(s), H, P, N}, opts);
  at::Tensor dinit = new_output({state_count(s), H, P, N}, opts);
  const int64_t nsplit = st.scan_splits(d);
  at::Tensor ddecay = at::empty({Bn, nc, H, nsplit}, opts);
  SsdScanBwdParams<acc> sp{};
  fill_scan(sp, s, final_states);
  sp.dfinal = opt_ptr<acc>(dfinal);
  sp.dstates = ptr<acc>(dstates);
  sp.dinit = ptr<acc>(dinit);
  sp.ddecay = ptr<acc>(ddecay);
  sp.nsplit = nsplit;
  st.scan(sp);  // states -> H_{c-1}, dstates -> d H_c

  const at::Tensor y_interT = inter_outputs(s, st, ssd::kBwdOperands);
  const SsdGlParams<acc> gl = gl_params<T>(s);
  at::Tensor y_intra;
  if (in.z) y_intra = st.intra(gl, s.xdt, false);  // only the z gate's gradient needs y
  const at::Tensor dxdt = st.intra(gl, dy, true);  // GL^T dy
  // dGL = dY (dt x)^T; then W = dGL * GL gives dacs (the intra part of d loss / d Acs), and
  // dCB = dGL * decay summed over the heads of each group.
  at::Tensor dacs = at::empty({Bn, nc, H, Q}, opts);
  SsdWsumParams<acc> wp{};
  static_cast<SsdGlParams<acc>&>(wp) = gl;
  wp.dacs = ptr<acc>(dacs);
  const at::Tensor dcb = st.intra_dcb(wp, dy, s.xdt);  // [B * nc * G, Q, Q]
  const at::Tensor Bg = s.Bc.view({BncG, Q, N}), Cg = s.Cc.view({BncG, Q, N});
  const at::Tensor states_g = s.states.view({BncG, Hg * P, N});
  const at::Tensor dstates_g = dstates.view({BncG, Hg * P, N});
  // dcb is lower triangular (wsum masked it).
  at::Tensor dC = st.gemm(dcb, Bg, Triangle::kLowerA);
  st.gemm_add(dC, dyrT.view({BncG, Hg * P, Q}).transpose(1, 2), states_g);
  at::Tensor dB = st.gemm(dcb.transpose(1, 2), Cg, Triangle::kUpperA);
  st.gemm_add(dB, s.xwT.view({BncG, Hg * P, Q}).transpose(1, 2), dstates_g);
  const at::Tensor zT = st.gemm(dstates_g, Bg.transpose(1, 2), Triangle::kNone, ssd::kBwdOperands);  // [B, nc, H, P, Q]

  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor ddt = at::empty({Bn, L, H}, opts);
  at::Tensor dz = new_grad(in.z, x);
  at::Tensor dA_part = at::empty({Bn, nc, H}, opts);
  at::Tensor dD_part = in.D ? at::empty({Bn, nc, H, P}, opts) : at::Tensor();
  SsdBwdParams<T> p{};
  static_cast<SsdDims&>(p) = d;
  static_cast<SsdDtParams<T>&>(p) = dt_params<T>(in, s);
  p.x = view<const T, 4>(x);
  p.z = view<const T, 4>(in.z);
  p.dout = view<const T, 4>(dout);
  p.D = opt_ptr<acc>(s.D);
  p.seg = opt_ptr<int32_t>(s.seg);
  p.e = ptr<acc>(s.e);
  p.r = ptr<acc>(s.r);
  p.dtv = ptr<acc>(s.dtv);
  p.dacs = ptr<acc>(dacs);
  p.ddecay = ptr<acc>(ddecay);
  p.nsplit = nsplit;
  p.xdt = ptr<acc>(s.xdt);
  p.dxdt = ptr<acc>(dxdt);
  p.dy = ptr<acc>(dy);
  p.dyrT = ptr<acc>(dyrT);
  p.zT = ptr<acc>(zT);
  p.y_intra = opt_ptr<acc>(y_intra);
  p.y_interT = ptr<acc>(y_interT);
  p.dx = ptr<T>(dx);
  p.ddt = ptr<acc>(ddt);
  p.dz = in.z ? ptr<T>(dz) : nullptr;
  p.dA_part = ptr<acc>(dA_part);
  p.dD_part = in.D ? ptr<acc>(dD_part) : nullptr;
  st.final(p);
  if (packing.aligned()) {  // back to the packed row; padding positions drop out of every sum below
    dx = packing.unalign(dx);
    ddt = packing.unalign(ddt);
    if (in.z) dz = packing.unalign(dz);
  }

  // Reductions over batch and chunks in a fixed order (deterministic); each gradient in its
  // input's dtype, an empty one for an absent optional input.
  at::Tensor dA = dA_part.sum(at::IntArrayRef{0, 1}).to(in.A.scalar_type());
  at::Tensor dD = new_grad({}, x);
  if (in.D) {
    dD = dD_part.sum(at::IntArrayRef{0, 1});
    if (in.D->dim() == 1) dD = dD.sum(1);
    dD = dD.to(in.D->scalar_type());
  }
  at::Tensor ddt_bias =
      in.dt_bias ? ddt.sum(at::IntArrayRef{0, 1}).to(in.dt_bias->scalar_type()) : new_grad({}, x);
  at::Tensor dinit_out = in.initial_states ? dinit.to(in.initial_states->scalar_type()) : new_grad({}, x);
  at::Tensor dB_out = unpack_chunks(dB.view({Bn, nc, G, Q, N}), d, in.B.scalar_type());
  at::Tensor dC_out = unpack_chunks(dC.view({Bn, nc, G, Q, N}), d, in.C.scalar_type());
  if (packing.aligned()) {
    dB_out = packing.unalign(dB_out);
    dC_out = packing.unalign(dC_out);
  }

  return {dx, ddt.to(in.dt.scalar_type()), dA, dB_out, dC_out, dD, dz, ddt_bias, dinit_out};
}

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd(const SsdScanFwdArgs& in_args) {
  const Varlen v = check_inputs(in_args);
  const Packing packing = make_packing(v, in_args.x.size(1), in_args.chunk_size);
  const SsdScanFwdArgs in = packing.aligned() ? aligned_args(in_args, packing) : in_args;
  std::tuple<at::Tensor, at::Tensor> result;
  SSMK_DISPATCH_FLOAT(in.x.scalar_type(), "ssd_scan_fwd", [&] {
    using T = scalar_t;
    launch(in.x, [&] { result = run_fwd<T>(in, packing, SsdCpuStages<T>{}); } SSMK_CUDA([&](const CudaContext& ctx) {
             result = run_fwd<T>(in, packing, SsdCudaStages<T>{ctx});
           }));
  });
  return result;
}

BwdResult ssd_scan_bwd(const SsdScanBwdArgs& in_args) {
  const Varlen v = check_inputs(in_args);
  const at::Tensor& x_in = in_args.x;
  check_shape(in_args.dout, x_in.sizes(), "dout");
  check_floating(in_args.dout, "dout");
  check_same_device(in_args.dout, x_in, "dout");
  if (in_args.dfinal_states) {
    check_shape(*in_args.dfinal_states, {v.packed() ? v.num_seqs : x_in.size(0), x_in.size(2), x_in.size(3),
                                         in_args.B.size(3)}, "dfinal_states");
    check_floating(*in_args.dfinal_states, "dfinal_states");
    check_same_device(*in_args.dfinal_states, x_in, "dfinal_states");
  }
  const Packing packing = make_packing(v, x_in.size(1), in_args.chunk_size);
  const SsdScanBwdArgs in = packing.aligned() ? aligned_args(in_args, packing) : in_args;
  const at::Tensor& x = in.x;
  // dout arrives in whatever dtype autograd produced; the kernels read it in x's dtype.
  at::Tensor dout = in_args.dout.to(x.scalar_type());
  if (packing.aligned()) dout = packing.align(dout);
  BwdResult result;
  SSMK_DISPATCH_FLOAT(x.scalar_type(), "ssd_scan_bwd", [&] {
    using T = scalar_t;
    launch(x, [&] { result = run_bwd<T>(in, dout, packing, SsdCpuStages<T>{}); } SSMK_CUDA([&](const CudaContext& ctx) {
             result = run_bwd<T>(in, dout, packing, SsdCudaStages<T>{ctx});
           }));
  });
  return result;
}

}  // namespace
}  // namespace ssmk

// final_states is always returned (the wrapper drops it if unwanted).
SSMK_OP(ssd_scan_fwd, SsdScanFwdArgs, "(Tensor out, Tensor final_states)")
SSMK_OP(ssd_scan_bwd, SsdScanBwdArgs, "(Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddt_bias, Tensor dinitial_states)")

// Test hook ssm_kernels_test::ssd_gemm: the batched GEMM of a device's ssd_scan stages on its own,
// out = a @ b (or acc + a @ b) for [batch, M, K] x [batch, K, N] views of any strides in the
// accumulation dtype of in_dtype; in_dtype picks the tensor-core operand precision on CUDA; tri
// is a cuda::Triangle zero structure (0..3). And ssm_kernels_test::ssd_emulate_cuda_rounding:
// the CPU stages round GEMM operands where the CUDA stages do (returns the previous setting).
namespace ssmk {
namespace {

#define SSD_GEMM_ARGS(X) X(Tensor, a) X(Tensor, b) X(Dtype, in_dtype) X(Int, tri) X(OptTensor, acc)
SSMK_OP_ARGS(SsdGemmArgs, SSD_GEMM_ARGS)

void check_args(const SsdGemmArgs& in) {
  const at::Tensor &a = in.a, &b = in.b;
  SSMK_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
                   "a, b: expected [batch, M, K] and [batch, K, N], got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1 && a.size(2) >= 1 && b.size(2) >= 1,
                   "a, b: expected non-empty matrices, got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_TYPE((a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) && b.scalar_type() == a.scalar_type(),
                  "a, b: expected both float32 or both float64, got ", a.scalar_type(), " and ", b.scalar_type());
  const auto t = in.in_dtype;
  SSMK_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                  "in_dtype: expected float32, float16, bfloat16 or float64, got ", t);
  SSMK_CHECK_TYPE(a.scalar_type() == acc_dtype(in.in_dtype), "a, b: expected the accumulation dtype of in_dtype ",
                  in.in_dtype, ", got ", a.scalar_type());
  check_same_device(b, a, "b");
  SSMK_CHECK_VALUE(in.tri >= 0 && in.tri <= 3, "tri: expected 0..3, got ", in.tri);
  if (in.acc) {
    SSMK_CHECK_VALUE(in.tri == 0, "tri: accumulation supports tri = 0 only, got ", in.tri);
    check_shape(*in.acc, {a.size(0), a.size(1), b.size(2)}, "acc");
    check_dtype(*in.acc, a.scalar_type(), "acc");
    check_same_device(*in.acc, a, "acc");
  }
}

template <typename Stages>
at::Tensor run(const SsdGemmArgs& in, const Stages& st) {
  if (in.acc) {
    at::Tensor out = in.acc->contiguous().clone();
    st.gemm_add(out, in.a, in.b);
    return out;
  }
  return st.gemm(in.a, in.b, static_cast<cuda::Triangle>(in.tri));
}

bool set_emulate_cuda_rounding(bool enable) { return ssd_emulate_cuda_rounding().exchange(enable); }

at::Tensor ssd_gemm(const SsdGemmArgs& in) {
  check_args(in);
  at::Tensor out;
  SSMK_DISPATCH_FLOAT(in.in_dtype, "ssd_gemm", [&] {
    using T = scalar_t;
    launch(in.a, [&] { out = run(in, SsdCpuStages<T>{}); } SSMK_CUDA([&](const CudaContext& ctx) {
             out = run(in, SsdCudaStages<T>{ctx});
           }));
  });
  return out;
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  ssmk::op::define<ssmk::SsdGemmArgs>(m, "ssd_gemm", "Tensor");
  m.def("ssd_emulate_cuda_rounding(bool enable) -> bool", &ssmk::set_emulate_cuda_rounding);
}

TORCH_LIBRARY_IMPL(ssm_kernels_test, CPU, m) {
  m.impl("ssd_gemm", ssmk::op::kernel<ssmk::SsdGemmArgs, &ssmk::ssd_gemm>());
}

#ifdef SSMK_WITH_CUDA
TORCH_LIBRARY_IMPL(ssm_kernels_test, CUDA, m) {
  m.impl("ssd_gemm", ssmk::op::kernel<ssmk::SsdGemmArgs, &ssmk::ssd_gemm>());
}
#endif
