// CPU kernels of the selective scan and its decode step.
//
// Same blocking as the CUDA kernels: the sequence is walked in chunks of kChunkSize steps, the
// state before each chunk is saved (checkpoints, [B, D, n_chunks, N]), and the backward recomputes
// the forward inside one chunk at a time (states of that chunk only) before running the reverse
// recurrence. Work is split over (batch, channel) rows with at::parallel_for; the inner loops run
// over the dstate axis on contiguous arrays so they vectorise (fast_exp, AVX2 via
// SSMK_CPU_MULTIVERSION). For that, the host re-lays out B/C/A once per call
// (SelectiveScanCpuLayout): variable B/C as [B, G, L, N] in acc_t (the N values of one step
// contiguous), complex values as separate real and imaginary blocks of N.
//
// Packed sequences (cu_seqlens or seq_idx): a row is still walked in its chunks, token by token;
// where a sequence starts the state is reloaded (its own initial state, or zero) and where one
// ends its state is written out (common/packed_seqs.h), so one task never mixes two sequences'
// states and the cost per token is one comparison. The forward with cu_seqlens splits the work
// over (channel, sequence) instead of rows, balanced by tokens (fwd_sequences), so that a few
// channels still keep every thread busy; each step computes exactly what the row walk would. The backward's reverse recurrence restarts
// from the final-state gradient where a sequence ends and writes the initial-state gradient where
// it starts; with cu_seqlens it is split the same way, over (slice of channels, sequence), each
// sequence's sums over time kept per sequence and reduced by the host in sequence order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu.h"
#include "common/parallel.h"
#include "selective_scan/selective_scan.h"

