// CPU kernels of fftconv. Rows (one (batch, channel) sequence each) are processed in blocks of up
// to kBlockElems / n rows: the pointwise stages (gating, zero padding, the spectrum product, the
// epilogue) are hand-written loops over a block, and the FFTs of a block are one batched call to
// ATen's FFT (MKL or pocketfft, real-to-complex and complex-to-real) on per-thread workspaces, so
// each block's buffers stay in cache between the passes and every input and output crosses
// memory once. Blocks are independent (at::parallel_for); the backward groups rows by channel so
// that dH and dD are summed over the batch in a fixed order (deterministic). Power-of-two lengths
// up to 2^16 take the hand-written FFT (fftconv_fft.h) instead, row by row (see cpu_plan); its
// row transforms also serve the test hooks (fftconv_test_hooks.cpp). Packed sequences
// (cu_seqlens) run each sequence as its own convolution at its own length, the sequences of one
// length as the batch rows of the same blocks (run_packed).
#include "common/aten.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "common/cpu.h"
#include "common/parallel.h"
#include "fftconv/fftconv.h"
#include "fftconv/fftconv_fft.h"

namespace ssmk {
namespace {

using fftconv::kActNone;
namespace fft = fftconv::fft;

// Elements of one real workspace per block: 2^17 floats = 512 KiB (16 rows at n = 8192). Large
// enough that the per-call cost of the batched FFT is amortised, small enough to stay in L2/L3.
constexpr int64_t kBlockElems = int64_t(1) << 17;

int64_t rows_per_block(int64_t n) { return std::max<int64_t>(1, kBlockElems / n); }

// A block of rows: row i is (bs[i], ds[i]).
struct Rows {
  int64_t count = 0;
  const int64_t* b = nullptr;
  const int64_t* d = nullptr;
};

// The tokens of batch row b: a whole row of the batch, or, for a group of packed sequences
// (p.seq_start), the group's b-th sequence in row 0.
struct Span {
  int64_t row, t0, len;
};

template <typename T>
SSMK_CPU_INLINE Span row_span(const FftconvCommon<T>& p, int64_t b) {
  return p.seq_start ? Span{0, p.seq_start[b], p.seq_len[b]} : Span{b, 0, p.seqlen};
}

template <typename input_t>
SSMK_CPU_INLINE const input_t* row_ptr(const View<const input_t, 3>& v, Span s, int64_t d) {
  return v.data + s.row * v.stride[0] + d * v.stride[1] + s.t0 * v.stride[2];
}

// Where (span, channel d) starts in a contiguous [B, D, L] output.
template <typename T>
SSMK_CPU_INLINE int64_t out_offset(const FftconvCommon<T>& p, Span s, int64_t d) {
  return (s.row * p.dim + d) * p.seqlen + s.t0;
}

// Row i of a block: its tokens, its channel and its rows of u, pregate and postgate (g, q:
// nullptr where absent) with their time strides. v(t) = u pregate is the convolution's input.
template <typename input_t>
struct InputRow {
  using acc_t = ssmk::acc_t<input_t>;
  Span sp;
  int64_t d, L;
  acc_t Dd;  // D[d], or 0
  const input_t *u, *g, *q;
  int64_t su, sg, sq;
  SSMK_CPU_INLINE acc_t v(int64_t t) const {
    const acc_t x = static_cast<acc_t>(u[t * su]);
    return g ? x * static_cast<acc_t>(g[t * sg]) : x;
  }
  SSMK_CPU_INLINE acc_t postgate(int64_t t) const { return q ? static_cast<acc_t>(q[t * sq]) : acc_t(1); }
};

template <typename input_t>
SSMK_CPU_INLINE InputRow<input_t> input_row(const FftconvCommon<input_t>& p, Rows rows, int64_t i) {
  InputRow<input_t> r;
  r.sp = row_span(p, rows.b[i]);
  r.d = rows.d[i];
  r.L = r.sp.len;
  r.Dd = p.D ? p.D[r.d] : acc_t<input_t>(0);
  r.u = row_ptr(p.u, r.sp, r.d);
  r.g = p.pregate.data ? row_ptr(p.pregate, r.sp, r.d) : nullptr;
  r.q = p.postgate.data ? row_ptr(p.postgate, r.sp, r.d) : nullptr;
  r.su = p.u.stride[2];
  r.sg = p.pregate.stride[2];
  r.sq = p.postgate.stride[2];
  return r;
}

// buf[i, t] = u * pregate for t < L, 0 for L <= t < n (L: the row's tokens).   buf: [count, n]
template <typename input_t>
SSMK_CPU_INLINE void load_v_rows(const FftconvCommon<input_t>& p, Rows rows, acc_t<input_t>* buf) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  for (int64_t i = 0; i < rows.count; ++i) {
    const InputRow<input_t> r = input_row(p, rows, i);
    acc_t* v = buf + i * n;
    if (r.su == 1 && (!r.g || r.sg == 1)) {
      // Unit strides (the common case): vectorised.
      if (r.g) {
#pragma omp simd
        for (int64_t t = 0; t < r.L; ++t) v[t] = static_cast<acc_t>(r.u[t]) * static_cast<acc_t>(r.g[t]);
      } else {
#pragma omp simd
        for (int64_t t = 0; t < r.L; ++t) v[t] = static_cast<acc_t>(r.u[t]);
      }
    } else {
      for (int64_t t = 0; t < r.L; ++t) v[t] = r.v(t);
    }
    std::fill(v + r.L, v + n, acc_t(0));
  }
}
SSMK_CPU_MULTIVERSION(load_v_rows, (typename input_t), (input_t),
                      (const FftconvCommon<input_t>& p, Rows rows, acc_t<input_t>* buf), (p, rows, buf))

// dst[i, f] = src[i, f] * H[d_i - d0, f] (or * conj(H)), complex as interleaved (re, im);
// kf: [channels of the block, F], the block's kernel spectra.
template <typename input_t, bool kConj>
SSMK_CPU_INLINE void mul_spectrum_rows(const FftconvCommon<input_t>& p, Rows rows, const acc_t<input_t>* kf,
                                       int64_t d0, const acc_t<input_t>* src, acc_t<input_t>* dst) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t F = p.nfreq;
  for (int64_t i = 0; i < rows.count; ++i) {
    const acc_t* h = kf + 2 * (rows.d[i] - d0) * F;
    const acc_t* a = src + 2 * i * F;
    acc_t* o = dst + 2 * i * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      acc_t re, im;
      if (kConj) {
        fftconv::cmul_conj(a[2 * f], a[2 * f + 1], h[2 * f], h[2 * f + 1], re, im);
      } else {
        fftconv::cmul(a[2 * f], a[2 * f + 1], h[2 * f], h[2 * f + 1], re, im);
      }
      o[2 * f] = re;
      o[2 * f + 1] = im;
    }
  }
}
SSMK_CPU_MULTIVERSION(mul_spectrum_rows, (typename input_t, bool kConj), (input_t, kConj),
                      (const FftconvCommon<input_t>& p, Rows rows, const acc_t<input_t>* kf, int64_t d0,
                       const acc_t<input_t>* src, acc_t<input_t>* dst),
                      (p, rows, kf, d0, src, dst))

