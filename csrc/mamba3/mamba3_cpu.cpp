// CPU kernels of mamba3_scan and mamba3_step over at::parallel_for, each thread with its own
// buffers, in AVX2+FMA variants chosen at run time (common/cpu.h). The scan's forward and backward
// run blocks of chunks of one (batch, value head) task through batched BLAS products (the math of
// mamba3_math.h and of mamba3_task.h's per-chunk functions, which the GPU runs); the decode step is
// mamba3_task.h's step_task.
#include "common/aten.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/cpu.h"
#include "common/parallel.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

// tanh, sin and cos in forms that loops over a row vectorise (no libm call) for float, libm for
// double. tanh: Cephes' odd polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above. sin, cos:
// Cody-Waite reduction by pi/2 to [-pi/4, pi/4] and Cephes' minimax polynomials, selected by
// quadrant. Absolute error against double libm below 1e-7 (measured: tanh on [-20, 20], sin and
// cos on [-300, 300]; the angles here lie in [0, 2 pi)).
SSMK_CPU_INLINE float tanh_(float x) {
  const float ax = std::fabs(x), z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  const float large = std::copysign(1.0f - 2.0f / (ssmk::fast_exp(2.0f * ax) + 1.0f), x);
  return ax < 0.625f ? small : large;
}
SSMK_CPU_INLINE double tanh_(double x) { return std::tanh(x); }

SSMK_CPU_INLINE void sincos_(float x, float& s, float& c) {
  const float k = std::floor(x * 0.636619772367581343f + 0.5f);
  const float r = ((x - k * 1.5703125f) - k * 4.837512969970703125e-4f) - k * 7.549789954891882e-8f;
  const float z = r * r;
  const float ps = r + r * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float pc = 1.0f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                                              4.166664568298827e-2f);
  const int quad = static_cast<int>(k) & 3;
  const float sq = (quad & 1) ? pc : ps, cq = (quad & 1) ? ps : pc;
  s = (quad & 2) ? -sq : sq;
  c = ((quad + 1) & 2) ? -cq : cq;
}
SSMK_CPU_INLINE void sincos_(double x, double& s, double& c) {
  s = std::sin(x);
  c = std::cos(x);
}

// mamba3::rotate_pairs and rotate_pairs_bwd (the same arithmetic) with the rows declared
// unaliased, so the loops over the pairs vectorise.
template <typename acc>
SSMK_CPU_INLINE void rotate_row(acc* __restrict__ x, const acc* __restrict__ cs, const acc* __restrict__ sn,
                                int64_t npairs) {
#pragma omp simd
  for (int64_t j = 0; j < npairs; ++j) {
    const acc x0 = x[2 * j], x1 = x[2 * j + 1];
    x[2 * j] = x0 * cs[j] - x1 * sn[j];
    x[2 * j + 1] = x0 * sn[j] + x1 * cs[j];
  }
}
template <typename acc>
SSMK_CPU_INLINE void rotate_row_bwd(acc* __restrict__ g, const acc* __restrict__ xr, const acc* __restrict__ cs,
                                    const acc* __restrict__ sn, int64_t npairs, acc* __restrict__ dangle) {
#pragma omp simd
  for (int64_t j = 0; j < npairs; ++j) {
    const acc g0 = g[2 * j], g1 = g[2 * j + 1];
    dangle[j] += g1 * xr[2 * j] - g0 * xr[2 * j + 1];
    g[2 * j] = g0 * cs[j] + g1 * sn[j];
    g[2 * j + 1] = -g0 * sn[j] + g1 * cs[j];
  }
}

// One step of the angle recurrence, theta <- (theta + pi tanh(angles) dt) mod 2 pi, with the
// vectorised tanh (the forward's load and the backward's angle-only pass share it).
template <typename acc>
SSMK_CPU_INLINE void advance_angle(acc* __restrict__ theta, const acc* __restrict__ ang, acc dt, int64_t A) {
#pragma omp simd
  for (int64_t j = 0; j < A; ++j) theta[j] = mamba3::wrap_angle(theta[j] + acc(mamba3::kPi) * tanh_(ang[j]) * dt);
}

// A task walks [B, L, H, *] tensors one step, a page or more apart, at a time: a pattern the
// hardware prefetchers do not follow, so the rows kAhead steps on are requested explicitly.
constexpr int64_t kAhead = 6;
template <typename T>
SSMK_CPU_INLINE void prefetch_row(const T* row, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o, 0, 3);
#endif
}
template <typename T>
SSMK_CPU_INLINE void prefetch_row_w(T* row, int64_t n) {
#if defined(__GNUC__)
  char* c = reinterpret_cast<char*>(row);
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o, 1, 3);
#endif
}

// Rows of the large outputs (out, the chunk states, and the backward's per-head dq, dk and dv, dz:
// tens of MB, not read again by this kernel) are written with non-temporal stores where the
// element type allows, so that the cache does not first read every line they overwrite; the rows
// are then not prefetched for writing. A task ends with fence_rows() (the stores are weakly
// ordered).
template <typename T, typename acc>
constexpr bool kStreamRows = std::is_same_v<T, float> && std::is_same_v<acc, float>;