namespace ssmk {
namespace {

using selective_scan::delta_transform;
using selective_scan::delta_transform_grad;
using selective_scan::kChunkSize;

template <typename acc_t, typename input_t>
SSMK_CPU_INLINE acc_t load(const input_t* ptr, int64_t offset) {
  return static_cast<acc_t>(ptr[offset]);
}

// Reads the initial state (or zeros) of row (b, d) into h ([NW], split layout).
template <typename acc_t, bool kComplex, typename W>
SSMK_CPU_INLINE void load_initial(const View<const W, 3>& init, int64_t N, int64_t b, int64_t d, acc_t* h) {
  const int64_t nw = kComplex ? 2 * N : N;
  if (!init.data) {
    std::fill(h, h + nw, acc_t(0));
    return;
  }
  const int64_t off = b * init.stride[0] + d * init.stride[1];
  for (int64_t n = 0; n < N; ++n) {
    const W v = init.data[off + n * init.stride[2]];
    if constexpr (kComplex) {
      h[n] = v.real();
      h[N + n] = v.imag();
    } else {
      h[n] = v;
    }
  }
}

// The state a sequence starts from: initial state `seq` (cu_seqlens) or zero (seq < 0: seq_idx).
template <typename acc_t, bool kComplex, typename W>
SSMK_CPU_INLINE void load_sequence_state(const View<const W, 3>& init, int64_t N, int64_t seq, int64_t d,
                                         acc_t* h) {
  if (seq >= 0) {
    load_initial<acc_t, kComplex>(init, N, seq, d, h);
  } else {
    std::fill(h, h + (kComplex ? 2 * N : N), acc_t(0));
  }
}

// Writes h ([NW], split layout) into a contiguous [N] state row.
template <typename acc_t, bool kComplex, typename W>
SSMK_CPU_INLINE void store_state(const acc_t* h, int64_t N, W* dst) {
  if constexpr (kComplex) {
    for (int64_t n = 0; n < N; ++n) dst[n] = W(h[n], h[N + n]);
  } else {
    std::memcpy(dst, h, N * sizeof(acc_t));
  }
}

template <typename acc_t, bool kComplex, typename W>
SSMK_CPU_INLINE void load_state(const W* src, int64_t N, acc_t* h) {
  if constexpr (kComplex) {
    for (int64_t n = 0; n < N; ++n) {
      h[n] = src[n].real();
      h[N + n] = src[n].imag();
    }
  } else {
    std::memcpy(h, src, N * sizeof(acc_t));
  }
}

// One step of the recurrence for every n, returning y_t (without the factor 2 of complex A).
// With kStore, a_out/h_out receive a_t and h_t (split layout).
template <typename acc_t, bool kComplex, bool kStore>
SSMK_CPU_INLINE acc_t scan_step(int64_t N, acc_t dt, acc_t du, const acc_t* SSMK_RESTRICT A,
                                const acc_t* SSMK_RESTRICT Bt, const acc_t* SSMK_RESTRICT Ct,
                                acc_t* SSMK_RESTRICT h, acc_t* SSMK_RESTRICT a_out,
                                acc_t* SSMK_RESTRICT h_out) {
  acc_t y = 0;
  if constexpr (!kComplex) {
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const acc_t a = selective_scan::discretize(dt, A[n]);
      const acc_t hn = a * h[n] + du * Bt[n];
      h[n] = hn;
      y += Ct[n] * hn;
      if constexpr (kStore) {
        a_out[n] = a;
        h_out[n] = hn;
      }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const c10::complex<acc_t> a = selective_scan::discretize(dt, c10::complex<acc_t>(A[n], A[N + n]));
      const acc_t hr = a.real() * h[n] - a.imag() * h[N + n] + du * Bt[n];
      const acc_t hi = a.real() * h[N + n] + a.imag() * h[n] + du * Bt[N + n];
      h[n] = hr;
      h[N + n] = hi;
      y += Ct[n] * hr - Ct[N + n] * hi;
      if constexpr (kStore) {
        a_out[n] = a.real();
        a_out[N + n] = a.imag();
        h_out[n] = hr;
        h_out[N + n] = hi;
      }
    }
  }
  return y;
}

// What the forward and the backward read of channel d of batch row b: its A row, B and C rows,
// D and delta bias, and the offsets of its u, delta and z rows.
template <typename acc_t>
struct Channel {
  const acc_t *A, *B, *C;
  acc_t D, bias;
  int64_t u_off, delta_off, z_off;
};
template <typename Params, typename acc_t>
SSMK_CPU_INLINE Channel<acc_t> channel_of(const Params& p, const SelectiveScanCpuLayout<acc_t>& lay, int64_t b,
                                          int64_t d) {
  const int64_t nw = lay.nw, L = p.seqlen;
  return {lay.A + d * nw,
          lay.B.row(p.dim, L, b, d, nw),
          lay.C.row(p.dim, L, b, d, nw),
          p.D ? p.D[d] : acc_t(0),
          p.delta_bias ? p.delta_bias[d] : acc_t(0),
          b * p.u.stride[0] + d * p.u.stride[1],
          b * p.delta.stride[0] + d * p.delta.stride[1],
          b * p.z.stride[0] + d * p.z.stride[1]};
}

template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void fwd_rows(const SelectiveScanFwdParams<input_t, kComplex>& p, const SelectiveScanCpuLayout<acc_t<input_t>>& lay,
                              int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t N = p.dstate, L = p.seqlen, nw = lay.nw, nc = p.n_chunks;
  constexpr acc_t kScale = kComplex ? acc_t(2) : acc_t(1);
  // Per chunk: dt and the epilogue are computed in passes vectorised over time; only the
  // recurrence itself walks step by step (vectorised over the state).
  std::vector<acc_t> h(nw), ubuf(kChunkSize), dtbuf(kChunkSize), ybuf(kChunkSize), zbuf(kChunkSize);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.dim, d = r % p.dim;
    const auto [A, Bbase, Cbase, Dd, bias_d, u_off, dl_off, z_off] = channel_of(p, lay, b, d);
    input_t* out = p.out + r * L;
    auto* ckpt = p.checkpoints + r * nc * N;
    const bool bounded = p.seqs.any();
    int64_t hint = 0;
    load_initial<acc_t, kComplex>(p.initial_state, N, b, d, h.data());
    for (int64_t c = 0; c < nc; ++c) {
      store_state<acc_t, kComplex>(h.data(), N, ckpt + c * N);
      const int64_t t0 = c * kChunkSize;
      const int64_t n = std::min(L, t0 + kChunkSize) - t0;
      acc_t* SSMK_RESTRICT ub = ubuf.data();
      acc_t* SSMK_RESTRICT dtb = dtbuf.data();
      acc_t* SSMK_RESTRICT yb = ybuf.data();
      acc_t* SSMK_RESTRICT zb = zbuf.data();
      for (int64_t i = 0; i < n; ++i) {
        ub[i] = load<acc_t>(p.u.data, u_off + (t0 + i) * p.u.stride[2]);
        dtb[i] = load<acc_t>(p.delta.data, dl_off + (t0 + i) * p.delta.stride[2]);
      }
      if (p.delta_softplus) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, true);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, false);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = t0 + i;
        const TokenBounds tb = bounded ? token_bounds(p.seqs, b, t, L, hint) : TokenBounds{false, false, -1};
        if (tb.start) load_sequence_state<acc_t, kComplex>(p.initial_state, N, tb.seq, d, h.data());
        yb[i] = kScale * scan_step<acc_t, kComplex, false>(N, dtb[i], dtb[i] * ub[i], A, Bbase + t * lay.B.step,
                                                           Cbase + t * lay.C.step, h.data(), nullptr, nullptr);
      }
      if (p.z.data) {
        for (int64_t i = 0; i < n; ++i) zb[i] = load<acc_t>(p.z.data, z_off + (t0 + i) * p.z.stride[2]);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, zb[i], true));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, acc_t(0), false));
      }
    }
    store_state<acc_t, kComplex>(h.data(), N, p.last_state + r * N);
  }
}
SSMK_CPU_MULTIVERSION(fwd_rows, (typename input_t, bool kComplex), (input_t, kComplex),
                      (const SelectiveScanFwdParams<input_t, kComplex>& p,
                       const SelectiveScanCpuLayout<acc_t<input_t>>& lay, int64_t begin, int64_t end),
                      (p, lay, begin, end))