// h rows of channels [d0, d0 + count): h[s] = k[s] (s < Kc), h[(n - s) % n] += k_rev[s] (s < Kr).
template <typename input_t>
void load_kernel_rows(const FftconvCommon<input_t>& p, int64_t d0, int64_t count, acc_t<input_t>* buf) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  const acc_t* k = p.k;
  const acc_t* kr = p.k_rev;
  for (int64_t i = 0; i < count; ++i) {
    acc_t* h = buf + i * n;
    const acc_t* kd = k + (d0 + i) * p.klen;
    std::copy(kd, kd + p.kc, h);
    std::fill(h + p.kc, h + n, acc_t(0));
    if (kr) {
      const acc_t* rd = kr + (d0 + i) * p.klen_rev;
      h[0] += rd[0];
      for (int64_t s = 1; s < p.kr; ++s) h[n - s] += rd[s];
    }
  }
}

// dk / dk_rev rows of channels [d0, d0 + count) from dh = irfft(dH): the inverse index map of
// load_kernel_rows; taps past kc / kr get zero. With `add` (a later group of packed sequences)
// the taps are added to the rows instead.
template <typename input_t>
void store_kernel_grad_rows(const FftconvBwdParams<input_t>& p, int64_t d0, int64_t count,
                            const acc_t<input_t>* dh_buf, bool add) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  for (int64_t i = 0; i < count; ++i) {
    const acc_t* dh = dh_buf + i * n;
    acc_t* dk = p.dk + (d0 + i) * p.klen;
    acc_t* dr = p.dk_rev ? p.dk_rev + (d0 + i) * p.klen_rev : nullptr;
    if (add) {
      for (int64_t s = 0; s < p.kc; ++s) dk[s] += dh[s];
      if (dr) {
        dr[0] += dh[0];
        for (int64_t s = 1; s < p.kr; ++s) dr[s] += dh[n - s];
      }
      continue;
    }
    std::copy(dh, dh + p.kc, dk);
    std::fill(dk + p.kc, dk + p.klen, acc_t(0));
    if (dr) {
      dr[0] = dh[0];
      for (int64_t s = 1; s < p.kr; ++s) dr[s] = dh[n - s];
      std::fill(dr + p.kr, dr + p.klen_rev, acc_t(0));
    }
  }
}

// out = act(c + D v) * postgate, with v re-read from u and pregate.   c: [count, n]
template <typename input_t>
SSMK_CPU_INLINE void epilogue_rows(const FftconvFwdParams<input_t>& p, Rows rows, const acc_t<input_t>* c) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  for (int64_t i = 0; i < rows.count; ++i) {
    const InputRow<input_t> r = input_row(p, rows, i);
    const acc_t* ci = c + i * n;
    input_t* out = p.out + out_offset(p, r.sp, r.d);
    if (!r.g && !r.q && p.activation == kActNone && r.su == 1) {
      // The common S4/H3 case: out = c + D u.
#pragma omp simd
      for (int64_t t = 0; t < r.L; ++t) out[t] = static_cast<input_t>(ci[t] + r.Dd * static_cast<acc_t>(r.u[t]));
      continue;
    }
    for (int64_t t = 0; t < r.L; ++t) {
      out[t] = static_cast<input_t>(fftconv::epilogue(ci[t], r.v(t), r.Dd, r.postgate(t), p.activation));
    }
  }
}
SSMK_CPU_MULTIVERSION(epilogue_rows, (typename input_t), (input_t),
                      (const FftconvFwdParams<input_t>& p, Rows rows, const acc_t<input_t>* c), (p, rows, c))

// Backward pointwise stage: gpre (zero-padded to n) into gbuf, dpostgate, and per-row sums of
// gpre * v (for dD) into row_dD. c: [count, n] (read only when an activation or postgate needs it).
template <typename input_t>
SSMK_CPU_INLINE void grad_pre_rows(const FftconvBwdParams<input_t>& p, Rows rows, const acc_t<input_t>* c,
                                   acc_t<input_t>* gbuf, acc_t<input_t>* row_dD) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  const bool need_c = p.activation != kActNone || p.postgate.data;
  const int64_t so = p.dout.stride[2];
  for (int64_t i = 0; i < rows.count; ++i) {
    const InputRow<input_t> r = input_row(p, rows, i);
    acc_t* gp = gbuf + i * n;
    const input_t* go = row_ptr(p.dout, r.sp, r.d);
    input_t* dq = p.dpostgate ? p.dpostgate + out_offset(p, r.sp, r.d) : nullptr;
    acc_t sum = 0;
    if (!need_c) {
      for (int64_t t = 0; t < r.L; ++t) {
        const acc_t gpre = static_cast<acc_t>(go[t * so]);
        gp[t] = gpre;
        sum += gpre * r.v(t);
      }
    } else {
      const acc_t* ci = c + i * n;
      for (int64_t t = 0; t < r.L; ++t) {
        const acc_t v = r.v(t);
        acc_t gpre, dpg;
        fftconv::pointwise_grad(ci[t], v, r.Dd, r.postgate(t), static_cast<acc_t>(go[t * so]), p.activation, gpre,
                                dpg);
        if (dq) dq[t] = static_cast<input_t>(dpg);
        gp[t] = gpre;
        sum += gpre * v;
      }
    }
    std::fill(gp + r.L, gp + n, acc_t(0));
    row_dD[i] = sum;
  }
}
SSMK_CPU_MULTIVERSION(grad_pre_rows, (typename input_t), (input_t),
                      (const FftconvBwdParams<input_t>& p, Rows rows, const acc_t<input_t>* c,
                       acc_t<input_t>* gbuf, acc_t<input_t>* row_dD),
                      (p, rows, c, gbuf, row_dD))