template <typename T, typename acc>
SSMK_CPU_INLINE void store_row(T* __restrict__ dst, const acc* __restrict__ src, int64_t n) {
#if defined(__SSE2__)
  if constexpr (kStreamRows<T, acc>) {
    if ((reinterpret_cast<std::uintptr_t>(dst) & 15) == 0 && n % 4 == 0) {
      for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

SSMK_CPU_INLINE void fence_rows() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// n elements of a strided row of T into acc (the unit-stride case as its own loop, vectorised).
template <typename T, typename acc>
SSMK_CPU_INLINE void load_row(const T* src, int64_t stride, int64_t n, acc* dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc>(src[i * stride]);
  }
}


// A block of up to kBlockChunks chunks of one task in per-thread buffers: rows i = t R + r of
// chunk c at c Q R + i, the rows past a short last chunk zero (so the batched products over the
// block's chunks need no special case), and the per-step coefficients at c Q + t. Long chunks
// (large Q R) get fewer chunks per block, so a buffer stays near kBlockElems elements.
constexpr int64_t kBlockChunks = 32;
constexpr int64_t kBlockElems = int64_t(1) << 18;

inline int64_t block_chunks(const Mamba3Dims& d) {
  const int64_t QR = d.chunk * d.rank, row = std::max({QR, d.headdim_qk, d.headdim_v});
  return std::max<int64_t>(1, std::min({kBlockChunks, d.nchunks(), kBlockElems / (QR * row)}));
}

template <typename acc>
struct Block {
  int64_t Q, R, QR, N, P, A, chunks;
  at::Tensor q, k, x, xe, cbm, y, yi, states;  // [C, QR, N|P], [C, QR, QR], [C, P, N]
  std::vector<acc> cs, sn, lam, dtv, gam, w, acs;  // [C Q (A)]
  std::vector<acc> ri, to_end, ew;             // [C Q]: e^{Acs_t}, e^{Acs_last - Acs_t}, that times w_t
  std::vector<int64_t> len;                    // steps of each chunk
  Block(const Mamba3Dims& d, at::ScalarType dtype)
      : Q(d.chunk), R(d.rank), QR(d.chunk * d.rank), N(d.headdim_qk), P(d.headdim_v), A(d.nangles),
        chunks(block_chunks(d)) {
    const auto o = at::TensorOptions().dtype(dtype);
    for (auto* t : {&q, &k}) *t = at::empty({chunks, QR, N}, o);
    for (auto* t : {&x, &xe, &y, &yi}) *t = at::empty({chunks, QR, P}, o);
    cbm = at::empty({chunks, QR, QR}, o);
    states = at::empty({chunks, P, N}, o);
    for (auto* v : {&lam, &dtv, &gam, &w, &acs, &ri, &to_end, &ew}) v->resize(chunks * Q);
    cs.resize(chunks * Q * A);
    sn.resize(chunks * Q * A);
    len.resize(chunks);
  }
  acc* ptr(const at::Tensor& t, int64_t c, int64_t rowlen) const { return t.data_ptr<acc>() + c * QR * rowlen; }
  acc* state(int64_t c) const { return states.data_ptr<acc>() + c * P * N; }
  // Loads chunk c of the block (steps t0 .. t0+n-1 of a task ending at `end`), mamba3_task.h's
  // chunk_coefficients and chunk_rows with the angles' tanh, sin and cos vectorised over the chunk,
  // then zeroes its pad.
  template <typename T>
  SSMK_CPU_INLINE void load(const Mamba3Inputs<T>& p, int64_t b, int64_t h, int64_t c, int64_t t0, int64_t n,
                            int64_t end, acc* theta) {
    const int64_t L = p.seqlen, H = p.nheads, g = h / (H / p.ngroups), row = (b * H + h) * L;
    acc* lc = lam.data() + c * Q;
    acc* dc = dtv.data() + c * Q;
    acc* gc = gam.data() + c * Q;
    acc* wc = w.data() + c * Q;
    acc* ac = acs.data() + c * Q;
    acc cum = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t l = t0 + t;
      const acc dt = p.dt[row + l];
      const acc lm = ssmk::sigmoid(p.trap[row + l]);
      dc[t] = dt;
      lc[t] = lm;
      gc[t] = lm * dt;
      const acc sigma = l + 1 < end ? (acc(1) - ssmk::sigmoid(p.trap[row + l + 1])) * p.dt[row + l + 1] : acc(0);
      wc[t] = gc[t] + sigma;
      cum += p.adt[row + l];
      ac[t] = cum;
    }
    acc* csc = cs.data() + c * Q * A;
    acc* snc = sn.data() + c * Q * A;
    if (A > 0) {
      for (int64_t t = 0; t < n; ++t) {
        const acc* ang = p.angles + ((b * L + t0 + t) * H + h) * A;
        if (t0 + t + kAhead < L) prefetch_row(ang + kAhead * H * A, A);
        advance_angle(theta, ang, dc[t], A);
        std::copy(theta, theta + A, csc + t * A);
      }
#pragma omp simd
      for (int64_t e = 0; e < n * A; ++e) {
        const acc a = csc[e];
        sincos_(a, snc[e], csc[e]);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t l = t0 + t;
      const T* vr = p.v.data + b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2];
      if (l + kAhead < L) {
        if (p.v.stride[3] == 1) prefetch_row(vr + kAhead * p.v.stride[1], P);
        for (int64_t r = 0; r < R; ++r) {
          if (p.q.stride[4] == 1) {
            prefetch_row(p.q.data + b * p.q.stride[0] + (l + kAhead) * p.q.stride[1] + r * p.q.stride[2] +
                             g * p.q.stride[3], N);
          }
          if (p.k.stride[4] == 1) {
            prefetch_row(p.k.data + b * p.k.stride[0] + (l + kAhead) * p.k.stride[1] + r * p.k.stride[2] +
                             g * p.k.stride[3], N);
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = t * R + r;
        acc* qi = ptr(q, c, N) + i * N;
        acc* ki = ptr(k, c, N) + i * N;
        load_row(p.q.data + b * p.q.stride[0] + l * p.q.stride[1] + r * p.q.stride[2] + g * p.q.stride[3],
                 p.q.stride[4], N, qi);
        load_row(p.k.data + b * p.k.stride[0] + l * p.k.stride[1] + r * p.k.stride[2] + g * p.k.stride[3],
                 p.k.stride[4], N, ki);
        if (p.q_bias) mamba3::axpy(qi, acc(1), p.q_bias + (h * R + r) * N, N);
        if (p.k_bias) mamba3::axpy(ki, acc(1), p.k_bias + (h * R + r) * N, N);
        rotate_row(qi, csc + t * A, snc + t * A, A);
        rotate_row(ki, csc + t * A, snc + t * A, A);
        acc* xi = ptr(x, c, P) + i * P;
        load_row(vr, p.v.stride[3], P, xi);
        if (p.mimo) {
          const acc* mv = p.mimo_v + (h * R + r) * P;
#pragma omp simd
          for (int64_t cc = 0; cc < P; ++cc) xi[cc] *= mv[cc];
        }
      }
    }
    len[c] = n;
    if (n < Q) {
      std::fill(ptr(q, c, N) + n * R * N, ptr(q, c, N) + QR * N, acc(0));
      std::fill(ptr(k, c, N) + n * R * N, ptr(k, c, N) + QR * N, acc(0));
      std::fill(ptr(x, c, P) + n * R * P, ptr(x, c, P) + QR * P, acc(0));
      for (int64_t t = n; t < Q; ++t) {
        lc[t] = dc[t] = gc[t] = wc[t] = acc(0);
        ac[t] = ac[n - 1];
      }
    }
  }
  // Loads the chunks c0 .. c0+nb-1 of the task's tokens (theta carries the angle), then their
  // decays and x_e = e^{Acs_last - Acs_s} w_s x, the rows that enter the state update.
  template <typename T>
  SSMK_CPU_INLINE void load_block(const Mamba3Inputs<T>& p, const Mamba3Span& sp, int64_t c0, int64_t nb,
                                  acc* theta) {
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t t0 = sp.start + (c0 + c) * Q;
      load(p, sp.b, sp.h, c, t0, std::min(Q, sp.end - t0), sp.end, theta);
    }
    for (int64_t c = 0; c < nb; ++c) {
      const acc* ac = acs.data() + c * Q;
      const acc last = ac[Q - 1];
      for (int64_t t = 0; t < Q; ++t) {
        ri[c * Q + t] = mamba3::exp_(ac[t]);
        to_end[c * Q + t] = mamba3::exp_(last - ac[t]);
        ew[c * Q + t] = to_end[c * Q + t] * w[c * Q + t];
      }
      const acc* xc = ptr(x, c, P);
      acc* xec = ptr(xe, c, P);
      for (int64_t j = 0; j < QR; ++j) {
        const acc e = ew[c * Q + j / R];
#pragma omp simd
        for (int64_t cc = 0; cc < P; ++cc) xec[j * P + cc] = e * xc[j * P + cc];
      }
    }
  }
  // The angle carried over the chunks c0 .. c0+nb-1 of the task's tokens without loading them.
  template <typename T>
  SSMK_CPU_INLINE void skip_block(const Mamba3Inputs<T>& p, const Mamba3Span& sp, int64_t c0, int64_t nb,
                                  acc* theta) const {
    const int64_t L = p.seqlen, H = p.nheads, row = (sp.b * H + sp.h) * L;
    const int64_t first = sp.start + c0 * Q, last = std::min(sp.end, first + nb * Q);
    for (int64_t l = first; l < last && A > 0; ++l) {
      const acc* ang = p.angles + ((sp.b * L + l) * H + sp.h) * A;
      if (l + kAhead < L) prefetch_row(ang + kAhead * H * A, A);
      advance_angle(theta, ang, p.dt[row + l], A);
    }
  }
  // dst[c] <- src[c] masked: e^{Acs_t - Acs_s} w_s below the diagonal steps, gamma_t on them, zero
  // above (src may be dst). Rows of one step share their mask row (computed once, vectorised).
  SSMK_CPU_INLINE void mask(int64_t nb, const at::Tensor& src, const at::Tensor& dst, acc* drow) {
    for (int64_t c = 0; c < nb; ++c) {
      const acc* ac = acs.data() + c * Q;
      const acc* wc = w.data() + c * Q;
      const acc* s = ptr(src, c, QR);
      acc* m = ptr(dst, c, QR);
      for (int64_t ti = 0; ti < Q; ++ti) {
        const acc at = ac[ti];
#pragma omp simd
        for (int64_t tj = 0; tj < ti; ++tj) drow[tj] = mamba3::exp_(at - ac[tj]) * wc[tj];
        drow[ti] = gam[c * Q + ti];
        for (int64_t r = 0; r < R; ++r) {
          const acc* srow = s + (ti * R + r) * QR;
          acc* row = m + (ti * R + r) * QR;
          if (R == 1) {
#pragma omp simd
            for (int64_t j = 0; j <= ti; ++j) row[j] = srow[j] * drow[j];
          } else {
            for (int64_t j = 0; j < (ti + 1) * R; ++j) row[j] = srow[j] * drow[j / R];
          }
          std::fill(row + (ti + 1) * R, row + QR, acc(0));
        }
      }
    }
  }
  // The scan of chunk-local states across the block: states[c] holds the local state of chunk c
  // and becomes the state before it (also written to before[c] when given); S carries the state.
  SSMK_CPU_INLINE void scan_states(int64_t nb, acc* S, acc* before) {
    for (int64_t c = 0; c < nb; ++c) {
      acc* sc = state(c);
      acc* bc = before ? before + c * P * N : sc;
      const acc kd = mamba3::exp_(acs[c * Q + Q - 1]);
#pragma omp simd
      for (int64_t j = 0; j < P * N; ++j) {
        const acc local = sc[j];
        bc[j] = S[j];
        S[j] = kd * S[j] + local;
      }
    }
  }
};

// One forward task in blocks of chunks: per block, the batched products cbm = q k^T (masked),
// y = cbm x, the chunk-local states x_e^T k, the scan of the states across the block's chunks,
// and e^{Acs_t} St_prev q (the inter-chunk term).
template <typename T>
SSMK_CPU_INLINE void fwd_task_blocked(const Mamba3FwdParams<T>& p, int64_t task, Block<acc_t<T>>& bk,
                                      acc_t<T>* S, acc_t<T>* theta, acc_t<T>* o, acc_t<T>* drow, acc_t<T>* zb,
                                      acc_t<T>* gate, const acc_t<T>* ones) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const Mamba3Span sp = p.span(task);
  if (sp.start == sp.end) {
    mamba3::empty_fwd(p, task);
    return;
  }
  const int64_t Q = p.chunk, nc = mamba3::task_chunks(p, sp);
  const int64_t b = sp.b, h = sp.h, bh = task;
  mamba3::initial_state(p, bh, sp, mamba3::StateLayout{P, N}, S, theta);
  const acc D = p.D ? p.D[h] : acc(0);
  for (int64_t c0 = 0; c0 < nc; c0 += bk.chunks) {
    const int64_t nb = std::min(bk.chunks, nc - c0);
    bk.load_block(p, sp, c0, nb, theta);
    const at::Tensor q = bk.q.narrow(0, 0, nb), k = bk.k.narrow(0, 0, nb), x = bk.x.narrow(0, 0, nb);
    at::Tensor cbm = bk.cbm.narrow(0, 0, nb), y = bk.y.narrow(0, 0, nb), yi = bk.yi.narrow(0, 0, nb);
    at::Tensor xe = bk.xe.narrow(0, 0, nb), st = bk.states.narrow(0, 0, nb);
    at::bmm_out(cbm, q, k.transpose(1, 2));
    bk.mask(nb, cbm, cbm, drow);
    at::bmm_out(y, cbm, x);
    at::bmm_out(st, xe.transpose(1, 2), k);
    bk.scan_states(nb, S, nullptr);
    if (p.chunk_states) {
      store_row(p.chunk_states + (mamba3::bwd_state_slot(p, task) + c0) * P * N, bk.state(0), nb * P * N);
    }
    at::bmm_out(yi, q, st.transpose(1, 2));
    // y = intra + e^{Acs_t} inter + D x, then the gate and the output mixing (a factor 1 where
    // there is no gate or mixing, so the loops have no branches).
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t t0 = sp.start + (c0 + c) * Q, n = bk.len[c];
      const acc* yc = bk.ptr(bk.y, c, P);
      const acc* yic = bk.ptr(bk.yi, c, P);
      const acc* xc = bk.ptr(bk.x, c, P);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const acc ri = bk.ri[c * Q + t];
        const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
        T* out = p.out + ((b * L + l) * H + h) * P;
        if (l + kAhead < L) {
          if (zr && p.z.stride[3] == 1) prefetch_row(zr + kAhead * p.z.stride[1], P);
          if (!kStreamRows<T, acc>) prefetch_row_w(out + kAhead * H * P, P);
        }
        if (zr) load_row(zr, p.z.stride[3], P, zb);
        std::fill(o, o + P, acc(0));
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = (t * R + r) * P;
          const acc* mo = p.mimo ? p.mimo_o + (h * R + r) * P : ones;
          if (zr) {
            const acc* mz = p.mimo ? p.mimo_z + (h * R + r) * P : ones;
#pragma omp simd
            for (int64_t cc = 0; cc < P; ++cc) gate[cc] = ssmk::silu(zb[cc] * mz[cc]);
          }
          const acc* gt = zr ? gate : ones;
          if (p.gate_input) {
            acc* __restrict__ gi = p.gate_input + (((b * H + h) * L + l) * R + r) * P;
#pragma omp simd
            for (int64_t cc = 0; cc < P; ++cc) {
              const acc yv = yc[i + cc] + ri * yic[i + cc] + D * xc[i + cc];
              gi[cc] = yv;
              o[cc] += yv * gt[cc] * mo[cc];
            }
          } else {
#pragma omp simd
            for (int64_t cc = 0; cc < P; ++cc) o[cc] += (yc[i + cc] + ri * yic[i + cc] + D * xc[i + cc]) * gt[cc] * mo[cc];
          }
        }
        store_row(out, o, P);
      }
      if (c0 + c == nc - 1) {
        std::copy(bk.ptr(bk.k, c, N) + (n - 1) * R * N, bk.ptr(bk.k, c, N) + n * R * N, p.final_k + bh * R * N);
        std::copy(xc + (n - 1) * R * P, xc + n * R * P, p.final_v + bh * R * P);
      }
    }
  }
  std::copy(S, S + P * N, p.final_ssm + bh * P * N);
  std::copy(theta, theta + A, p.final_angle + bh * A);
  fence_rows();
}