// The forward with cu_seqlens (batch 1) over [begin, end) of the flattened (channel, token) index:
// every non-empty sequence whose first token lies there, run alone for its channel. Each step
// computes exactly what fwd_rows' walk of the row does (same chunk-relative passes, the state
// reloaded where the sequence starts), and the checkpoint before chunk c, the row walk's state
// after token c*K - 1, is written by the sequence holding that token (zeros before the row), so
// the results do not depend on how the range is split.
template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void fwd_sequences(const SelectiveScanFwdParams<input_t, kComplex>& p,
                                   const SelectiveScanCpuLayout<acc_t<input_t>>& lay, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t N = p.dstate, L = p.seqlen, nw = lay.nw, nc = p.n_chunks, S = p.seqs.num_seqs;
  constexpr acc_t kScale = kComplex ? acc_t(2) : acc_t(1);
  const int64_t* offsets = p.seqs.offsets;
  std::vector<acc_t> h(nw), ubuf(kChunkSize), dtbuf(kChunkSize), ybuf(kChunkSize), zbuf(kChunkSize);
  for (int64_t d = begin / L; d * L < end; ++d) {
    const int64_t lo = std::max<int64_t>(begin - d * L, 0), hi = std::min<int64_t>(end - d * L, L);
    const acc_t* A = lay.A + d * nw;
    const acc_t* Bbase = lay.B.row(p.dim, L, 0, d, nw);
    const acc_t* Cbase = lay.C.row(p.dim, L, 0, d, nw);
    const acc_t Dd = p.D ? p.D[d] : acc_t(0), bias_d = p.delta_bias ? p.delta_bias[d] : acc_t(0);
    const int64_t u_off = d * p.u.stride[1], dl_off = d * p.delta.stride[1], z_off = d * p.z.stride[1];
    input_t* out = p.out + d * L;
    auto* ckpt = p.checkpoints + d * nc * N;
    for (int64_t s = std::lower_bound(offsets, offsets + S, lo) - offsets; s < S && offsets[s] < hi; ++s) {
      const int64_t first = offsets[s], last = offsets[s + 1];
      if (first >= last) continue;  // empty: the host wrote its final state
      if (first == 0) {
        std::fill(h.begin(), h.end(), acc_t(0));
        store_state<acc_t, kComplex>(h.data(), N, ckpt);
      }
      load_sequence_state<acc_t, kComplex>(p.initial_state, N, s, d, h.data());
      for (int64_t c = first / kChunkSize; c * kChunkSize < last; ++c) {
        const int64_t t0 = c * kChunkSize;
        if (t0 > first) store_state<acc_t, kComplex>(h.data(), N, ckpt + c * N);
        const int64_t i0 = std::max(first, t0) - t0, i1 = std::min(last, t0 + kChunkSize) - t0;
        acc_t* SSMK_RESTRICT ub = ubuf.data();
        acc_t* SSMK_RESTRICT dtb = dtbuf.data();
        acc_t* SSMK_RESTRICT yb = ybuf.data();
        acc_t* SSMK_RESTRICT zb = zbuf.data();
        for (int64_t i = i0; i < i1; ++i) {
          ub[i] = load<acc_t>(p.u.data, u_off + (t0 + i) * p.u.stride[2]);
          dtb[i] = load<acc_t>(p.delta.data, dl_off + (t0 + i) * p.delta.stride[2]);
        }
        if (p.delta_softplus) {
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, true);
        } else {
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, false);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = t0 + i;
          yb[i] = kScale * scan_step<acc_t, kComplex, false>(N, dtb[i], dtb[i] * ub[i], A, Bbase + t * lay.B.step,
                                                             Cbase + t * lay.C.step, h.data(), nullptr, nullptr);
        }
        if (p.z.data) {
          for (int64_t i = i0; i < i1; ++i) zb[i] = load<acc_t>(p.z.data, z_off + (t0 + i) * p.z.stride[2]);
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, zb[i], true));
        } else {
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, acc_t(0), false));
        }
      }
      if (last % kChunkSize == 0 && last < L) store_state<acc_t, kComplex>(h.data(), N, ckpt + (last / kChunkSize) * N);
      store_state<acc_t, kComplex>(h.data(), N, p.last_state + (s * p.dim + d) * N);
    }
  }
}
SSMK_CPU_MULTIVERSION(fwd_sequences, (typename input_t, bool kComplex), (input_t, kComplex),
                      (const SelectiveScanFwdParams<input_t, kComplex>& p,
                       const SelectiveScanCpuLayout<acc_t<input_t>>& lay, int64_t begin, int64_t end),
                      (p, lay, begin, end))