// dv = conv + D * gpre;  du = dv * pregate;  dpregate = dv * u.   conv, gbuf: [count, n]
template <typename input_t>
SSMK_CPU_INLINE void grad_input_rows(const FftconvBwdParams<input_t>& p, Rows rows, const acc_t<input_t>* conv,
                                     const acc_t<input_t>* gbuf) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t n = p.fft_size;
  for (int64_t i = 0; i < rows.count; ++i) {
    const InputRow<input_t> r = input_row(p, rows, i);
    const acc_t* ci = conv + i * n;
    const acc_t* gp = gbuf + i * n;
    input_t* du = p.du + out_offset(p, r.sp, r.d);
    if (!r.g) {
#pragma omp simd
      for (int64_t t = 0; t < r.L; ++t) du[t] = static_cast<input_t>(ci[t] + r.Dd * gp[t]);
      continue;
    }
    input_t* dg = p.dpregate + out_offset(p, r.sp, r.d);
    for (int64_t t = 0; t < r.L; ++t) {
      const acc_t dv = ci[t] + r.Dd * gp[t];
      du[t] = static_cast<input_t>(dv * static_cast<acc_t>(r.g[t * r.sg]));
      dg[t] = static_cast<input_t>(dv * static_cast<acc_t>(r.u[t * r.su]));
    }
  }
}
SSMK_CPU_MULTIVERSION(grad_input_rows, (typename input_t), (input_t),
                      (const FftconvBwdParams<input_t>& p, Rows rows, const acc_t<input_t>* conv,
                       const acc_t<input_t>* gbuf),
                      (p, rows, conv, gbuf))

// dH[d - d0] (+)= G * conj(V), rows in order; the first row of each channel (b == 0) initialises.
template <typename input_t>
SSMK_CPU_INLINE void accumulate_dkf_rows(const FftconvBwdParams<input_t>& p, Rows rows, acc_t<input_t>* dkf,
                                         int64_t d0, const acc_t<input_t>* G, const acc_t<input_t>* V) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t F = p.nfreq;
  for (int64_t i = 0; i < rows.count; ++i) {
    acc_t* o = dkf + 2 * (rows.d[i] - d0) * F;
    const acc_t* g = G + 2 * i * F;
    const acc_t* v = V + 2 * i * F;
    const bool first = rows.b[i] == 0;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      acc_t re, im;
      fftconv::cmul_conj(g[2 * f], g[2 * f + 1], v[2 * f], v[2 * f + 1], re, im);
      o[2 * f] = first ? re : o[2 * f] + re;
      o[2 * f + 1] = first ? im : o[2 * f + 1] + im;
    }
  }
}
SSMK_CPU_MULTIVERSION(accumulate_dkf_rows, (typename input_t), (input_t),
                      (const FftconvBwdParams<input_t>& p, Rows rows, acc_t<input_t>* dkf, int64_t d0,
                       const acc_t<input_t>* G, const acc_t<input_t>* V),
                      (p, rows, dkf, d0, G, V))

// Per-thread FFT workspaces: real [R, n] and complex [R, F] buffers, and their batched FFTs.
// bind() shapes them for a length and row capacities, reusing the memory of earlier binds (the
// packed sequences' groups have different lengths).
template <typename acc_t>
struct Workspace {
  int64_t n = 0;
  std::vector<at::Tensor> real, cplx, real_mem, cplx_mem;

  // real_rows[i] / cplx_rows[i]: the row capacity of each buffer.
  void bind(int64_t n_, std::initializer_list<int64_t> real_rows, std::initializer_list<int64_t> cplx_rows) {
    n = n_;
    const auto r = c10::CppTypeToScalarType<acc_t>::value;
    const auto c = r == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
    fit(real, real_mem, real_rows, n, r);
    fit(cplx, cplx_mem, cplx_rows, n / 2 + 1, c);
  }
  acc_t* r(int i) { return real[i].template data_ptr<acc_t>(); }
  acc_t* c(int i) { return reinterpret_cast<acc_t*>(cplx[i].data_ptr()); }
  // cplx[ci][:count] = rfft(real[ri][:count])  (unnormalised)
  void rfft(int ri, int ci, int64_t count) {
    at::Tensor out = cplx[ci].narrow(0, 0, count);
    at::_fft_r2c_out(out, real[ri].narrow(0, 0, count), {1}, /*normalization=none*/ 0, /*onesided=*/true);
  }
  // real[ri][:count] = irfft(cplx[ci][:count], n)  (scaled by 1 / n)
  void irfft(int ci, int ri, int64_t count) {
    at::Tensor out = real[ri].narrow(0, 0, count);
    at::_fft_c2r_out(out, cplx[ci].narrow(0, 0, count), {1}, /*normalization=by_n*/ 2, n);
  }

 private:
  static void fit(std::vector<at::Tensor>& views, std::vector<at::Tensor>& mem, std::initializer_list<int64_t> rows,
                  int64_t cols, at::ScalarType dtype) {
    views.resize(rows.size());
    mem.resize(std::max(mem.size(), rows.size()));
    size_t i = 0;
    for (int64_t count : rows) {
      if (!mem[i].defined() || mem[i].numel() < count * cols) {
        mem[i] = at::empty({count * cols}, at::TensorOptions().dtype(dtype));
      }
      views[i] = mem[i].narrow(0, 0, count * cols).view({count, cols});
      ++i;
    }
  }
};