template <typename T>
SSMK_CPU_INLINE void fwd_tasks(const Mamba3FwdParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  Block<acc> bk(p, c10::CppTypeToScalarType<acc>::value);
  const int64_t P = p.headdim_v;
  std::vector<acc> s(P * p.headdim_qk + p.nangles + 3 * P + p.chunk), ones(P, acc(1));
  acc* S = s.data();
  acc* theta = S + P * p.headdim_qk;
  acc* o = theta + p.nangles;
  acc* zb = o + P;
  acc* gate = zb + P;
  acc* drow = gate + P;
  for (int64_t task = begin; task < end; ++task) {
    fwd_task_blocked(p, task, bk, S, theta, o, drow, zb, gate, ones.data());
  }
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T), (T), (const Mamba3FwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

// The backward's per-thread buffers beyond the block's: the raw q k^T, dy, the intra-chunk
// gradients, the per-step gradient sums of a block, the state before every chunk of the task
// (where the forward's are not given) and the angle before every block.
template <typename acc>
struct BwdBlock : Block<acc> {
  at::Tensor cb, g, dy, dx, dq, dk;   // [C, QR, QR] x2, [C, QR, P] x2, [C, QR, N] x2
  at::Tensor before;                  // [nc, P, N]
  std::vector<acc> dacs, dw, dgam;    // [C Q]
  std::vector<acc> thetas;            // [blocks, A]
  std::vector<acc> S, dS, theta, carry, dtheta, dqb, dkb, dmv, dmz, dmo, drow;
  std::vector<acc> dzacc, dvacc, gob, zb, ones, sink_z, sink_o;  // [P]
  BwdBlock(const Mamba3Dims& d, at::ScalarType dtype, bool saved_states) : Block<acc>(d, dtype) {
    const auto o = at::TensorOptions().dtype(dtype);
    const int64_t C = this->chunks, QR = this->QR, N = this->N, P = this->P, A = this->A, Q = this->Q;
    const int64_t R = this->R, nc = d.nchunks();
    for (auto* t : {&cb, &g}) *t = at::empty({C, QR, QR}, o);
    for (auto* t : {&dy, &dx}) *t = at::empty({C, QR, P}, o);
    for (auto* t : {&dq, &dk}) *t = at::empty({C, QR, N}, o);
    before = at::empty({saved_states ? 0 : nc, P, N}, o);
    for (auto* v : {&dacs, &dw, &dgam}) v->resize(C * Q);
    thetas.resize((nc + C - 1) / C * A);
    for (auto* v : {&S, &dS}) v->resize(P * N);
    for (auto* v : {&theta, &carry}) v->resize(A);
    dtheta.resize(Q * A);
    for (auto* v : {&dqb, &dkb}) v->resize(R * N);
    for (auto* v : {&dmv, &dmz, &dmo}) v->resize(R * P);
    for (auto* v : {&dzacc, &dvacc, &gob, &zb, &sink_z, &sink_o}) v->resize(P);
    ones.assign(P, acc(1));
    drow.resize(Q);
  }
  // From g = dy x^T: the mask's gradients (d Acs of both steps, dw below the diagonal steps,
  // dgamma on them) and g <- g masked (the gradient of the masked product), zero above and on
  // the pad rows.
  SSMK_CPU_INLINE void grad_mask(int64_t nb) {
    const int64_t Q = this->Q, R = this->R, QR = this->QR;
    for (int64_t c = 0; c < nb; ++c) {
      const acc* ac = this->acs.data() + c * Q;
      const acc* wc = this->w.data() + c * Q;
      const acc* gmc = this->gam.data() + c * Q;
      acc* __restrict__ da = dacs.data() + c * Q;
      acc* __restrict__ dwc = dw.data() + c * Q;
      acc* __restrict__ dec = drow.data();
      const int64_t n = this->len[c];
      const acc* cbc = this->ptr(cb, c, QR);
      acc* gc = this->ptr(g, c, QR);
      for (int64_t ti = 0; ti < n; ++ti) {
        const acc at = ac[ti];
#pragma omp simd
        for (int64_t tj = 0; tj < ti; ++tj) dec[tj] = mamba3::exp_(at - ac[tj]);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = ti * R + r;
          const acc* __restrict__ cr = cbc + i * QR;
          acc* __restrict__ gr = gc + i * QR;
          acc rowsum = 0;
          if (R == 1) {
#pragma omp simd reduction(+ : rowsum)
            for (int64_t j = 0; j < ti; ++j) {
              const acc z = cr[j] * gr[j] * dec[j];
              const acc wz = z * wc[j];
              dwc[j] += z;
              da[j] -= wz;
              rowsum += wz;
              gr[j] *= dec[j] * wc[j];
            }
          } else {
            for (int64_t j = 0; j < ti * R; ++j) {
              const int64_t tj = j / R;
              const acc z = cr[j] * gr[j] * dec[tj];
              const acc wz = z * wc[tj];
              dwc[tj] += z;
              da[tj] -= wz;
              rowsum += wz;
              gr[j] *= dec[tj] * wc[tj];
            }
          }
          // The diagonal step's coefficient is gamma_t (no decay, no d Acs).
          for (int64_t j = ti * R; j < (ti + 1) * R; ++j) {
            dgam[c * Q + ti] += cr[j] * gr[j];
            gr[j] *= gmc[ti];
          }
          da[ti] += rowsum;
          std::fill(gr + (ti + 1) * R, gr + QR, acc(0));
        }
      }
      std::fill(gc + n * R * QR, gc + QR * QR, acc(0));
    }
  }
};