// Per-thread buffers of the backward: hs[i] = h after step i of the chunk (hs[-1] = the chunk's
// checkpoint), as[i] = a of step i; per step of the chunk the sequence starting / ending there.
template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> hs_buf, as, dts, us, gs, ys, dtg, Kc, dA, dBf, dCf, hrow, h0;
  std::vector<int64_t> starts, ends;
  BwdScratch(int64_t K, int64_t nw)
      : hs_buf((K + 1) * nw), as(K * nw), dts(K), us(K), gs(K), ys(K), dtg(K), Kc(nw), dA(nw), dBf(nw),
        dCf(nw), hrow(nw), h0(nw), starts(K), ends(K) {}
};

// Backward of one slice of channels over tokens [first, last) of one batch row: the whole row, or
// with cu_seqlens one sequence (see the op's doc page for the derivation). With
// K_t = conj(a_t) G_t the gradient that reaches h_{t-1} through step t, and
// e_t = s g_t conj(C_t) the gradient of y_t w.r.t. h_t (s = 2 for complex A, else 1):
//   G_t = K_{t+1} + e_t,   K_t = conj(a_t) G_t,   K_L = dlast_state,   dinitial_state = K_0
//   dA += dt_t K_t conj(h_{t-1}),  ddt_t = Re(conj(A) K_t conj(h_{t-1})) + u_t Re(conj(B_t) G_t)
//   dB_t = dt_t u_t G_t,  dC_t = s g_t conj(h_t),  du_t = D g_t + dt_t Re(conj(B_t) G_t)
// The per-row sums (dA, fixed dB / dC, dD, ddelta_bias) go to row `sums_row` of their buffers:
// the batch row, or with cu_seqlens the sequence.
template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void bwd_task(const SelectiveScanBwdParams<input_t, kComplex>& p,
                              const SelectiveScanCpuLayout<acc_t<input_t>>& lay, BwdScratch<acc_t<input_t>>& sc,
                              int64_t b, int64_t slice, int64_t sums_row, int64_t first, int64_t last) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t N = p.dstate, L = p.seqlen, nw = lay.nw, nc = p.n_chunks;
  constexpr acc_t kScale = kComplex ? acc_t(2) : acc_t(1);
  const auto& dlast = p.dlast_state;
  // kNoBound: no sequence starts / ends at the step; -1: a seq_idx boundary.
  constexpr int64_t kNoBound = -2;
  std::vector<acc_t>& as = sc.as, &dts = sc.dts, &us = sc.us, &gs = sc.gs, &ys = sc.ys, &dtg = sc.dtg;
  std::vector<acc_t>& Kc = sc.Kc, &dA = sc.dA, &dBf = sc.dBf, &dCf = sc.dCf, &hrow = sc.hrow, &h0 = sc.h0;
  std::vector<int64_t>& starts = sc.starts, &ends = sc.ends;
  const bool packed = p.seqs.packed(), bounded = p.seqs.any();
  acc_t* hs = sc.hs_buf.data() + nw;
  // Variable B/C partial sums of this slice: [L, NW'] rows (interleaved if complex), of which
  // this task owns [first, last).
  acc_t* dBp = p.B.variable ? lay.dB_partial + (slice * p.batch + b) * L * nw : nullptr;
  acc_t* dCp = p.C.variable ? lay.dC_partial + (slice * p.batch + b) * L * nw : nullptr;
  if (dBp) std::fill(dBp + first * nw, dBp + last * nw, acc_t(0));
  if (dCp) std::fill(dCp + first * nw, dCp + last * nw, acc_t(0));
  for (int64_t d = slice * p.slice_channels; d < (slice + 1) * p.slice_channels; ++d) {
    const int64_t r = b * p.dim + d, rs = sums_row * p.dim + d;
    const auto [A, Bbase, Cbase, Dd, bias_d, u_off, dl_off, z_off] = channel_of(p, lay, b, d);
    const int64_t do_off = b * p.dout.stride[0] + d * p.dout.stride[1];
    const auto* ckpt = p.checkpoints + r * nc * N;
    input_t* du_out = p.du + r * L;
    input_t* ddelta_out = p.ddelta + r * L;
    input_t* dz_out = p.dz ? p.dz + r * L : nullptr;
    if (dlast.data && !packed) {
      for (int64_t n = 0; n < N; ++n) {
        const auto v = dlast.data[b * dlast.stride[0] + d * dlast.stride[1] + n * dlast.stride[2]];
        if constexpr (kComplex) {
          Kc[n] = v.real();
          Kc[N + n] = v.imag();
        } else {
          Kc[n] = v;
        }
      }
    } else {
      std::fill(Kc.begin(), Kc.end(), acc_t(0));
    }
    std::fill(dA.begin(), dA.end(), acc_t(0));
    std::fill(dBf.begin(), dBf.end(), acc_t(0));
    std::fill(dCf.begin(), dCf.end(), acc_t(0));
    acc_t dD = 0, ddb = 0;
    // The chunks holding [first, last), steps [i0, i1) of each. Where the range starts inside a
    // chunk, a sequence starts there (its state reloaded): hs[i0 - 1] is never read.
    for (int64_t c = last > first ? (last - 1) / kChunkSize : -1; c >= 0 && c >= first / kChunkSize; --c) {
      const int64_t t0 = c * kChunkSize;
      const int64_t i0 = std::max(first, t0) - t0, i1 = std::min(last, t0 + kChunkSize) - t0;
      load_state<acc_t, kComplex>(ckpt + c * N, N, hs - nw);
      std::memcpy(hrow.data(), hs - nw, nw * sizeof(acc_t));
      int64_t hint = packed ? packed_seq_of(p.seqs.offsets, p.seqs.num_seqs, t0 + i0) : 0;
      // Forward recomputation of the chunk.
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = t0 + i;
        const TokenBounds tb = bounded ? token_bounds(p.seqs, b, t, L, hint) : TokenBounds{false, false, -1};
        starts[i] = tb.start ? tb.seq : kNoBound;
        ends[i] = tb.end ? tb.seq : kNoBound;
        if (tb.start) load_sequence_state<acc_t, kComplex>(p.initial_state, N, tb.seq, d, hrow.data());
        const acc_t u = load<acc_t>(p.u.data, u_off + t * p.u.stride[2]);
        const acc_t delta = load<acc_t>(p.delta.data, dl_off + t * p.delta.stride[2]);
        const acc_t dt = delta_transform(delta, bias_d, p.delta_softplus);
        const acc_t dout = load<acc_t>(p.dout.data, do_off + t * p.dout.stride[2]);
        const acc_t zv = p.z.data ? load<acc_t>(p.z.data, z_off + t * p.z.stride[2]) : acc_t(0);
        dts[i] = dt;
        us[i] = u;
        dtg[i] = delta_transform_grad(delta, bias_d, p.delta_softplus);
        gs[i] = p.z.data ? dout * ssmk::silu(zv) : dout;
        ys[i] = kScale * scan_step<acc_t, kComplex, true>(N, dt, dt * u, A, Bbase + t * lay.B.step,
                                                    Cbase + t * lay.C.step, hrow.data(), as.data() + i * nw,
                                                    hs + i * nw);
        if (dz_out) {
          const acc_t o = ys[i] + Dd * u;
          dz_out[t] = static_cast<input_t>(dout * o * ssmk::silu_grad(zv));
        }
      }
      // Reverse recurrence over the chunk.
      for (int64_t i = i1 - 1; i >= i0; --i) {
        const int64_t t = t0 + i;
        const acc_t dt = dts[i], u = us[i], g = gs[i], cg = kScale * g, dtu = dt * u;
        const acc_t* Bt = Bbase + t * lay.B.step;
        const acc_t* Ct = Cbase + t * lay.C.step;
        const acc_t* a = as.data() + i * nw;
        const acc_t* h = hs + i * nw;
        const acc_t* hp = hs + (i - 1) * nw;
        if (ends[i] != kNoBound) load_sequence_state<acc_t, kComplex>(dlast, N, ends[i], d, Kc.data());
        if (starts[i] != kNoBound) {
          load_sequence_state<acc_t, kComplex>(p.initial_state, N, starts[i], d, h0.data());
          hp = h0.data();
        }
        acc_t* dBt = dBp ? dBp + t * nw : dBf.data();
        acc_t* dCt = dCp ? dCp + t * nw : dCf.data();
        acc_t sA = 0, sB = 0;
        if constexpr (!kComplex) {
          acc_t* SSMK_RESTRICT Kr = Kc.data();
          acc_t* SSMK_RESTRICT dAr = dA.data();
#pragma omp simd reduction(+ : sA, sB)
          for (int64_t n = 0; n < N; ++n) {
            const acc_t G = Kr[n] + cg * Ct[n];
            dCt[n] += cg * h[n];
            sB += G * Bt[n];
            dBt[n] += dtu * G;
            const acc_t Kn = a[n] * G;
            Kr[n] = Kn;
            const acc_t dw = Kn * hp[n];
            dAr[n] += dt * dw;
            sA += A[n] * dw;
          }
        } else {
          for (int64_t n = 0; n < N; ++n) {
            const acc_t Gr = Kc[n] + cg * Ct[n], Gi = Kc[N + n] - cg * Ct[N + n];
            // Partials of variable B/C are interleaved (re, im); fixed ones split.
            const int64_t ir = dCp ? 2 * n : n, ii = dCp ? 2 * n + 1 : N + n;
            dCt[ir] += cg * h[n];
            dCt[ii] -= cg * h[N + n];
            sB += Bt[n] * Gr + Bt[N + n] * Gi;
            const int64_t jr = dBp ? 2 * n : n, ji = dBp ? 2 * n + 1 : N + n;
            dBt[jr] += dtu * Gr;
            dBt[ji] += dtu * Gi;
            const acc_t ar = a[n], ai = a[N + n];
            const acc_t Kr = ar * Gr + ai * Gi, Ki = ar * Gi - ai * Gr;
            Kc[n] = Kr;
            Kc[N + n] = Ki;
            const acc_t dwr = Kr * hp[n] + Ki * hp[N + n], dwi = Ki * hp[n] - Kr * hp[N + n];
            dA[n] += dt * dwr;
            dA[N + n] += dt * dwi;
            sA += A[n] * dwr + A[N + n] * dwi;
          }
        }
        if (starts[i] >= 0) store_state<acc_t, kComplex>(Kc.data(), N, p.dinitial_state + (starts[i] * p.dim + d) * N);
        const acc_t ddt = sA + u * sB;
        const acc_t ddelta = ddt * dtg[i];
        du_out[t] = static_cast<input_t>(Dd * g + dt * sB);
        ddelta_out[t] = static_cast<input_t>(ddelta);
        dD += g * u;
        ddb += ddelta;
      }
    }
    if (!packed) store_state<acc_t, kComplex>(Kc.data(), N, p.dinitial_state + r * N);
    store_state<acc_t, kComplex>(dA.data(), N, p.dA_rows + rs * N);
    if (!p.B.variable) store_state<acc_t, kComplex>(dBf.data(), N, p.dB_rows + rs * N);
    if (!p.C.variable) store_state<acc_t, kComplex>(dCf.data(), N, p.dC_rows + rs * N);
    p.dD_rows[rs] = dD;
    p.ddelta_bias_rows[rs] = ddb;
  }
}