// Rows are walked channel-major: a block holds `chans` channels and all their batch rows, so the
// block computes its channels' kernel spectra itself (no [D, F] spectrum tensor crosses memory)
// and, in the backward, reduces dH and dD over the batch in a fixed order. A block's rows are
// processed in chunks of at most R.
struct Blocking {
  int64_t R, chans, cap, nblocks;
  template <typename T>
  explicit Blocking(const FftconvCommon<T>& p) {
    R = rows_per_block(p.fft_size);
    chans = std::max<int64_t>(1, R / p.batch);
    cap = std::min(R, chans * p.batch);
    nblocks = (p.dim + chans - 1) / chans;
  }
};

// Fills bs / ds for rows [q0, q0 + count) of the block starting at channel d0 (channel-major).
template <typename T>
Rows block_rows(const FftconvCommon<T>& p, int64_t d0, int64_t q0, int64_t count, int64_t* bs, int64_t* ds) {
  for (int64_t i = 0; i < count; ++i) {
    ds[i] = d0 + (q0 + i) / p.batch;
    bs[i] = (q0 + i) % p.batch;
  }
  return Rows{count, bs, ds};
}

// f(rows) for the rows of the block of channels [d0, d0 + nch) in groups of at most blk.cap
// (channel-major), each group's v (u pregate, zero-padded to n) first loaded into v_buf.
template <typename input_t, typename F>
void for_each_row_group(const FftconvCommon<input_t>& p, const Blocking& blk, int64_t* bs, int64_t* ds, int64_t d0,
                        int64_t nch, acc_t<input_t>* v_buf, F&& f) {
  for (int64_t q0 = 0; q0 < nch * p.batch; q0 += blk.cap) {
    const Rows rows = block_rows(p, d0, q0, std::min(blk.cap, nch * p.batch - q0), bs, ds);
    load_v_rows_dispatch<input_t>(p, rows, v_buf);
    f(rows);
  }
}

// dD[d] += the rows' sums of gpre * v; a channel's first row (b == 0) sets it unless `add`.
template <typename acc_t>
void accumulate_dD(acc_t* dD, Rows rows, const acc_t* row_dD, bool add) {
  if (!dD) return;
  for (int64_t i = 0; i < rows.count; ++i) {
    const int64_t d = rows.d[i];
    dD[d] = (rows.b[i] == 0 && !add ? acc_t(0) : dD[d]) + row_dD[i];
  }
}

// Forward of the block of channels [d0, d0 + nch) (nch <= blk.chans), ATen's FFT. Workspaces:
// real 0 = v, then c; real 1 = h; complex 0 = V, then V H; complex 1 = H.
template <typename acc_t>
void bind_fwd(Workspace<acc_t>& ws, int64_t n, const Blocking& blk) {
  ws.bind(n, {blk.cap, blk.chans}, {blk.cap, blk.chans});
}

template <typename input_t>
void fwd_block(const FftconvFwdParams<input_t>& p, const Blocking& blk, Workspace<acc_t<input_t>>& ws,
               int64_t* bs, int64_t* ds, int64_t d0, int64_t nch) {
  load_kernel_rows(p, d0, nch, ws.r(1));
  ws.rfft(1, 1, nch);
  for_each_row_group(p, blk, bs, ds, d0, nch, ws.r(0), [&](Rows rows) {
    ws.rfft(0, 0, rows.count);
    mul_spectrum_rows_dispatch<input_t, false>(p, rows, ws.c(1), d0, ws.c(0), ws.c(0));
    ws.irfft(0, 0, rows.count);
    epilogue_rows_dispatch<input_t>(p, rows, ws.r(0));
  });
}

// Backward of a block, ATen's FFT; `add`: add to dk / dk_rev / dD instead of writing them (a later
// group of packed sequences). Workspaces: real 0 = v, then c, then the du convolution; real 1 =
// gpre; real 2 = h, then dh; complex 0 = V; complex 1 = V H, then G, then G conj(H); complex 2 = H;
// complex 3 = dH.
template <typename acc_t>
void bind_bwd(Workspace<acc_t>& ws, int64_t n, const Blocking& blk) {
  ws.bind(n, {blk.cap, blk.cap, blk.chans}, {blk.cap, blk.cap, blk.chans, blk.chans});
}

template <typename input_t>
void bwd_block(const FftconvBwdParams<input_t>& p, const Blocking& blk, Workspace<acc_t<input_t>>& ws,
               int64_t* bs, int64_t* ds, acc_t<input_t>* row_dD, int64_t d0, int64_t nch, bool add) {
  const bool need_c = p.activation != kActNone || p.postgate.data;
  load_kernel_rows(p, d0, nch, ws.r(2));
  ws.rfft(2, 2, nch);
  for_each_row_group(p, blk, bs, ds, d0, nch, ws.r(0), [&](Rows rows) {
    ws.rfft(0, 0, rows.count);
    if (need_c) {
      mul_spectrum_rows_dispatch<input_t, false>(p, rows, ws.c(2), d0, ws.c(0), ws.c(1));
      ws.irfft(1, 0, rows.count);
    }
    grad_pre_rows_dispatch<input_t>(p, rows, ws.r(0), ws.r(1), row_dD);
    accumulate_dD(p.dD, rows, row_dD, add);
    ws.rfft(1, 1, rows.count);
    accumulate_dkf_rows_dispatch<input_t>(p, rows, ws.c(3), d0, ws.c(1), ws.c(0));
    mul_spectrum_rows_dispatch<input_t, true>(p, rows, ws.c(2), d0, ws.c(1), ws.c(1));
    ws.irfft(1, 0, rows.count);
    grad_input_rows_dispatch<input_t>(p, rows, ws.r(0), ws.r(1));
  });
  // dh = irfft(dH): the circular correlation sum_b sum_t g_b[t] v_b[(t - j) mod n].
  ws.irfft(3, 2, nch);
  store_kernel_grad_rows(p, d0, nch, ws.r(2), add);
}

// ---- The hand-written power-of-two path (fftconv_fft.h), one row at a time. ----