// The gate and the output mixing of chunk c's rows, given y before the gate (yc, the chunk's rows):
// dy (the gradient of y) and dz, dmimo_z, dmimo_o, dD, dx = D dy; the pad rows of dy and dx are
// zero. (The inter-chunk term's d Acs_t = e^{Acs_t} dy . (St_prev q) comes with dq.)
template <typename T>
SSMK_CPU_INLINE void gate_bwd(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t c, int64_t t0,
                              const acc_t<T>* __restrict__ yc, BwdBlock<acc_t<T>>& bk, acc_t<T>& dD) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, P = p.headdim_v, QR = bk.QR, n = bk.len[c];
  const acc D = p.D ? p.D[h] : acc(0);
  const acc* xc = bk.ptr(bk.x, c, P);
  acc* dyc = bk.ptr(bk.dy, c, P);
  acc* dxc = bk.ptr(bk.dx, c, P);
  acc* __restrict__ dzacc = bk.dzacc.data();
  acc* gob = bk.gob.data();
  acc* zb = bk.zb.data();
  const acc* ones = bk.ones.data();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = t0 + t;
    const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
    const T* go = p.dout.data + b * p.dout.stride[0] + l * p.dout.stride[1] + h * p.dout.stride[2];
    if (l + kAhead < L) {
      if (zr && p.z.stride[3] == 1) prefetch_row(zr + kAhead * p.z.stride[1], P);
      if (p.dout.stride[3] == 1) prefetch_row(go + kAhead * p.dout.stride[1], P);
      if (p.dz && !kStreamRows<T, acc>) prefetch_row_w(p.dz + ((b * L + l + kAhead) * H + h) * P, P);
    }
    load_row(go, p.dout.stride[3], P, gob);
    if (zr) load_row(zr, p.z.stride[3], P, zb);
    std::fill(dzacc, dzacc + P, acc(0));
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = (t * R + r) * P;
      // A factor 1 and a discarded sum where there is no mixing weight.
      const acc* mz = p.mimo && zr ? p.mimo_z + (h * R + r) * P : ones;
      const acc* mo = p.mimo ? p.mimo_o + (h * R + r) * P : ones;
      acc* __restrict__ dmz = p.mimo && zr ? bk.dmz.data() + r * P : bk.sink_z.data();
      acc* __restrict__ dmo = p.mimo ? bk.dmo.data() + r * P : bk.sink_o.data();
      acc dDr = 0;
      if (zr) {
#pragma omp simd reduction(+ : dDr)
        for (int64_t cc = 0; cc < P; ++cc) {
          const acc yv = yc[i + cc];
          const acc gout = gob[cc];
          // silu and its derivative s (1 + z (1 - s)) from one sigmoid s
          const acc zv = zb[cc] * mz[cc];
          const acc sg = ssmk::sigmoid(zv);
          const acc sz = zv * sg;
          const acc dzv = gout * mo[cc] * yv * (sg * (acc(1) + zv * (acc(1) - sg)));
          dzacc[cc] += dzv * mz[cc];
          dmz[cc] += dzv * zb[cc];
          dmo[cc] += gout * (yv * sz);
          const acc gv = gout * mo[cc] * sz;
          dyc[i + cc] = gv;
          dxc[i + cc] = D * gv;
          dDr += gv * xc[i + cc];
        }
      } else {
#pragma omp simd reduction(+ : dDr)
        for (int64_t cc = 0; cc < P; ++cc) {
          const acc yv = yc[i + cc];
          const acc gout = gob[cc];
          dmo[cc] += gout * yv;
          const acc gv = gout * mo[cc];
          dyc[i + cc] = gv;
          dxc[i + cc] = D * gv;
          dDr += gv * xc[i + cc];
        }
      }
      dD += dDr;
    }
    if (p.dz) {
      T* dzr = p.dz + ((b * L + l) * H + h) * P;
      store_row(dzr, dzacc, P);
    }
  }
  std::fill(dyc + n * R * P, dyc + QR * P, acc(0));
  std::fill(dxc + n * R * P, dxc + QR * P, acc(0));
}