// Tasks [begin, end) of (batch row, slice) rows; with cu_seqlens (batch 1) instead [begin, end)
// of the flattened (slice, token) index: every non-empty sequence whose first token lies there,
// for the slice (as the forward's fwd_sequences splits, so a few slices still keep every thread
// busy). Empty sequences have no task (the host zeroes their sums).
template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void bwd_tasks(const SelectiveScanBwdParams<input_t, kComplex>& p,
                               const SelectiveScanCpuLayout<acc_t<input_t>>& lay, int64_t begin, int64_t end) {
  const int64_t L = p.seqlen;
  BwdScratch<acc_t<input_t>> sc(std::min<int64_t>(kChunkSize, L), lay.nw);
  if (!p.seqs.packed()) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.n_slices;
      bwd_task<input_t, kComplex>(p, lay, sc, b, task % p.n_slices, b, 0, L);
    }
    return;
  }
  const int64_t* offsets = p.seqs.offsets;
  const int64_t S = p.seqs.num_seqs;
  for (int64_t slice = begin / L; slice * L < end; ++slice) {
    const int64_t lo = std::max<int64_t>(begin - slice * L, 0), hi = std::min<int64_t>(end - slice * L, L);
    for (int64_t q = std::lower_bound(offsets, offsets + S, lo) - offsets; q < S && offsets[q] < hi; ++q) {
      if (offsets[q] < offsets[q + 1]) bwd_task<input_t, kComplex>(p, lay, sc, 0, slice, q, offsets[q], offsets[q + 1]);
    }
  }
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename input_t, bool kComplex), (input_t, kComplex),
                      (const SelectiveScanBwdParams<input_t, kComplex>& p,
                       const SelectiveScanCpuLayout<acc_t<input_t>>& lay, int64_t begin, int64_t end),
                      (p, lay, begin, end))