template <typename acc_t>
struct TwiddleTable {
  std::vector<acc_t> re, im;
  fft::Twiddles<acc_t> tw;
  explicit TwiddleTable(int64_t m) : re(fft::table_size(m)), im(fft::table_size(m)) {
    for (int64_t i = 0; i < fft::table_size(m); ++i) {
      const double a = 2.0 * M_PI * fft::table_turns(m, i);
      re[i] = static_cast<acc_t>(std::cos(a));
      im[i] = static_cast<acc_t>(-std::sin(a));
    }
    tw = fft::Twiddles<acc_t>{re.data(), im.data(), m};
  }
};

// Per-row scratch of the hand path: two row buffers (x, y) in the quartered layout.
template <typename acc_t>
struct RowBuffers {
  acc_t *xr, *xi, *yr, *yi;
  RowBuffers(acc_t* base, int64_t m) {
    const int64_t b = fft::buffer_size(m);
    xr = base, xi = base + b, yr = base + 2 * b, yi = base + 3 * b;
  }
};

// out[0..m] = 2X, the spectrum of the real row x[0, len) (zero up to n = 2m) times two, scaled.
template <typename acc_t>
SSMK_CPU_INLINE void row_spectrum(const fft::Twiddles<acc_t>& tw, const acc_t* x, int64_t len, acc_t scale,
                                  acc_t* zbuf, acc_t* out_r, acc_t* out_i) {
  const int64_t m = tw.m;
  RowBuffers<acc_t> z(zbuf, m);
  fft::deinterleave(x, len, m, z.xr, z.xi);
  const bool in_y = fft::fft_row<acc_t, false>(tw, z.xr, z.xi, z.yr, z.yi, len <= m, false);
  fft::split_pass(tw, in_y ? z.yr : z.xr, in_y ? z.yi : z.xi, out_r, out_i);
  if (scale != acc_t(1)) {
#pragma omp simd
    for (int64_t k = 0; k <= m; ++k) {
      out_r[k] *= scale;
      out_i[k] *= scale;
    }
  }
}
SSMK_CPU_MULTIVERSION(row_spectrum, (typename acc_t), (acc_t),
                      (const fft::Twiddles<acc_t>& tw, const acc_t* x, int64_t len, acc_t scale, acc_t* zbuf,
                       acc_t* out_r, acc_t* out_i),
                      (tw, x, len, scale, zbuf, out_r, out_i))

// x[0, len) = irfft(scale * X * h) (or conj(h); no h when hr is null) for a spectrum X = 2 * the
// true one and h = H / (2n) (so that the round trip needs no further scaling).
template <typename acc_t, bool kConj>
SSMK_CPU_INLINE void row_inverse(const fft::Twiddles<acc_t>& tw, const acc_t* Xr, const acc_t* Xi, const acc_t* hr,
                                 const acc_t* hi, acc_t scale, acc_t* zbuf, int64_t len, acc_t* x) {
  const int64_t m = tw.m;
  RowBuffers<acc_t> z(zbuf, m);
  fft::product_merge_pass<acc_t, kConj>(tw, Xr, Xi, hr, hi, scale, z.xr, z.xi);
  const bool in_y = fft::fft_row<acc_t, true>(tw, z.xr, z.xi, z.yr, z.yi, false, len <= m);
  fft::interleave(in_y ? z.yr : z.xr, in_y ? z.yi : z.xi, len, m, x);
}
SSMK_CPU_MULTIVERSION(row_inverse, (typename acc_t, bool kConj), (acc_t, kConj),
                      (const fft::Twiddles<acc_t>& tw, const acc_t* Xr, const acc_t* Xi, const acc_t* hr,
                       const acc_t* hi, acc_t scale, acc_t* zbuf, int64_t len, acc_t* x),
                      (tw, Xr, Xi, hr, hi, scale, zbuf, len, x))

// x[0, len) = irfft(rfft(x) * H) in place: forward FFT (upper half skipped when zero), the fused
// split / product / merge pass, inverse FFT (only the first len outputs).
template <typename acc_t>
SSMK_CPU_INLINE void row_conv(const fft::Twiddles<acc_t>& tw, acc_t* x, int64_t len, const acc_t* hr,
                              const acc_t* hi, acc_t* zbuf) {
  const int64_t m = tw.m;
  RowBuffers<acc_t> z(zbuf, m);
  fft::deinterleave(x, len, m, z.xr, z.xi);
  bool in_y = fft::fft_row<acc_t, false>(tw, z.xr, z.xi, z.yr, z.yi, len <= m, false);
  acc_t *ar = in_y ? z.yr : z.xr, *ai = in_y ? z.yi : z.xi, *br = in_y ? z.xr : z.yr, *bi = in_y ? z.xi : z.yi;
  fft::conv_pass<acc_t, false>(tw, ar, ai, hr, hi);
  in_y = fft::fft_row<acc_t, true>(tw, ar, ai, br, bi, false, len <= m);
  fft::interleave(in_y ? br : ar, in_y ? bi : ai, len, m, x);
}
SSMK_CPU_MULTIVERSION(row_conv, (typename acc_t), (acc_t),
                      (const fft::Twiddles<acc_t>& tw, acc_t* x, int64_t len, const acc_t* hr, const acc_t* hi,
                       acc_t* zbuf),
                      (tw, x, len, hr, hi, zbuf))

// dH[d] (+)= G * conj(V) on spectra of F values (split re / im).
template <typename acc_t>
SSMK_CPU_INLINE void accumulate_dh(int64_t F, bool first, const acc_t* Gr, const acc_t* Gi, const acc_t* Vr,
                                   const acc_t* Vi, acc_t* Sr, acc_t* Si) {
#pragma omp simd
  for (int64_t f = 0; f < F; ++f) {
    acc_t re, im;
    fftconv::cmul_conj(Gr[f], Gi[f], Vr[f], Vi[f], re, im);
    Sr[f] = first ? re : Sr[f] + re;
    Si[f] = first ? im : Si[f] + im;
  }
}
SSMK_CPU_MULTIVERSION(accumulate_dh, (typename acc_t), (acc_t),
                      (int64_t F, bool first, const acc_t* Gr, const acc_t* Gi, const acc_t* Vr, const acc_t* Vi,
                       acc_t* Sr, acc_t* Si),
                      (F, first, Gr, Gi, Vr, Vi, Sr, Si))