// Chunk c's per-step gradients once its dq, dk, dx and d Acs, dw, dgamma are complete: d adt,
// d dt, d lambda, dv and the v mixing, the adjoint of the rotations (with the q, k biases), dq,
// dk out, and the angle recurrence in reverse (carry: the gradient of the angle after the chunk).
template <typename T>
SSMK_CPU_INLINE void chunk_step_grads(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t c, int64_t t0,
                                      int64_t end, BwdBlock<acc_t<T>>& bk) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const int64_t Q = p.chunk, n = bk.len[c], row = (b * H + h) * L;
  const acc* dacs = bk.dacs.data() + c * Q;
  const acc* dw = bk.dw.data() + c * Q;
  const acc* dgamma = bk.dgam.data() + c * Q;
  const acc* lam = bk.lam.data() + c * Q;
  const acc* dtv = bk.dtv.data() + c * Q;
  acc* dtheta = bk.dtheta.data();
  acc* carry = bk.carry.data();
  mamba3::coefficient_grads(p, row, t0, n, end, dacs, dw, dgamma, lam, dtv);
  // v mixing, the rotations, and the angle recurrence in reverse.
  std::fill(dtheta, dtheta + Q * A, acc(0));
  const acc* qc = bk.ptr(bk.q, c, N);
  const acc* kc = bk.ptr(bk.k, c, N);
  const acc* dxc = bk.ptr(bk.dx, c, P);
  acc* dqc = bk.ptr(bk.dq, c, N);
  acc* dkc = bk.ptr(bk.dk, c, N);
  acc* dvacc = bk.dvacc.data();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = t0 + t;
    const T* vr = p.v.data + b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2];
    if (l + kAhead < L) {
      if (p.mimo && p.v.stride[3] == 1) prefetch_row(vr + kAhead * p.v.stride[1], P);
      if (!kStreamRows<T, acc>) prefetch_row_w(p.dv + ((b * L + l + kAhead) * H + h) * P, P);
      for (int64_t r = 0; r < R && !kStreamRows<acc, acc>; ++r) {
        prefetch_row_w(p.dq + (((b * L + l + kAhead) * R + r) * H + h) * N, N);
        prefetch_row_w(p.dk + (((b * L + l + kAhead) * R + r) * H + h) * N, N);
      }
    }
    std::fill(dvacc, dvacc + P, acc(0));
    const acc* cs = bk.cs.data() + (c * Q + t) * A;
    const acc* sn = bk.sn.data() + (c * Q + t) * A;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = t * R + r;
      const acc* dxi = dxc + i * P;
      if (p.mimo) {
        const acc* mv = p.mimo_v + (h * R + r) * P;
        acc* dmv = bk.dmv.data() + r * P;
        for (int64_t cc = 0; cc < P; ++cc) {
          dvacc[cc] += dxi[cc] * mv[cc];
          dmv[cc] += dxi[cc] * static_cast<acc>(vr[cc * p.v.stride[3]]);
        }
      } else {
        mamba3::axpy(dvacc, acc(1), dxi, P);
      }
      acc* dqi = dqc + i * N;
      acc* dki = dkc + i * N;
      rotate_row_bwd(dqi, qc + i * N, cs, sn, A, dtheta + t * A);
      rotate_row_bwd(dki, kc + i * N, cs, sn, A, dtheta + t * A);
      mamba3::axpy(bk.dqb.data() + r * N, acc(1), dqi, N);
      mamba3::axpy(bk.dkb.data() + r * N, acc(1), dki, N);
      store_row(p.dq + (((b * L + l) * R + r) * H + h) * N, dqi, N);
      store_row(p.dk + (((b * L + l) * R + r) * H + h) * N, dki, N);
    }
    T* dvo = p.dv + ((b * L + l) * H + h) * P;
    store_row(dvo, dvacc, P);
  }
  for (int64_t t = n - 1; t >= 0 && A > 0; --t) {
    const int64_t l = t0 + t;
    const acc* ang = p.angles + ((b * L + l) * H + h) * A;
    acc* dang = p.dangles + ((b * L + l) * H + h) * A;
    if (l >= kAhead) {
      prefetch_row(ang - kAhead * H * A, A);
      prefetch_row_w(dang - kAhead * H * A, A);
    }
    const acc dt = dtv[t];
    acc ddt = 0;
    // mamba3::angle_step and angle_step_draw with the vectorised tanh.
#pragma omp simd reduction(+ : ddt)
    for (int64_t j = 0; j < A; ++j) {
      const acc th = tanh_(ang[j]);
      carry[j] += dtheta[t * A + j];
      dang[j] = carry[j] * (acc(mamba3::kPi) * (acc(1) - th * th) * dt);
      ddt += carry[j] * (acc(mamba3::kPi) * th);
    }
    p.ddt[row + l] += ddt;
  }
}