// One decode step per (batch, head, headdim) row, in runs of up to kUpdateRun rows of one
// (batch, head): the per-row scalar work (dt's softplus, the z gate) runs as loops over the run
// that vectorise, and each row's state update and C reduction as contiguous loops over dstate.
constexpr int64_t kUpdateRun = 64;

// sum_n c[n] h[n] with 8 independent partial sums (a fixed order the compiler keeps in one vector
// register; a plain `y +=` chain would stay scalar).
template <typename acc_t>
SSMK_CPU_INLINE acc_t dot_rows(const acc_t* SSMK_RESTRICT c, const acc_t* SSMK_RESTRICT h, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += c[i + j] * h[i + j];
  }
  for (; i < n; ++i) part[0] += c[i] * h[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

template <typename input_t>
SSMK_CPU_INLINE void update_rows(const SelectiveStateUpdateParams<input_t>& p, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  const int64_t heads_per_group = H / p.groups;
  acc_t xv[kUpdateRun], dtv[kUpdateRun], yv[kUpdateRun];
  for (int64_t r = begin; r < end;) {
    // Row r = (b * H + hd) * P + pd.
    const int64_t b = r / (H * P), hd = (r / P) % H, pd0 = r % P;
    const int64_t len = std::min({kUpdateRun, P - pd0, end - r});
    input_t* out = p.out + r;
    const int64_t sb = p.state_batch_indices ? p.state_batch_indices[b] : b;
    if (sb < 0 || sb >= p.state_batch) {
      for (int64_t i = 0; i < len; ++i) out[i] = input_t(0);
      r += len;
      continue;
    }
    const int64_t hp0 = hd * P + pd0;
    const input_t* x = p.x.data + b * p.x.stride[0] + hd * p.x.stride[1] + pd0 * p.x.stride[2];
    const input_t* dt = p.dt.data + b * p.dt.stride[0] + hd * p.dt.stride[1] + pd0 * p.dt.stride[2];
    const acc_t* bias = p.dt_bias ? p.dt_bias + hp0 : nullptr;
    for (int64_t i = 0; i < len; ++i) {
      xv[i] = static_cast<acc_t>(x[i * p.x.stride[2]]);
      dtv[i] = static_cast<acc_t>(dt[i * p.dt.stride[2]]) + (bias ? bias[i] : acc_t(0));
    }
    if (p.dt_softplus) {
      for (int64_t i = 0; i < len; ++i) dtv[i] = ssmk::softplus(dtv[i]);
    }

    const int64_t g = hd / heads_per_group;
    const acc_t* Bv = p.B + (b * p.groups + g) * N;
    const acc_t* Cv = p.C + (b * p.groups + g) * N;
    const int64_t sn = p.state.stride[3];
    for (int64_t i = 0; i < len; ++i) {
      const acc_t* A = p.A + (hp0 + i) * N;
      acc_t* state = p.state.data + sb * p.state.stride[0] + hd * p.state.stride[1] + (pd0 + i) * p.state.stride[2];
      const acc_t dti = dtv[i], dtx = dtv[i] * xv[i];
      if (sn == 1) {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) state[n] = selective_scan::discretize(dti, A[n]) * state[n] + dtx * Bv[n];
        yv[i] = dot_rows(Cv, state, N);
      } else {
        acc_t y = 0;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t h = selective_scan::discretize(dti, A[n]) * state[n * sn] + dtx * Bv[n];
          state[n * sn] = h;
          y += Cv[n] * h;
        }
        yv[i] = y;
      }
    }

    if (p.D) {
      const acc_t* D = p.D + hp0;
      for (int64_t i = 0; i < len; ++i) yv[i] += D[i] * xv[i];
    }
    if (p.z.data) {
      const input_t* z = p.z.data + b * p.z.stride[0] + hd * p.z.stride[1] + pd0 * p.z.stride[2];
      for (int64_t i = 0; i < len; ++i) yv[i] *= ssmk::silu(static_cast<acc_t>(z[i * p.z.stride[2]]));
    }
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<input_t>(yv[i]);
    r += len;
  }
}
SSMK_CPU_MULTIVERSION(update_rows, (typename input_t), (input_t),
                      (const SelectiveStateUpdateParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

}  // namespace

template <typename T, bool kComplex>
void selective_scan_fwd_cpu(const SelectiveScanFwdParams<T, kComplex>& p, const SelectiveScanCpuLayout<acc_t<T>>& lay) {
  if (p.seqs.packed()) {
    // Split by tokens of (channel, token): the threads get equal shares even for a few channels.
    cpu::parallel_items(
        p.dim * p.seqlen, p.dstate,
        [&](int64_t begin, int64_t end) { fwd_sequences_dispatch<T, kComplex>(p, lay, begin, end); }, kChunkSize);
    return;
  }
  cpu::parallel_items(p.batch * p.dim, p.seqlen * p.dstate,
                      [&](int64_t begin, int64_t end) { fwd_rows_dispatch<T, kComplex>(p, lay, begin, end); });
}

template <typename T, bool kComplex>
void selective_scan_bwd_cpu(const SelectiveScanBwdParams<T, kComplex>& p, const SelectiveScanCpuLayout<acc_t<T>>& lay) {
  // Packed: split by tokens of (slice, token), as the forward; else by (batch, slice).
  const bool packed = p.seqs.packed();
  cpu::parallel_items(
      packed ? p.n_slices * p.seqlen : p.batch * p.n_slices, p.slice_channels * p.dstate * (packed ? 1 : p.seqlen),
      [&](int64_t begin, int64_t end) { bwd_tasks_dispatch<T, kComplex>(p, lay, begin, end); }, packed ? kChunkSize : 1);
}

template <typename T>
void selective_state_update_cpu(const SelectiveStateUpdateParams<T>& p) {
  cpu::parallel_items(
      p.batch * p.nheads * p.headdim, p.dstate, [&](int64_t begin, int64_t end) { update_rows_dispatch<T>(p, begin, end); },
      64);
}

#define SSMK_INSTANTIATE_SCAN(T, C)                                                                              \
  template void selective_scan_fwd_cpu<T, C>(const SelectiveScanFwdParams<T, C>&, const SelectiveScanCpuLayout<acc_t<T>>&); \
  template void selective_scan_bwd_cpu<T, C>(const SelectiveScanBwdParams<T, C>&, const SelectiveScanCpuLayout<acc_t<T>>&);
#define SSMK_INSTANTIATE(T)     \
  SSMK_INSTANTIATE_SCAN(T, false) \
  SSMK_INSTANTIATE_SCAN(T, true)  \
  template void selective_state_update_cpu<T>(const SelectiveStateUpdateParams<T>&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE
#undef SSMK_INSTANTIATE_SCAN

}  // namespace ssmk