// The block's kernel spectra hs[i] = H / (2n) (re then im, F each), from the combined kernels.
template <typename input_t, typename acc_t = acc_t<input_t>>
void block_spectra(const FftconvCommon<input_t>& p, const fft::Twiddles<acc_t>& tw, int64_t d0, int64_t nch,
                   acc_t* hrow, acc_t* zbuf, acc_t* hs) {
  const int64_t n = p.fft_size, F = tw.m + 1;
  for (int64_t i = 0; i < nch; ++i) {
    load_kernel_rows(p, d0 + i, 1, hrow);
    row_spectrum_dispatch<acc_t>(tw, hrow, n, acc_t(1) / acc_t(4 * n), zbuf, hs + 2 * i * F, hs + (2 * i + 1) * F);
  }
}

// Buffers of the hand path for one thread, grown to the largest block they have served.
template <typename acc_t>
struct HandBuffers {
  std::vector<acc_t> real0, real1, hs, dh, V, G, zbuf;

  static void grow(std::vector<acc_t>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  }
  void fit(const Blocking& blk, int64_t n, bool bwd) {
    const int64_t m = n / 2, F = m + 1;
    grow(real0, blk.cap * n);
    grow(hs, 2 * blk.chans * F);
    grow(zbuf, 4 * fft::buffer_size(m));
    if (bwd) {
      grow(real1, blk.cap * n);
      grow(dh, 2 * blk.chans * F);
      grow(V, 2 * blk.cap * F);
      grow(G, 2 * F);
    }
  }
};

// Forward of a block, hand path: per row one forward and one inverse m-point complex FFT.
template <typename input_t, typename acc_t = acc_t<input_t>>
void fwd_block_hand(const FftconvFwdParams<input_t>& p, const Blocking& blk, const fft::Twiddles<acc_t>& tw,
                    HandBuffers<acc_t>& buf, int64_t* bs, int64_t* ds, int64_t d0, int64_t nch) {
  const int64_t n = p.fft_size, F = tw.m + 1;
  acc_t *real = buf.real0.data(), *hs = buf.hs.data(), *zbuf = buf.zbuf.data();
  block_spectra(p, tw, d0, nch, real, zbuf, hs);
  for_each_row_group(p, blk, bs, ds, d0, nch, real, [&](Rows rows) {
    for (int64_t i = 0; i < rows.count; ++i) {
      const acc_t* h = hs + 2 * (ds[i] - d0) * F;
      row_conv_dispatch<acc_t>(tw, real + i * n, row_span(p, bs[i]).len, h, h + F, zbuf);
    }
    epilogue_rows_dispatch<input_t>(p, rows, real);
  });
}

// Backward of a block, hand path: per row V = rfft(v) (kept), c = irfft(V H) when needed,
// G = rfft(gpre), dH += G conj(V) (batch order), dv = irfft(G conj(H)); per channel dh = irfft(dH).
// `add` as in bwd_block.
template <typename input_t, typename acc_t = acc_t<input_t>>
void bwd_block_hand(const FftconvBwdParams<input_t>& p, const Blocking& blk, const fft::Twiddles<acc_t>& tw,
                    HandBuffers<acc_t>& buf, int64_t* bs, int64_t* ds, acc_t* row_dD, int64_t d0, int64_t nch,
                    bool add) {
  const int64_t n = p.fft_size, F = tw.m + 1;
  const bool need_c = p.activation != kActNone || p.postgate.data;
  acc_t *real0 = buf.real0.data(), *real1 = buf.real1.data(), *hs = buf.hs.data(), *dh = buf.dh.data();
  acc_t *V = buf.V.data(), *G = buf.G.data(), *zbuf = buf.zbuf.data();
  block_spectra(p, tw, d0, nch, real0, zbuf, hs);
  for_each_row_group(p, blk, bs, ds, d0, nch, real0, [&](Rows rows) {
    for (int64_t i = 0; i < rows.count; ++i) {
      const int64_t len = row_span(p, bs[i]).len;
      acc_t* x = real0 + i * n;
      acc_t *Vr = V + 2 * i * F, *Vi = Vr + F;
      row_spectrum_dispatch<acc_t>(tw, x, len, acc_t(1), zbuf, Vr, Vi);
      if (need_c) {
        const acc_t* h = hs + 2 * (ds[i] - d0) * F;
        row_inverse_dispatch<acc_t, false>(tw, Vr, Vi, h, h + F, acc_t(1), zbuf, len, x);
      }
    }
    grad_pre_rows_dispatch<input_t>(p, rows, real0, real1, row_dD);
    accumulate_dD(p.dD, rows, row_dD, add);
    for (int64_t i = 0; i < rows.count; ++i) {
      const int64_t len = row_span(p, bs[i]).len;
      const acc_t *Vr = V + 2 * i * F, *Vi = Vr + F, *h = hs + 2 * (ds[i] - d0) * F;
      acc_t* S = dh + 2 * (ds[i] - d0) * F;
      row_spectrum_dispatch<acc_t>(tw, real1 + i * n, len, acc_t(1), zbuf, G, G + F);
      accumulate_dh_dispatch<acc_t>(F, bs[i] == 0, G, G + F, Vr, Vi, S, S + F);
      row_inverse_dispatch<acc_t, true>(tw, G, G + F, h, h + F, acc_t(1), zbuf, len, real0 + i * n);
    }
    grad_input_rows_dispatch<input_t>(p, rows, real0, real1);
  });
  // dh = irfft(sum_b G_b conj(V_b)); the spectra carry a factor 4.
  for (int64_t i = 0; i < nch; ++i) {
    const acc_t* S = dh + 2 * i * F;
    row_inverse_dispatch<acc_t, false>(tw, S, S + F, nullptr, nullptr, acc_t(1) / acc_t(4 * n), zbuf, n, real0);
    store_kernel_grad_rows(p, d0 + i, 1, real0, add);
  }
}

// The CPU's FFT length and path, chosen here only: the hand-written power-of-two FFT at the next
// power of two (>= 2 * kMinSize) up to kHandMaxSize when it is at most 1024 (ATen's per-call
// overhead dominates there) or at most 1.5x the smallest 2^a 3^b 5^c length (measured: the hand
// path costs about half of ATen's per point at n = 2048-65536 on AVX2); ATen's FFT (MKL /
// pocketfft) at the 2^a 3^b 5^c length otherwise (e.g. L = K = 1025 or 4097, and beyond 2^16).
constexpr int64_t kHandMaxSize = int64_t(1) << 16;