// One backward task (docs/mamba3.md): a forward pass over the blocks keeps the state before every
// chunk and the angle before every block; then the blocks in reverse (the last one still loaded),
// each through batched products: recompute cb = q k^T, y, St_prev q; the gate; g = dy x^T; the
// state gradients of the block's chunks by a short reverse scan of dSt_prev = e^{Acs_last} dSt +
// (e^{Acs_t} dy)^T q; then dq = g_m k + e^{Acs_t} dy St_prev, dk = g_m^T q + x_e dSt,
// dx = cbm^T dy + e^{Acs_last - Acs_s} w_s k dSt^T + D dy (g_m: g masked).
template <typename T>
SSMK_CPU_INLINE void bwd_task_blocked(const Mamba3BwdParams<T>& p, int64_t task, BwdBlock<acc_t<T>>& bk) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const Mamba3Span sp = p.span(task);
  if (sp.start == sp.end) {
    mamba3::empty_bwd(p, task);
    return;
  }
  const int64_t Q = p.chunk, QR = bk.QR, nc = mamba3::task_chunks(p, sp), C = bk.chunks;
  const int64_t nblocks = (nc + C - 1) / C;
  const int64_t b = sp.b, h = sp.h, bh = task, row = (b * H + h) * L;
  acc* S = bk.S.data();
  acc* dS = bk.dS.data();
  acc* theta = bk.theta.data();
  acc* carry = bk.carry.data();
  // The states before the chunks: the forward's, or recomputed into the thread's buffer.
  const bool saved_states = p.chunk_states != nullptr;
  acc* before = saved_states ? const_cast<acc*>(p.chunk_states) + mamba3::bwd_state_slot(p, task) * P * N
                             : bk.before.template data_ptr<acc>();
  const at::Tensor before_t = saved_states ? at::from_blob(before, {nc, P, N}, bk.q.options()) : bk.before;
  mamba3::initial_state(p, bh, sp, mamba3::StateLayout{P, N}, S, theta);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t c0 = blk * C, nb = std::min(C, nc - c0);
    std::copy(theta, theta + A, bk.thetas.data() + blk * A);
    if (saved_states && blk + 1 < nblocks) {
      bk.skip_block(p, sp, c0, nb, theta);
      continue;
    }
    bk.load_block(p, sp, c0, nb, theta);
    if (saved_states) continue;
    at::Tensor st = bk.states.narrow(0, 0, nb);
    at::bmm_out(st, bk.xe.narrow(0, 0, nb).transpose(1, 2), bk.k.narrow(0, 0, nb));
    bk.scan_states(nb, S, before + c0 * P * N);
  }
  if (p.dfinal_ssm) {
    std::copy(p.dfinal_ssm + bh * P * N, p.dfinal_ssm + (bh + 1) * P * N, dS);
  } else {
    std::fill(dS, dS + P * N, acc(0));
  }
  for (int64_t j = 0; j < A; ++j) carry[j] = p.dfinal_angle ? p.dfinal_angle[bh * A + j] : acc(0);
  std::fill(p.dtrap + row + sp.start, p.dtrap + row + sp.end, acc(0));
  std::fill(p.ddt + row + sp.start, p.ddt + row + sp.end, acc(0));
  for (auto* v : {&bk.dqb, &bk.dkb, &bk.dmv, &bk.dmz, &bk.dmo}) std::fill(v->begin(), v->end(), acc(0));
  acc dD = 0;
  for (int64_t blk = nblocks - 1; blk >= 0; --blk) {
    const int64_t c0 = blk * C, nb = std::min(C, nc - c0);
    if (blk + 1 < nblocks) {
      std::copy(bk.thetas.data() + blk * A, bk.thetas.data() + (blk + 1) * A, theta);
      bk.load_block(p, sp, c0, nb, theta);
    }
    const at::Tensor q = bk.q.narrow(0, 0, nb), k = bk.k.narrow(0, 0, nb), x = bk.x.narrow(0, 0, nb);
    const at::Tensor xe = bk.xe.narrow(0, 0, nb), Sb = before_t.narrow(0, c0, nb);
    at::Tensor cb = bk.cb.narrow(0, 0, nb), cbm = bk.cbm.narrow(0, 0, nb), y = bk.y.narrow(0, 0, nb);
    at::Tensor yi = bk.yi.narrow(0, 0, nb), g = bk.g.narrow(0, 0, nb), dy = bk.dy.narrow(0, 0, nb);
    at::Tensor dx = bk.dx.narrow(0, 0, nb), dq = bk.dq.narrow(0, 0, nb), dk = bk.dk.narrow(0, 0, nb);
    at::Tensor dSb = bk.states.narrow(0, 0, nb);
    std::fill(bk.dacs.begin(), bk.dacs.end(), acc(0));
    std::fill(bk.dw.begin(), bk.dw.end(), acc(0));
    std::fill(bk.dgam.begin(), bk.dgam.end(), acc(0));
    at::bmm_out(cb, q, k.transpose(1, 2));
    bk.mask(nb, cb, cbm, bk.drow.data());
    // The gate: y before it is the forward's, or recomputed (intra + e^{Acs_t} St_prev q + D x).
    if (!p.gate_input) {
      at::bmm_out(y, cbm, x);
      at::bmm_out(yi, q, Sb.transpose(1, 2));
      const acc D = p.D ? p.D[h] : acc(0);
      for (int64_t c = 0; c < nb; ++c) {
        acc* __restrict__ yc = bk.ptr(bk.y, c, P);
        const acc* __restrict__ yic = bk.ptr(bk.yi, c, P);
        const acc* __restrict__ xc = bk.ptr(bk.x, c, P);
        for (int64_t i = 0; i < QR; ++i) {
          const acc ri = bk.ri[c * Q + i / R];
#pragma omp simd
          for (int64_t cc = 0; cc < P; ++cc) yc[i * P + cc] += ri * yic[i * P + cc] + D * xc[i * P + cc];
        }
      }
    }
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t t0 = sp.start + (c0 + c) * Q;
      const acc* yv = p.gate_input ? p.gate_input + (row + t0) * R * P : bk.ptr(bk.y, c, P);
      gate_bwd(p, b, h, c, t0, yv, bk, dD);
    }
    if (blk == nblocks - 1) {
      const int64_t c = nb - 1, i0 = (bk.len[c] - 1) * R;
      for (int64_t r = 0; r < R; ++r) {
        if (p.dfinal_v) mamba3::axpy(bk.ptr(bk.dx, c, P) + (i0 + r) * P, acc(1), p.dfinal_v + (bh * R + r) * P, P);
      }
    }
    at::bmm_out(g, dy, x.transpose(1, 2));
    // y <- e^{Acs_t} dy; dSb <- (e^{Acs_t} dy)^T q, then the reverse scan turns dSb[c] into the
    // gradient of the state after chunk c and dS into that of the state before the block.
    for (int64_t c = 0; c < nb; ++c) {
      const acc* dyc = bk.ptr(bk.dy, c, P);
      acc* yr = bk.ptr(bk.y, c, P);
      for (int64_t i = 0; i < QR; ++i) {
        const acc ri = bk.ri[c * Q + i / R];
#pragma omp simd
        for (int64_t cc = 0; cc < P; ++cc) yr[i * P + cc] = ri * dyc[i * P + cc];
      }
    }
    at::bmm_out(dSb, y.transpose(1, 2), q);
    for (int64_t c = nb - 1; c >= 0; --c) {
      acc* u = bk.state(c);
      const acc* Sc = before + (c0 + c) * P * N;
      const acc kd = mamba3::exp_(bk.acs[c * Q + Q - 1]);
      bk.dacs[c * Q + bk.len[c] - 1] += kd * mamba3::dot(dS, Sc, P * N);
#pragma omp simd
      for (int64_t j = 0; j < P * N; ++j) {
        const acc local = u[j];
        u[j] = dS[j];
        dS[j] = kd * dS[j] + local;
      }
    }
    // dq's inter-chunk part e^{Acs_t} dy St_prev first: its rows dotted with q are that term's
    // d Acs_t = e^{Acs_t} dy . (St_prev q).
    at::bmm_out(dq, y, Sb);
    for (int64_t c = 0; c < nb; ++c) {
      const acc* dqc = bk.ptr(bk.dq, c, N);
      const acc* qc = bk.ptr(bk.q, c, N);
      for (int64_t i = 0; i < bk.len[c] * R; ++i) bk.dacs[c * Q + i / R] += mamba3::dot(dqc + i * N, qc + i * N, N);
    }
    bk.grad_mask(nb);
    dq.baddbmm_(g, k);
    at::bmm_out(dk, g.transpose(1, 2), q);
    dk.baddbmm_(xe, dSb);
    dx.baddbmm_(cbm.transpose(1, 2), dy);
    // The state update: yi <- k dSt^T, then dx, dw and d Acs from it.
    at::bmm_out(yi, k, dSb.transpose(1, 2));
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t n = bk.len[c];
      const acc* xc = bk.ptr(bk.x, c, P);
      const acc* kds = bk.ptr(bk.yi, c, P);
      acc* dxc = bk.ptr(bk.dx, c, P);
      acc* dacs = bk.dacs.data() + c * Q;
      for (int64_t j = 0; j < n * R; ++j) {
        const int64_t tj = j / R;
        const acc ew = bk.ew[c * Q + tj];
        const acc E = mamba3::dot(xc + j * P, kds + j * P, P);
        mamba3::axpy(dxc + j * P, ew, kds + j * P, P);
        bk.dw[c * Q + tj] += bk.to_end[c * Q + tj] * E;
        dacs[n - 1] += ew * E;
        dacs[tj] -= ew * E;
      }
    }
    if (blk == nblocks - 1 && p.dfinal_k) {
      const int64_t c = nb - 1, i0 = (bk.len[c] - 1) * R;
      for (int64_t r = 0; r < R; ++r) {
        mamba3::axpy(bk.ptr(bk.dk, c, N) + (i0 + r) * N, acc(1), p.dfinal_k + (bh * R + r) * N, N);
      }
    }
    for (int64_t c = nb - 1; c >= 0; --c) chunk_step_grads(p, b, h, c, sp.start + (c0 + c) * Q, sp.end, bk);
  }
  mamba3::initial_state_grads(p, bh, row + sp.start, dS, N);
  std::copy(carry, carry + A, p.dinit_angle + bh * A);
  mamba3::trap_grads(p, row, sp);
  std::copy(bk.dqb.begin(), bk.dqb.end(), p.dq_bias + bh * R * N);
  std::copy(bk.dkb.begin(), bk.dkb.end(), p.dk_bias + bh * R * N);
  p.dD[bh] = dD;
  if (p.mimo) {
    std::copy(bk.dmv.begin(), bk.dmv.end(), p.dmimo_v + bh * R * P);
    std::copy(bk.dmo.begin(), bk.dmo.end(), p.dmimo_o + bh * R * P);
    if (p.dmimo_z) std::copy(bk.dmz.begin(), bk.dmz.end(), p.dmimo_z + bh * R * P);
  }
  fence_rows();
}