// Whether the launcher's length came from the hand branch of cpu_plan.
bool hand_path(int64_t n) {
  return n >= 2 * fft::kMinSize && n <= kHandMaxSize && (n & (n - 1)) == 0;
}

// The hand-written rfft / irfft through the CUDA fused kernels' per-index drivers, run serially:
// fft_strided with one thread, pairs by index with the buffer positions computed as on the GPU.
template <typename T>
void strided_rfft_row(const fft::Twiddles<T>& tw, const T* x, T* zbuf, T* out_r, T* out_i) {
  const int64_t m = tw.m, b = fft::buffer_size(m);
  T *xr = zbuf, *xi = zbuf + b, *yr = zbuf + 2 * b, *yi = zbuf + 3 * b;
  for (int64_t t = 0; t < 2 * m; ++t) (t % 2 ? xi : xr)[fft::pos(m, t / 2)] = x[t];
  const bool in_y = fft::fft_strided<T, false>(tw, xr, xi, yr, yi, false, false, 0, 1);
  for (int64_t k = 0; k <= m / 2; ++k) {
    fft::split_at<T>(tw, k, fft::pos(m, k), k == 0 ? 0 : fft::pos(m, m - k), in_y ? yr : xr, in_y ? yi : xi, out_r,
                     out_i);
  }
}

template <typename T>
void strided_irfft_row(const fft::Twiddles<T>& tw, const T* sr, const T* si, T scale, T* zbuf, T* x) {
  const int64_t m = tw.m, b = fft::buffer_size(m);
  T *xr = zbuf, *xi = zbuf + b, *yr = zbuf + 2 * b, *yi = zbuf + 3 * b;
  for (int64_t k = 0; k <= m / 2; ++k) {
    if (k == 0) {
      fft::product_merge_at<T, false, false>(tw, 0, 0, 0, sr, si, nullptr, nullptr, scale, xr, xi);
    } else {
      fft::product_merge_at<T, false, true>(tw, k, fft::pos(m, k), fft::pos(m, m - k), sr, si, nullptr, nullptr,
                                            scale, xr, xi);
    }
  }
  const bool in_y = fft::fft_strided<T, true>(tw, xr, xi, yr, yi, false, false, 0, 1);
  for (int64_t t = 0; t < 2 * m; ++t) x[t] = (t % 2 ? (in_y ? yi : xi) : (in_y ? yr : xr))[fft::pos(m, t / 2)];
}

}  // namespace

namespace fftconv {

CpuPlan cpu_plan(int64_t min_size) {
  const int64_t p2 = std::max<int64_t>(2 * fft::kMinSize, next_pow2(min_size));
  const int64_t f = fft_size(min_size);
  if (p2 <= kHandMaxSize && (p2 <= 1024 || 2 * p2 <= 3 * f)) return {p2, true};
  return {f, false};
}

bool hand_fft_size_ok(int64_t n) { return hand_path(n); }
int64_t hand_fft_min_size() { return 2 * fft::kMinSize; }
int64_t hand_fft_max_size() { return kHandMaxSize; }

// Forward: out rows of F (re, im) pairs, the hand path's spectra (twice the true ones) halved.
// Inverse: rows of F pairs back to n reals, scaled by 1 / n.
template <typename T>
void hand_fft_rows(const T* x, int64_t rows, int64_t n, bool inverse, bool strided, T* out) {
  const int64_t m = n / 2, F = m + 1;
  const TwiddleTable<T> tt(m);
  std::vector<T> zbuf(4 * fft::buffer_size(m)), spec(2 * F);
  T *re = spec.data(), *im = re + F;
  for (int64_t r = 0; r < rows; ++r) {
    if (inverse) {
      const T* s = x + 2 * r * F;
      for (int64_t f = 0; f < F; ++f) re[f] = s[2 * f], im[f] = s[2 * f + 1];
      if (strided) {
        strided_irfft_row<T>(tt.tw, re, im, T(1) / T(n), zbuf.data(), out + r * n);
      } else {
        row_inverse_dispatch<T, false>(tt.tw, re, im, nullptr, nullptr, T(1) / T(n), zbuf.data(), n, out + r * n);
      }
      continue;
    }
    if (strided) {
      strided_rfft_row<T>(tt.tw, x + r * n, zbuf.data(), re, im);
      for (int64_t f = 0; f < 2 * F; ++f) spec[f] *= T(0.5);
    } else {
      row_spectrum_dispatch<T>(tt.tw, x + r * n, n, T(0.5), zbuf.data(), re, im);
    }
    T* o = out + 2 * r * F;
    for (int64_t f = 0; f < F; ++f) o[2 * f] = re[f], o[2 * f + 1] = im[f];
  }
}

template void hand_fft_rows<float>(const float*, int64_t, int64_t, bool, bool, float*);
template void hand_fft_rows<double>(const double*, int64_t, int64_t, bool, bool, double*);

}  // namespace fftconv

namespace {

template <typename P>
constexpr bool kIsBwd = false;
template <typename T>
constexpr bool kIsBwd<FftconvBwdParams<T>> = true;

// One thread's scratch for blocks of either path, grown as needed.
template <typename acc_t>
struct Scratch {
  Workspace<acc_t> ws;
  HandBuffers<acc_t> hand;
  std::vector<int64_t> bs, ds;
  std::vector<acc_t> row_dD;

  // For blocks of blk at length n, on the hand path or ATen's.
  void fit(const Blocking& blk, int64_t n, bool hand_fft, bool bwd) {
    if (static_cast<int64_t>(bs.size()) < blk.cap) {
      bs.resize(blk.cap);
      ds.resize(blk.cap);
      row_dD.resize(blk.cap);
    }
    if (hand_fft) {
      hand.fit(blk, n, bwd);
    } else if (bwd) {
      bind_bwd(ws, n, blk);
    } else {
      bind_fwd(ws, n, blk);
    }
  }
};

// The block of channels [d0, d0 + nch); tw: the hand path's twiddles, or null for ATen's FFT.
template <typename input_t, typename acc_t>
void run_block(const FftconvFwdParams<input_t>& p, const Blocking& blk, const fft::Twiddles<acc_t>* tw,
               Scratch<acc_t>& sc, int64_t d0, int64_t nch, bool /*add*/) {
  if (tw) {
    fwd_block_hand(p, blk, *tw, sc.hand, sc.bs.data(), sc.ds.data(), d0, nch);
  } else {
    fwd_block(p, blk, sc.ws, sc.bs.data(), sc.ds.data(), d0, nch);
  }
}

template <typename input_t, typename acc_t>
void run_block(const FftconvBwdParams<input_t>& p, const Blocking& blk, const fft::Twiddles<acc_t>* tw,
               Scratch<acc_t>& sc, int64_t d0, int64_t nch, bool add) {
  if (tw) {
    bwd_block_hand(p, blk, *tw, sc.hand, sc.bs.data(), sc.ds.data(), sc.row_dD.data(), d0, nch, add);
  } else {
    bwd_block(p, blk, sc.ws, sc.bs.data(), sc.ds.data(), sc.row_dD.data(), d0, nch, add);
  }
}

// Plain rows: the blocks of channels in parallel.
template <typename P>
void run_rows(const P& p) {
  using acc_t = typename P::acc;
  std::optional<TwiddleTable<acc_t>> tt;
  if (hand_path(p.fft_size)) tt.emplace(p.fft_size / 2);
  const Blocking blk(p);
  const int64_t block_cost = p.batch * p.dim / std::max<int64_t>(1, blk.nblocks) * p.fft_size;
  cpu::parallel_items(blk.nblocks, block_cost, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sc;
    sc.fit(blk, p.fft_size, tt.has_value(), kIsBwd<P>);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t d0 = j * blk.chans;
      run_block(p, blk, tt ? &tt->tw : nullptr, sc, d0, std::min(p.dim, d0 + blk.chans) - d0, false);
    }
  });
}

// Packed sequences (p.seqs): every sequence is its own convolution, at the FFT length cpu_plan
// picks for it alone (its tokens and the taps that reach them), so its outputs depend on its own
// inputs only. The sequences of one length form a group, run as the batch rows of the kernels
// above (params with seq_start / seq_len) with the taps that reach an output of the group's
// longest: no tap wraps onto a token of any of them, since n >= L_s + taps - 1 for each.
// Groups in ascending length; empty sequences have no rows.
template <typename P>
struct SequenceGroups {
  using acc_t = typename P::acc;
  std::vector<P> params;
  std::vector<std::vector<int64_t>> start, len;
  std::vector<std::unique_ptr<TwiddleTable<acc_t>>> tables;  // hand path: the length's table

  explicit SequenceGroups(const P& p) {
    std::map<int64_t, std::vector<int64_t>> by_size;
    const int64_t* off = p.seqs.offsets;
    for (int64_t s = 0; s < p.seqs.num_seqs; ++s) {
      const int64_t L = off[s + 1] - off[s];
      if (L > 0) by_size[fftconv::cpu_plan(fftconv::min_fft_size(L, p.klen, p.klen_rev)).n].push_back(s);
    }
    for (const auto& [n, seqs] : by_size) {
      std::vector<int64_t> st, ln;
      for (int64_t s : seqs) {
        st.push_back(off[s]);
        ln.push_back(off[s + 1] - off[s]);
      }
      const int64_t longest = *std::max_element(ln.begin(), ln.end());
      P q = p;
      q.batch = static_cast<int64_t>(seqs.size());
      q.fft_size = n;
      q.nfreq = n / 2 + 1;
      q.kc = fftconv::taps(p.klen, longest);
      q.kr = fftconv::taps(p.klen_rev, longest);
      params.push_back(q);
      start.push_back(std::move(st));
      len.push_back(std::move(ln));
      tables.push_back(hand_path(n) ? std::make_unique<TwiddleTable<acc_t>>(n / 2) : nullptr);
    }
    for (size_t g = 0; g < params.size(); ++g) {
      params[g].seq_start = start[g].data();
      params[g].seq_len = len[g].data();
    }
  }
  const fft::Twiddles<acc_t>* twiddles(size_t g) const { return tables[g] ? &tables[g]->tw : nullptr; }
};

// Tasks of the packed path: runs of consecutive channels, each through every group in order (the
// first group writes dk / dk_rev / dD, later ones add: a fixed order), about kPackedTasks of them
// whatever the thread count, all of equal work.
constexpr int64_t kPackedTasks = 16;

template <typename P>
void run_packed(const P& p) {
  using acc_t = typename P::acc;
  const SequenceGroups<P> groups(p);
  const int64_t per_task = (p.dim + kPackedTasks - 1) / kPackedTasks;
  cpu::parallel_items((p.dim + per_task - 1) / per_task, per_task * p.seqlen, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d0 = task * per_task, d1 = std::min(p.dim, d0 + per_task);
      for (size_t g = 0; g < groups.params.size(); ++g) {
        const P& q = groups.params[g];
        const Blocking blk(q);
        const fft::Twiddles<acc_t>* tw = groups.twiddles(g);
        sc.fit(blk, q.fft_size, tw != nullptr, kIsBwd<P>);
        for (int64_t d = d0; d < d1; d += blk.chans) run_block(q, blk, tw, sc, d, std::min(blk.chans, d1 - d), g > 0);
      }
    }
  });
}

// Either direction: packed sequences in groups of one FFT length, else the rows as one batch.
template <typename P>
void run(const P& p) {
  if (p.seqs.packed()) {
    run_packed(p);
  } else {
    run_rows(p);
  }
}

}  // namespace

template <typename T>
void fftconv_fwd_cpu(const FftconvFwdParams<T>& p) {
  run(p);
}

template <typename T>
void fftconv_bwd_cpu(const FftconvBwdParams<T>& p) {
  run(p);
}

#define SSMK_INSTANTIATE(T)                                           \
  template void fftconv_fwd_cpu<T>(const FftconvFwdParams<T>&); \
  template void fftconv_bwd_cpu<T>(const FftconvBwdParams<T>&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