template <typename T>
SSMK_CPU_INLINE void bwd_tasks(const Mamba3BwdParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  BwdBlock<acc> bk(p, c10::CppTypeToScalarType<acc>::value, p.chunk_states != nullptr);
  for (int64_t task = begin; task < end; ++task) bwd_task_blocked(p, task, bk);
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename T), (T), (const Mamba3BwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

// When on, the scan runs the GPU's stages instead (mamba3_cpu_tasks.cpp), and the
// decode step its phases with the GPU's split emulated (SerialLanes::kEmulated lanes).
std::atomic<bool> g_task_kernels{false};

template <typename T>
SSMK_CPU_INLINE void step_tasks(const Mamba3StepParams<T>& p, int64_t begin, int64_t end, int64_t lanes) {
  std::vector<acc_t<T>> scratch(mamba3::step_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::step_task(p, task, scratch.data(), mamba3::SerialLanes{lanes});
}
SSMK_CPU_MULTIVERSION(step_tasks, (typename T), (T),
                      (const Mamba3StepParams<T>& p, int64_t begin, int64_t end, int64_t lanes), (p, begin, end, lanes))

}  // namespace

bool mamba3_cpu_task_kernels(bool on) { return g_task_kernels.exchange(on); }

template <typename T>
void mamba3_fwd_cpu(const Mamba3FwdParams<T>& p) {
  if (g_task_kernels) return mamba3_fwd_task_kernels_cpu(p);
  cpu::parallel_items(p.tasks(), p.seqlen * p.headdim_v * p.headdim_qk,
                      [&](int64_t b, int64_t e) { fwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_bwd_cpu(const Mamba3BwdParams<T>& p) {
  if (g_task_kernels) return mamba3_bwd_task_kernels_cpu(p);
  cpu::parallel_items(p.tasks(), p.seqlen * p.headdim_v * p.headdim_qk,
                      [&](int64_t b, int64_t e) { bwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_step_cpu(const Mamba3StepParams<T>& p) {
  const int64_t lanes = g_task_kernels ? mamba3::SerialLanes::kEmulated : 1;
  cpu::parallel_items(p.batch * p.nheads, p.rank * p.headdim_v * p.headdim_qk,
                      [&](int64_t b, int64_t e) { step_tasks_dispatch<T>(p, b, e, lanes); });
}

// The scan for float and double (mamba3_op.cpp widens half and bfloat16 to float), the step for
// every float type.
#define SSMK_MAMBA3_SCAN_INSTANTIATE(T)                        \
  template void mamba3_fwd_cpu<T>(const Mamba3FwdParams<T>&);  \
  template void mamba3_bwd_cpu<T>(const Mamba3BwdParams<T>&);
SSMK_MAMBA3_SCAN_INSTANTIATE(float)
SSMK_MAMBA3_SCAN_INSTANTIATE(double)
#define SSMK_MAMBA3_STEP_INSTANTIATE(T) template void mamba3_step_cpu<T>(const Mamba3StepParams<T>&);
SSMK_FLOAT_TYPES(SSMK_MAMBA3_STEP_INSTANTIATE)

}  // namespace ssmk
