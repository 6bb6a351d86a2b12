// The kernels of mamba3_scan and mamba3_step in stages shared verbatim by the CPU (mamba3_cpu.cpp:
// the decode step; mamba3_cpu_tasks.cpp: the scan under a test hook) and CUDA (mamba3_cuda.cu:
// each stage one kernel, a chunk or a task per thread block, its phases split across the block's
// threads; SerialLanes / BlockLanes). A task is one (batch, value head), or with cu_seqlens one
// (sequence, value head) (Mamba3Dims::span): its tokens in chunks of p.chunk steps from its first
// token (mamba3_math.h). The scan is chunk-parallel (ChunkBuffers, below): every chunk computes its
// own part of the state, a scan across the chunks per state element gives the state before each,
// and every chunk then computes its outputs: the masked (Q R) x (Q R) product of rotated queries
// and keys, its product with the mixed values and the inter-chunk term from the state before it;
// the backward likewise, with the state's gradient scanned in reverse. The matrix products run as
// whole tiles (common/tile_product.h: tensor cores on the GPU, element by element on the CPU).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/math.h"
#include "common/tile_product.h"
#include "mamba3/mamba3.h"

namespace ssmk::mamba3 {

// ssmk::fast_exp: vectorisable on the CPU (relative error < 3e-7 in float), expf on the GPU.
template <typename acc>
SSMK_MATH_INLINE acc exp_(acc v) {
  return ssmk::fast_exp(v);
}
template <typename acc>
SSMK_MATH_INLINE acc cos_(acc v) {
  using std::cos;
  return cos(v);
}
template <typename acc>
SSMK_MATH_INLINE acc sin_(acc v) {
  using std::sin;
  return sin(v);
}
template <typename acc>
SSMK_MATH_INLINE void fill_range(acc* first, acc* last, acc v) {
  for (; first != last; ++first) *first = v;
}
template <typename acc>
SSMK_MATH_INLINE void fill_n(acc* first, int64_t n, acc v) {
  for (int64_t i = 0; i < n; ++i) first[i] = v;
}
template <typename acc>
SSMK_MATH_INLINE void copy_n(const acc* first, int64_t n, acc* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = first[i];
}
// n elements of `first`, or zeros where it is absent (nullptr).
template <typename acc>
SSMK_MATH_INLINE void copy_or_zero(const acc* first, int64_t n, acc* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = first ? first[i] : acc(0);
}

template <typename acc>
SSMK_MATH_INLINE acc dot(const acc* a, const acc* b, int64_t n) {
  acc s = 0;
#if !defined(__CUDACC__)
#pragma omp simd reduction(+ : s)
#endif
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc>
SSMK_MATH_INLINE void axpy(acc* y, acc a, const acc* x, int64_t n) {
#if !defined(__CUDACC__)
#pragma omp simd
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// How a task's phases run: run(phase) calls phase(lane, lanes) for each of a task's `lanes`
// threads, every lane taking every lanes-th item of the phase, and returns when all are done;
// run.products(...) computes tile_product.h's products (independent of each other) and returns
// when all are done. SerialLanes is the CPU's: the lanes one after the other in one thread (one
// lane in the kernels; the tests' hook emulates several and so checks the GPU's split of every
// phase), the products element by element. The GPU's, BlockLanes (mamba3_cuda.cu), runs them on
// a block's threads, the products on its warps' tensor cores, and waits at a barrier.
struct SerialLanes {
  int64_t lanes = 1;
  // The tests' hook's lane count: not a divisor of the test sizes, so the lanes get unequal shares.
  static constexpr int64_t kEmulated = 3;
  template <typename Phase>
  SSMK_MATH_INLINE void operator()(Phase&& phase) const {
    for (int64_t lane = 0; lane < lanes; ++lane) phase(lane, lanes);
  }
  template <typename... Products>
  SSMK_MATH_INLINE void products(const Products&... prs) const {
    for (int64_t lane = 0; lane < lanes; ++lane) (tile_product_elements(prs, lane, lanes), ...);
  }
};

// The layout of a state S [P, N] in a buffer of rows x ld elements (rows >= P, ld >= N), the
// padding zero.
struct StateLayout {
  int64_t rows, ld;
  SSMK_HOST_DEVICE int64_t size() const { return rows * ld; }
};
// The stages' states are padded to whole tiles (operands of the chunk's products).
SSMK_HOST_DEVICE StateLayout tile_state(const Mamba3Dims& d) {
  return StateLayout{tile_padded(d.headdim_v), tile_padded(d.headdim_qk)};
}

// rows x cols elements from src (leading dimension lds) to dst (ldd), per element: thread `lane`
// of `lanes` takes every lanes-th (SerialLanes).
template <typename acc>
SSMK_MATH_INLINE void copy_rows(const acc* src, int64_t lds, int64_t rows, int64_t cols, acc* dst, int64_t ldd,
                                int64_t lane, int64_t lanes) {
  for (int64_t it = lane; it < rows * cols; it += lanes) dst[(it / cols) * ldd + it % cols] = src[(it / cols) * lds + it % cols];
}

// One task's chunk buffers, carved from a scratch area of Work::size(d, grads) elements. The
// matrices are operands or results of the chunk's products (tile_product.h): M = Q R rows
// (i = t R + r) padded to whole tiles, leading dimensions ldN, ldP (N, P padded), the padding
// zero wherever a product reads it. Every buffer starts on a tile boundary (32-byte aligned in a
// 32-byte aligned area, as the tensor cores' loads need).
template <typename acc>
struct Work {
  int64_t Q, R, N, P, A, M, ldN, ldP;
  acc *q, *k, *x;            // [M, ldN], [M, ldN], [M, ldP]: biased rotated q, k; mixed v
  acc *cs, *sn;              // [Q, A] cos, sin of the angle at each step
  acc *lam, *dtv, *gam, *w, *acs, *ra, *ew;  // [Q]; ra: e^{Acs_t}; ew: e^{Acs_last - Acs_s} w_s
  acc *cb, *m, *g;           // [M, M] q_i . k_j, the mask e^{Acs_t - Acs_s} c_ts, their product
  acc *qs, *y, *xw;          // [M, ldP] q_i . S_c (S the state before the chunk), y, ew x
  // The backward's (grads): [M, ldP] / [M, ldN] / [M, M]
  acc *dy, *dx, *dys, *kds;  // dy, dx, e^{Acs_t} dy, k_j . dS_c
  acc *dq, *dk;
  acc *dxy, *dm;             // dy_i . x_j and its product with the mask
  static SSMK_HOST_DEVICE int64_t size(const Mamba3Dims& d, bool grads) {
    const int64_t M = tile_padded(d.chunk * d.rank), ldN = tile_padded(d.headdim_qk), ldP = tile_padded(d.headdim_v);
    const int64_t fwd = M * (2 * ldN + 4 * ldP) + 2 * tile_padded(d.chunk * d.nangles) + 7 * tile_padded(d.chunk) +
                        3 * M * M;
    return grads ? fwd + M * (4 * ldP + 2 * ldN + 2 * M) : fwd;
  }
  SSMK_HOST_DEVICE Work(const Mamba3Dims& d, acc* s, bool grads)
      : Q(d.chunk), R(d.rank), N(d.headdim_qk), P(d.headdim_v), A(d.nangles), M(tile_padded(Q * R)),
        ldN(tile_padded(N)), ldP(tile_padded(P)) {
    // Buffers of n elements each, one after the other from s.
    const auto carve = [&s](int64_t n, auto*&... bufs) { ((bufs = s, s += tile_padded(n)), ...); };
    carve(M * ldN, q, k);
    carve(M * ldP, x);
    carve(Q * A, cs, sn);
    carve(Q, lam, dtv, gam, w, acs, ra, ew);
    carve(M * M, cb, m, g);
    carve(M * ldP, qs, y, xw);
    dy = dx = dys = kds = dq = dk = dxy = dm = nullptr;
    if (!grads) return;
    carve(M * ldP, dy, dx, dys, kds);
    carve(M * ldN, dq, dk);
    carve(M * M, dxy, dm);
  }
};

// Per-step coefficients of steps t0 .. t0+n-1 of a task whose tokens end at `end` (no trapezoid
// term reaches past it): dt, lambda, gamma, w, Acs (the cumulative sum of adt within the chunk),
// and the angle with its cos and sin, from theta_in [A] (the angle before the chunk) to theta
// [A] (after it; may be theta_in). Sums along the steps: one thread.
template <typename T>
SSMK_MATH_INLINE void chunk_coefficients(const Mamba3Inputs<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                        int64_t end, const acc_t<T>* theta_in, acc_t<T>* theta, Work<acc_t<T>>& wk) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, A = p.nangles;
  const int64_t row = (b * H + h) * L;
  if (theta != theta_in) copy_n(theta_in, A, theta);
  acc cum = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = t0 + t;
    const acc dt = p.dt[row + l];
    const acc lam = ssmk::sigmoid(p.trap[row + l]);
    wk.dtv[t] = dt;
    wk.lam[t] = lam;
    wk.gam[t] = lam * dt;
    const acc sigma = l + 1 < end ? (acc(1) - ssmk::sigmoid(p.trap[row + l + 1])) * p.dt[row + l + 1] : acc(0);
    wk.w[t] = wk.gam[t] + sigma;
    cum += p.adt[row + l];
    wk.acs[t] = cum;
    const acc* ang = p.angles + ((b * L + l) * H + h) * A;
    for (int64_t j = 0; j < A; ++j) {
      theta[j] = wrap_angle(theta[j] + angle_step(ang[j], dt));
      wk.cs[t * A + j] = cos_(theta[j]);
      wk.sn[t * A + j] = sin_(theta[j]);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    wk.ra[t] = exp_(wk.acs[t]);
    wk.ew[t] = exp_(cum - wk.acs[t]) * wk.w[t];
  }
}

// The biased, rotated q and k rows and the mixed v rows of steps t0 .. t0+n-1 (rows i = t R + r,
// after chunk_coefficients) into wk's q, k, x (Work, or the decode step's StepTask with its L = 1
// views), zeros in their padding (rows n R .. M - 1, columns N .. ldN - 1 and P .. ldP - 1), one
// element per item: thread `lane` of `lanes` takes every lanes-th (SerialLanes, BlockLanes).
template <template <typename> class Params, typename T, typename Rows>
SSMK_MATH_INLINE void chunk_rows(const Params<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n, const Rows& wk,
                                int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const int64_t g = h / (H / p.ngroups), rows = n * R, ldN = wk.ldN, ldP = wk.ldP, qk = wk.M * ldN;
  for (int64_t it = lane; it < 2 * qk; it += lanes) {
    const bool is_k = it >= qk;
    const int64_t i = (it % qk) / ldN, c = it % ldN, t = i / R, r = i % R;
    acc value = 0;
    if (i < rows && c < N) {
      const View<const T, 5>& src = is_k ? p.k : p.q;
      const T* row = src.data + b * src.stride[0] + (t0 + t) * src.stride[1] + r * src.stride[2] + g * src.stride[3];
      const acc* bias = is_k ? p.k_bias : p.q_bias;
      const acc* brow = bias ? bias + (h * R + r) * N : nullptr;
      const auto biased = [&](int64_t e) { return static_cast<acc>(row[e * src.stride[4]]) + (brow ? brow[e] : acc(0)); };
      value = rotated_element(biased, c, wk.cs + t * A, wk.sn + t * A, A);
    }
    (is_k ? wk.k : wk.q)[i * ldN + c] = value;
  }
  for (int64_t it = lane; it < wk.M * ldP; it += lanes) {
    const int64_t i = it / ldP, c = it % ldP, t = i / R, r = i % R;
    acc value = 0;
    if (i < rows && c < P) {
      const T* vr = p.v.data + b * p.v.stride[0] + (t0 + t) * p.v.stride[1] + h * p.v.stride[2];
      const acc v = static_cast<acc>(vr[c * p.v.stride[3]]);
      value = p.mimo ? v * p.mimo_v[(h * R + r) * P + c] : v;
    }
    wk.x[it] = value;
  }
}

// dst[i, c] = scale[t] src[i, c] (t = i / R) on the chunk's rows and the P channels, zero in the
// padding of the [M, ldP] buffers, per item.
template <typename acc>
SSMK_MATH_INLINE void scaled_rows(const Work<acc>& wk, int64_t n, const acc* scale, const acc* src, acc* dst,
                                  int64_t lane, int64_t lanes) {
  for (int64_t it = lane; it < wk.M * wk.ldP; it += lanes) {
    const int64_t i = it / wk.ldP, c = it % wk.ldP;
    dst[it] = i < n * wk.R && c < wk.P ? scale[i / wk.R] * src[it] : acc(0);
  }
}

// The mask m[i, j] = e^{Acs_t - Acs_s} c_ts for the rows of steps s <= t (zero elsewhere and in the
// padding), g = cb m, and y = e^{Acs_t} qs + D x (before the intra-chunk term), per item.
template <typename acc>
SSMK_MATH_INLINE void chunk_masks(Work<acc>& wk, int64_t n, acc D, int64_t lane, int64_t lanes) {
  const int64_t R = wk.R, P = wk.P, M = wk.M, ldP = wk.ldP, rows = n * R;
  for (int64_t it = lane; it < M * M; it += lanes) {
    const int64_t i = it / M, j = it % M, ti = i / R, tj = j / R;
    const bool in = i < rows && j < rows && tj <= ti;
    const acc mv = !in ? acc(0) : tj < ti ? exp_(wk.acs[ti] - wk.acs[tj]) * wk.w[tj] : wk.gam[ti];
    wk.m[it] = mv;
    wk.g[it] = in ? wk.cb[it] * mv : acc(0);  // cb above the steps' diagonal is not computed
  }
  for (int64_t it = lane; it < M * ldP; it += lanes) {
    const int64_t i = it / ldP, c = it % ldP;
    wk.y[it] = i < rows && c < P ? wk.ra[i / R] * wk.qs[it] + D * wk.x[it] : acc(0);
  }
}

// A chunk's forward up to y before the gate, from the state S (tile_state layout) and the angle
// theta_in before it (theta: the angle after it, may be theta_in): the coefficients (one lane),
// the rows, the products cb = Q K^T and qs = Q S^T, the masks, and y += g X.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void chunk_forward(const Mamba3Inputs<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                   int64_t end, const acc_t<T>* theta_in, acc_t<T>* theta, const acc_t<T>* S,
                                   acc_t<T> D, Work<acc_t<T>>& wk, const Lanes& run) {
  const int64_t R = wk.R, M = wk.M, ldN = wk.ldN, ldP = wk.ldP;
  run([&](int64_t lane, int64_t) {
    if (lane == 0) chunk_coefficients(p, b, h, t0, n, end, theta_in, theta, wk);
  });
  run([&](int64_t lane, int64_t lanes) { chunk_rows(p, b, h, t0, n, wk, lane, lanes); });
  run.products(tile_product(wk.cb, M, M, M, false, tile_term<false, true>(wk.q, ldN, wk.k, ldN, ldN),
                            StepMask::kLowerOut, R),
               tile_product(wk.qs, ldP, M, ldP, false, tile_term<false, true>(wk.q, ldN, S, ldN, ldN)));
  run([&](int64_t lane, int64_t lanes) { chunk_masks(wk, n, D, lane, lanes); });
  run.products(tile_product(wk.y, ldP, M, ldP, true, tile_term(wk.g, M, wk.x, ldP, M, StepMask::kLowerA, R)));
}

// H_out = e^{Acs_last} H_in + sum_j e^{Acs_last - Acs_s} w_s x_j k_j^T (H_out may be H_in; both in
// the tile_state layout; no H_in: zero, the chunk's own part): xw = ew x and the scaled state per
// item, then the product.
template <typename acc, typename Lanes>
SSMK_MATH_INLINE void chunk_state(Work<acc>& wk, int64_t n, const acc* H_in, acc* H_out, const Lanes& run) {
  const int64_t M = wk.M, ldN = wk.ldN, ldP = wk.ldP;
  const acc kd = wk.ra[n - 1];
  run([&](int64_t lane, int64_t lanes) {
    scaled_rows(wk, n, wk.ew, wk.x, wk.xw, lane, lanes);
    for (int64_t it = lane; it < ldP * ldN; it += lanes) H_out[it] = H_in ? kd * H_in[it] : acc(0);
  });
  run.products(tile_product(H_out, ldN, ldP, ldN, true, tile_term<true, false>(wk.xw, ldP, wk.k, ldN, M)));
}

// A chunk's (steps t0 .. t0+n-1 of row `row`, of a task ending at `end`) gradients of the
// per-step coefficients, given d Acs, d w and d gamma: d adt is the reverse cumulative sum of
// d Acs within the chunk, and dt and lambda get theirs through w = gamma + sigma, gamma_t =
// lambda_t dt_t, sigma_t = (1 - lambda_{t+1}) dt_{t+1}. d lambda is summed in p.dtrap (trap_grads
// turns it into d trap). Shared by the chunk-parallel and the blocked CPU backward. With `spill`,
// the parts of d dt and d lambda of the step after the chunk (in the next chunk, which another
// thread block may be writing) go to spill[0], spill[1] instead (zeros at the task's end).
template <typename T>
SSMK_MATH_INLINE void coefficient_grads(const Mamba3BwdParams<T>& p, int64_t row, int64_t t0, int64_t n, int64_t end,
                                        const acc_t<T>* dacs, const acc_t<T>* dw, const acc_t<T>* dgamma,
                                        const acc_t<T>* lam, const acc_t<T>* dtv, acc_t<T>* spill = nullptr) {
  using acc = acc_t<T>;
  acc* dlam = p.dtrap + row;
  acc run = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    run += dacs[t];
    p.dadt[row + t0 + t] = run;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = t0 + t;
    const acc dg = dgamma[t] + dw[t];
    p.ddt[row + l] += lam[t] * dg;
    dlam[l] += dtv[t] * dg;
    const bool spilled = spill && t == n - 1;
    if (spilled) spill[0] = spill[1] = acc(0);
    if (l + 1 < end) {
      const acc lam1 = ssmk::sigmoid(p.trap[row + l + 1]);
      const acc ddt1 = (acc(1) - lam1) * dw[t], dlam1 = -p.dt[row + l + 1] * dw[t];
      if (spilled) {
        spill[0] = ddt1;
        spill[1] = dlam1;
      } else {
        p.ddt[row + l + 1] += ddt1;
        dlam[l + 1] += dlam1;
      }
    }
  }
}

// The gradients of task bh's initial state (S_init + rho sum_r v_init_r k_init_r^T, rho =
// (1 - lambda_0) dt_0, step 0 at flat index `row` of the [B, H, L] coefficients) from dS (the
// gradient of the state before step 0, rows of ld elements), and those of dt_0 and lambda_0
// (summed in p.dtrap) through rho. Shared by both backward kernels (the angle's is the carry of
// the angle recurrence, which each writes itself).
template <typename T>
SSMK_MATH_INLINE void initial_state_grads(const Mamba3BwdParams<T>& p, int64_t bh, int64_t row,
                                          const acc_t<T>* dS, int64_t ld) {
  using acc = acc_t<T>;
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v;
  copy_rows(dS, ld, P, N, p.dinit_ssm + bh * P * N, N, 0, 1);
  const acc lam0 = ssmk::sigmoid(p.trap[row]), dt0 = p.dt[row];
  const acc rho = (acc(1) - lam0) * dt0;
  acc drho = 0;
  for (int64_t r = 0; r < R; ++r) {
    const acc* kr = p.init_k ? p.init_k + (bh * R + r) * N : nullptr;
    const acc* vr = p.init_v ? p.init_v + (bh * R + r) * P : nullptr;
    acc* dkr = p.dinit_k + (bh * R + r) * N;
    acc* dvr = p.dinit_v + (bh * R + r) * P;
    fill_range(dkr, dkr + N, acc(0));
    for (int64_t cc = 0; cc < P; ++cc) {
      const acc dsk = kr ? dot(dS + cc * ld, kr, N) : acc(0);
      dvr[cc] = rho * dsk;
      if (vr) {
        drho += vr[cc] * dsk;
        axpy(dkr, rho * vr[cc], dS + cc * ld, N);
      }
    }
  }
  p.ddt[row] += (acc(1) - lam0) * drho;
  p.dtrap[row] -= dt0 * drho;
}

// d trap = d lambda sigmoid'(trap) of token l (flat index row + l), from the d lambda summed in
// p.dtrap; trap_grads: over the task's tokens.
template <typename T>
SSMK_MATH_INLINE void trap_grad(const Mamba3BwdParams<T>& p, int64_t row, int64_t l) {
  using acc = acc_t<T>;
  const acc lam = ssmk::sigmoid(p.trap[row + l]);
  p.dtrap[row + l] *= lam * (acc(1) - lam);
}
template <typename T>
SSMK_MATH_INLINE void trap_grads(const Mamba3BwdParams<T>& p, int64_t row, const Mamba3Span& sp) {
  for (int64_t l = sp.start; l < sp.end; ++l) trap_grad(p, row, l);
}

// A task without tokens (an empty sequence): its final states are its initial states (zeros
// where none are given), their gradients pass straight through, and its parts of the parameter
// gradients are zero.
template <typename T>
SSMK_MATH_INLINE void empty_fwd(const Mamba3FwdParams<T>& p, int64_t task) {
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  copy_or_zero(p.init_angle ? p.init_angle + task * A : nullptr, A, p.final_angle + task * A);
  copy_or_zero(p.init_ssm ? p.init_ssm + task * P * N : nullptr, P * N, p.final_ssm + task * P * N);
  copy_or_zero(p.init_k ? p.init_k + task * R * N : nullptr, R * N, p.final_k + task * R * N);
  copy_or_zero(p.init_v ? p.init_v + task * R * P : nullptr, R * P, p.final_v + task * R * P);
}

template <typename T>
SSMK_MATH_INLINE void empty_bwd(const Mamba3BwdParams<T>& p, int64_t task) {
  using acc = acc_t<T>;
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  copy_or_zero(p.dfinal_angle ? p.dfinal_angle + task * A : nullptr, A, p.dinit_angle + task * A);
  copy_or_zero(p.dfinal_ssm ? p.dfinal_ssm + task * P * N : nullptr, P * N, p.dinit_ssm + task * P * N);
  copy_or_zero(p.dfinal_k ? p.dfinal_k + task * R * N : nullptr, R * N, p.dinit_k + task * R * N);
  copy_or_zero(p.dfinal_v ? p.dfinal_v + task * R * P : nullptr, R * P, p.dinit_v + task * R * P);
  fill_n(p.dq_bias + task * R * N, R * N, acc(0));
  fill_n(p.dk_bias + task * R * N, R * N, acc(0));
  p.dD[task] = acc(0);
  if (p.mimo) {
    fill_n(p.dmimo_v + task * R * P, R * P, acc(0));
    fill_n(p.dmimo_o + task * R * P, R * P, acc(0));
    if (p.dmimo_z) fill_n(p.dmimo_z + task * R * P, R * P, acc(0));
  }
}

// The weight rho = (1 - lambda_0) dt_0 of a task's initial (k, v) pair at its first step (0
// without a pair), and element (c, e) of the state before that step, S_init + rho sum_r v_init_r
// k_init_r^T (zero outside P x N: padding); bh: the task (its state row).
template <typename T>
SSMK_MATH_INLINE acc_t<T> initial_pair_weight(const Mamba3Inputs<T>& p, const Mamba3Span& sp) {
  using acc = acc_t<T>;
  const int64_t first = (sp.b * p.nheads + sp.h) * p.seqlen + sp.start;
  return p.init_k && p.init_v ? (acc(1) - ssmk::sigmoid(p.trap[first])) * p.dt[first] : acc(0);
}
template <typename T>
SSMK_MATH_INLINE acc_t<T> initial_state_element(const Mamba3Inputs<T>& p, int64_t bh, acc_t<T> rho, int64_t c,
                                                int64_t e) {
  using acc = acc_t<T>;
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v;
  if (c >= P || e >= N) return acc(0);
  acc s = p.init_ssm ? p.init_ssm[(bh * P + c) * N + e] : acc(0);
  for (int64_t r = 0; p.init_k && p.init_v && r < R; ++r) {
    s += rho * p.init_v[(bh * R + r) * P + c] * p.init_k[(bh * R + r) * N + e];
  }
  return s;
}

// The state before a task's first step (sp.start < sp.end) in layout `st`, and the angle.
template <typename T>
SSMK_MATH_INLINE void initial_state(const Mamba3Inputs<T>& p, int64_t bh, const Mamba3Span& sp, StateLayout st,
                                   acc_t<T>* H, acc_t<T>* theta) {
  const acc_t<T> rho = initial_pair_weight(p, sp);
  for (int64_t it = 0; it < st.size(); ++it) H[it] = initial_state_element(p, bh, rho, it / st.ld, it % st.ld);
  copy_or_zero(p.init_angle ? p.init_angle + bh * p.nangles : nullptr, p.nangles, theta);
}

// The backward keeps the state (P N elements) before every chunk of a task (the CPU forward saves
// them for it: Mamba3FwdParams::chunk_states), in a buffer of bwd_state_slots(d) slots; a task's
// first slot is bwd_state_slot(d, task). Without cu_seqlens: nchunks() slots per task. With them:
// floor(L / Q) + num_seqs slots per head, sequence s's ceil(len_s / Q) chunks from slot
// floor(start_s / Q) + s. They end at most at floor(end_s / Q) + s + 1, the next sequence's first
// slot, so the buffer is that of one row of length L plus a slot per sequence (not num_seqs rows
// of length L).
SSMK_HOST_DEVICE int64_t bwd_state_slots(const Mamba3Dims& d) {
  return d.cu_seqlens ? d.nheads * (d.seqlen / d.chunk + d.num_seqs) : d.tasks() * d.nchunks();
}
SSMK_HOST_DEVICE int64_t bwd_state_slot(const Mamba3Dims& d, int64_t task) {
  if (!d.cu_seqlens) return task * d.nchunks();
  const Mamba3Span sp = d.span(task);
  return sp.h * (d.seqlen / d.chunk + d.num_seqs) + sp.start / d.chunk + task / d.nheads;
}

// out = sum_r (y_r silu(z mixed by mimo_z)) mixed by mimo_o for steps t0 .. t0+n-1, per (step,
// channel) item (lane, lanes as for chunk_rows).
template <typename T>
SSMK_MATH_INLINE void chunk_gate_outputs(const Mamba3FwdParams<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                        const Work<acc_t<T>>& wk, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, P = p.headdim_v;
  for (int64_t it = lane; it < n * P; it += lanes) {
    const int64_t t = it / P, c = it % P, l = t0 + t;
    const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
    acc o = 0;
    for (int64_t r = 0; r < R; ++r) {
      acc yv = wk.y[(t * R + r) * wk.ldP + c];
      if (zr) {
        acc zv = static_cast<acc>(zr[c * p.z.stride[3]]);
        if (p.mimo) zv *= p.mimo_z[(h * R + r) * P + c];
        yv *= ssmk::silu(zv);
      }
      o += p.mimo ? yv * p.mimo_o[(h * R + r) * P + c] : yv;
    }
    p.out[((b * L + l) * H + h) * P + c] = static_cast<T>(o);
  }
}

// The gate of row (step l, rank r) and channel cc: gout, the output's gradient; g0, that of the
// gated y (gout mixed by mimo_o); zraw, the gate's input and zv, it mixed by mimo_z; sz = silu(zv)
// (1 without z); and dy = g0 sz, the gradient of y before the gate.
template <typename acc>
struct GateAt {
  acc gout, g0, zraw, zv, sz, dy;
};
template <typename T>
SSMK_MATH_INLINE GateAt<acc_t<T>> gate_at(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t l, int64_t r,
                                          int64_t cc) {
  using acc = acc_t<T>;
  const int64_t R = p.rank, P = p.headdim_v;
  const T* go = p.dout.data + b * p.dout.stride[0] + l * p.dout.stride[1] + h * p.dout.stride[2];
  const acc gout = static_cast<acc>(go[cc * p.dout.stride[3]]);
  GateAt<acc> gt{gout, p.mimo ? gout * p.mimo_o[(h * R + r) * P + cc] : gout, acc(0), acc(0), acc(1), acc(0)};
  gt.dy = gt.g0;
  if (p.z.data) {
    const T* zr = p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2];
    gt.zraw = static_cast<acc>(zr[cc * p.z.stride[3]]);
    gt.zv = p.mimo ? gt.zraw * p.mimo_z[(h * R + r) * P + cc] : gt.zraw;
    gt.sz = ssmk::silu(gt.zv);
    gt.dy = gt.g0 * gt.sz;
  }
  return gt;
}

// e^{Acs_t} dy of steps t0 .. t0+n-1 alone (what local_dstate needs) into wk.dys, per (row,
// channel) item, zeros in its padding.
template <typename T>
SSMK_MATH_INLINE void chunk_scaled_dy(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                      Work<acc_t<T>>& wk, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t R = wk.R, P = wk.P, ldP = wk.ldP;
  for (int64_t it = lane; it < wk.M * ldP; it += lanes) {
    const int64_t i = it / ldP, cc = it % ldP;
    wk.dys[it] = i < n * R && cc < P ? wk.ra[i / R] * gate_at(p, b, h, t0 + i / R, i % R, cc).dy : acc(0);
  }
}

// The gate and the output mixing of steps t0 .. t0+n-1 in reverse, per channel cc (so that the
// sums over the steps, dmimo_z, dmimo_o and dD's part dDc, stay with one thread): dy (the gradient
// of y before the gate), dz, and dx = D dy plus the final v's gradient on the last row (`last`).
template <typename T>
SSMK_MATH_INLINE void chunk_gate_grads(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t bh, int64_t t0,
                                      int64_t n, bool last, acc_t<T> D, Work<acc_t<T>>& wk, acc_t<T>* dmz,
                                      acc_t<T>* dmo, acc_t<T>* dDc, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, P = p.headdim_v;
  const bool gated = p.z.data != nullptr;
  for (int64_t cc = lane; cc < P; cc += lanes) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t l = t0 + t;
      acc dz = 0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = t * R + r;
        const GateAt<acc> gt = gate_at(p, b, h, l, r, cc);
        const acc y = wk.y[i * wk.ldP + cc];
        if (gated) {
          const acc dzv = gt.g0 * y * ssmk::silu_grad(gt.zv);
          if (p.mimo) {
            dz += dzv * p.mimo_z[(h * R + r) * P + cc];
            dmz[r * P + cc] += dzv * gt.zraw;
          } else {
            dz += dzv;
          }
        }
        if (p.mimo) dmo[r * P + cc] += gt.gout * (gated ? y * gt.sz : y);
        wk.dy[i * wk.ldP + cc] = gt.dy;
        dDc[cc] += gt.dy * wk.x[i * wk.ldP + cc];
        const acc dfinal = last && t == n - 1 && p.dfinal_v ? p.dfinal_v[(bh * R + r) * P + cc] : acc(0);
        wk.dx[i * wk.ldP + cc] = D * gt.dy + dfinal;
      }
      if (p.dz) p.dz[((b * L + l) * H + h) * P + cc] = static_cast<T>(dz);
    }
  }
  // dy is an operand of the products: zeros in its padding (dx's too, for tidiness).
  for (int64_t it = lane; it < wk.M * wk.ldP; it += lanes) {
    if (it / wk.ldP >= n * R || it % wk.ldP >= P) wk.dy[it] = wk.dx[it] = acc(0);
  }
}

// The chunk's products in reverse (S the state before the chunk, dS the gradient of the state
// after it, both tile_state; dS_prev, if given, gets the gradient of the state before it), with
// dm = dxy m:
//   dq = dm K + e^{Acs_t} dy S
//   dk = dm^T Q + e^{Acs_last - Acs_s} w_s X dS
//   dx += g^T dy   (and + e^{Acs_last - Acs_s} w_s kds later, chunk_step_sums' phase)
//   kds = K dS^T
//   dS_prev = e^{Acs_last} dS + (e^{Acs_t} dy)^T Q
// First the scaled rows (dys, xw) and dxy = dy X^T, then dm and the scaled dS_prev, then the five
// products at once.
template <typename acc, typename Lanes>
SSMK_MATH_INLINE void chunk_product_grads(Work<acc>& wk, int64_t n, const acc* S, const acc* dS, acc* dS_prev,
                                          const Lanes& run) {
  const int64_t R = wk.R, M = wk.M, ldN = wk.ldN, ldP = wk.ldP, rows = n * R;
  const acc kd = wk.ra[n - 1];
  run([&](int64_t lane, int64_t lanes) {
    scaled_rows(wk, n, wk.ra, wk.dy, wk.dys, lane, lanes);
    scaled_rows(wk, n, wk.ew, wk.x, wk.xw, lane, lanes);
  });
  run.products(tile_product(wk.dxy, M, M, M, false, tile_term<false, true>(wk.dy, ldP, wk.x, ldP, ldP),
                            StepMask::kLowerOut, R));
  run([&](int64_t lane, int64_t lanes) {
    for (int64_t it = lane; it < M * M; it += lanes) {
      const int64_t i = it / M, j = it % M;
      wk.dm[it] = i < rows && j < rows && j / R <= i / R ? wk.dxy[it] * wk.m[it] : acc(0);
    }
    for (int64_t it = lane; dS_prev && it < ldP * ldN; it += lanes) dS_prev[it] = kd * dS[it];
  });
  const auto dq = tile_product(wk.dq, ldN, M, ldN, false, tile_term(wk.dm, M, wk.k, ldN, M, StepMask::kLowerA, R),
                               tile_term(wk.dys, ldP, S, ldN, ldP));
  const auto dk = tile_product(wk.dk, ldN, M, ldN, false,
                               tile_term<true, false>(wk.dm, M, wk.q, ldN, M, StepMask::kUpperA, R),
                               tile_term(wk.xw, ldP, dS, ldN, ldP));
  const auto dx = tile_product(wk.dx, ldP, M, ldP, true,
                               tile_term<true, false>(wk.g, M, wk.dy, ldP, M, StepMask::kUpperA, R));
  const auto kds = tile_product(wk.kds, ldP, M, ldP, false, tile_term<false, true>(wk.k, ldN, dS, ldN, ldN));
  if (dS_prev) {
    run.products(dq, dk, dx, kds,
                 tile_product(dS_prev, ldN, ldP, ldN, true, tile_term<true, false>(wk.dys, ldP, wk.q, ldN, M)));
  } else {
    run.products(dq, dk, dx, kds);
  }
}

// Per step t of the chunk: d Acs_t (the intra-chunk pairs with t as the later step, less those with
// t as the earlier; the inter-chunk term; less the state term), dw_t (pairs below the diagonal
// steps, the state term), dgamma_t (the diagonal step's pairs), and E_t = sum of x_j . (dS k_j)
// over t's rows, whose e^{Acs_last - Acs_s} w_s share of d Acs_last the caller adds (after
// chunk_product_grads: reads qs = Q S^T and kds = K dS^T).
template <typename acc>
SSMK_MATH_INLINE void chunk_step_sums(const Work<acc>& wk, int64_t n, acc* dacs, acc* dw, acc* dgamma, acc* E,
                                      int64_t lane, int64_t lanes) {
  const int64_t R = wk.R, P = wk.P, M = wk.M, ldP = wk.ldP, rows = n * R;
  const acc* dxy = wk.dxy;
  for (int64_t t = lane; t < n; t += lanes) {
    const acc at = wk.acs[t];
    acc da = 0, dwt = 0, dgt = 0, Et = 0;
    for (int64_t i = t * R; i < (t + 1) * R; ++i) {
      for (int64_t j = 0; j < (t + 1) * R; ++j) {
        const acc pij = wk.cb[i * M + j] * dxy[i * M + j];
        if (j / R == t) {
          dgt += pij;  // the diagonal's coefficient is gamma_t (no decay: no d Acs)
        } else {
          da += pij * wk.m[i * M + j];
        }
      }
    }
    for (int64_t i = (t + 1) * R; i < rows; ++i) {
      for (int64_t j = t * R; j < (t + 1) * R; ++j) {
        const acc pij = wk.cb[i * M + j] * dxy[i * M + j];
        da -= pij * wk.m[i * M + j];
        dwt += pij * exp_(wk.acs[i / R] - at);
      }
    }
    const acc rt = wk.ra[t];
    for (int64_t i = t * R; i < (t + 1) * R; ++i) da += rt * dot(wk.dy + i * ldP, wk.qs + i * ldP, P);
    for (int64_t j = t * R; j < (t + 1) * R; ++j) Et += dot(wk.x + j * ldP, wk.kds + j * ldP, P);
    dwt += exp_(wk.acs[n - 1] - at) * Et;
    da -= wk.ew[t] * Et;
    dacs[t] = da;
    dw[t] = dwt;
    dgamma[t] = dgt;
    E[t] = Et;
  }
}

// The rotations' adjoint (dq, dk of the chunk's rows become those of the unrotated rows, the
// angles' gradients go to dtheta [Q, A]) and the per-head dq, dk outputs, per step.
template <typename T>
SSMK_MATH_INLINE void chunk_rotation_grads(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                          Work<acc_t<T>>& wk, acc_t<T>* dtheta, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, A = p.nangles;
  for (int64_t t = lane; t < n; t += lanes) {
    const int64_t l = t0 + t;
    fill_n(dtheta + t * A, A, acc(0));
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = t * R + r;
      acc* dqi = wk.dq + i * wk.ldN;
      acc* dki = wk.dk + i * wk.ldN;
      rotate_pairs_bwd(dqi, wk.q + i * wk.ldN, wk.cs + t * A, wk.sn + t * A, A, dtheta + t * A);
      rotate_pairs_bwd(dki, wk.k + i * wk.ldN, wk.cs + t * A, wk.sn + t * A, A, dtheta + t * A);
      copy_n(dqi, N, p.dq + (((b * L + l) * R + r) * H + h) * N);
      copy_n(dki, N, p.dk + (((b * L + l) * R + r) * H + h) * N);
    }
  }
}

// The sums over the chunk's steps: the biases' parts (per (rank, element)), dv and dmimo_v's part
// (per channel).
template <typename T>
SSMK_MATH_INLINE void chunk_input_grads(const Mamba3BwdParams<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                       const Work<acc_t<T>>& wk, acc_t<T>* dqb, acc_t<T>* dkb, acc_t<T>* dmv,
                                       int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v;
  for (int64_t it = lane; it < R * N; it += lanes) {
    const int64_t r = it / N, e = it % N;
    for (int64_t t = 0; t < n; ++t) {
      dqb[it] += wk.dq[(t * R + r) * wk.ldN + e];
      dkb[it] += wk.dk[(t * R + r) * wk.ldN + e];
    }
  }
  for (int64_t cc = lane; cc < P; cc += lanes) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t l = t0 + t;
      const T* vr = p.v.data + b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2];
      acc dv = 0;
      for (int64_t r = 0; r < R; ++r) {
        const acc dx = wk.dx[(t * R + r) * wk.ldP + cc];
        if (p.mimo) {
          dv += dx * p.mimo_v[(h * R + r) * P + cc];
          dmv[r * P + cc] += dx * static_cast<acc>(vr[cc * p.v.stride[3]]);
        } else {
          dv += dx;
        }
      }
      p.dv[((b * L + l) * H + h) * P + cc] = static_cast<T>(dv);
    }
  }
}

// The chunk-parallel form of the scan (docs/mamba3.md): the chunks of all tasks run at once, in
// stages that each are one kernel on the GPU, with the state passed across chunks by an
// element-wise scan in between (as ssd_scan does):
//   forward:  angle_sums (per chunk), fwd_angles (per task), local_state (per chunk), state_pass
//             (per task and state element), fwd_outputs (per chunk);
//   backward: the first four again (the states are not kept), local_dstate (per chunk),
//             dstate_pass (per task and state element), bwd_chunk (per chunk), task_grads (per
//             task), step_grads (per chunk).
// A chunk is one slot of bwd_state_slot's layout; ChunkBuffers holds what one stage leaves for the
// next, per slot or per task. Every chunk stage works in a ChunkWork area of its own (the GPU: one
// per thread block, reused chunk after chunk).

// The chunks of a task (0 for an empty one).
SSMK_HOST_DEVICE int64_t task_chunks(const Mamba3Dims& d, const Mamba3Span& sp) {
  return (sp.end - sp.start + d.chunk - 1) / d.chunk;
}

// One chunk: chunk c of nc of `task`, whose first slot is `first`; its steps t0 .. t0+n-1.
struct ChunkRef {
  int64_t task, c, nc, first, t0, n;
  Mamba3Span sp;
  SSMK_HOST_DEVICE int64_t slot() const { return first + c; }
  SSMK_HOST_DEVICE bool last() const { return c == nc - 1; }
  SSMK_HOST_DEVICE bool valid() const { return c >= 0 && c < nc; }
};

// The chunk in slot `slot` of [0, bwd_state_slots(d)); with cu_seqlens some slots hold no chunk
// (!valid()). Sequence s of a head starts at slot floor(start_s / Q) + s, which grows with s, so
// the chunk's sequence is the last one starting at or before the slot (a binary search). Offsets
// the host did not check (CUDA) give some chunk of some sequence, always inside the tokens.
SSMK_HOST_DEVICE ChunkRef chunk_at_slot(const Mamba3Dims& d, int64_t slot) {
  ChunkRef ch{};
  int64_t seq, h = 0, c;
  if (!d.cu_seqlens) {
    seq = slot / d.nchunks();
    c = slot % d.nchunks();
  } else {
    if (d.num_seqs == 0) return ch;  // nc = 0: no chunk
    const int64_t per_head = d.seqlen / d.chunk + d.num_seqs, s = slot % per_head;
    h = slot / per_head;
    const auto start_slot = [&](int64_t i) { return Mamba3Dims::clamp(d.cu_seqlens[i], 0, d.seqlen) / d.chunk + i; };
    int64_t lo = 0, hi = d.num_seqs - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (start_slot(mid) <= s) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    seq = lo;
    c = s - start_slot(lo);
  }
  ch.task = d.cu_seqlens ? seq * d.nheads + h : seq;
  ch.sp = d.span(ch.task);
  ch.c = c;
  ch.nc = task_chunks(d, ch.sp);
  ch.first = bwd_state_slot(d, ch.task);
  ch.t0 = ch.sp.start + c * d.chunk;
  ch.n = d.chunk < ch.sp.end - ch.t0 ? d.chunk : ch.sp.end - ch.t0;
  return ch;
}

// The chunk's parts of its task's sums over the steps (the backward's, summed by task_grads):
// dq_bias, dk_bias [R, N], dmimo_v, dmimo_z, dmimo_o [R, P], dD per channel [P], the spill of
// coefficient_grads into the next chunk's first step [2], and the sum of its steps' d theta [A]
// (which task_grads replaces by the gradient of the angle after the chunk).
template <typename acc>
struct ChunkSums {
  acc *dqb, *dkb, *dmv, *dmz, *dmo, *dD, *spill, *dtheta;
  static SSMK_HOST_DEVICE int64_t size(const Mamba3Dims& d) {
    return 2 * d.rank * d.headdim_qk + 3 * d.rank * d.headdim_v + d.headdim_v + 2 + d.nangles;
  }
  SSMK_HOST_DEVICE ChunkSums(const Mamba3Dims& d, acc* s) {
    const int64_t RN = d.rank * d.headdim_qk, RP = d.rank * d.headdim_v;
    dqb = s;
    dkb = dqb + RN;
    dmv = dkb + RN;
    dmz = dmv + RP;
    dmo = dmz + RP;
    dD = dmo + RP;
    spill = dD + d.headdim_v;
    dtheta = spill + 2;
  }
};

// A chunk stage's work area: the chunk's Work, the angle after the chunk [A], and the backward's
// per-step sums d Acs, dw, dgamma, E [Q] and angle gradients d theta [Q, A].
template <typename acc>
struct ChunkWork {
  Work<acc> wk;
  acc *theta, *dacs, *dw, *dgamma, *E, *dtheta;
  static SSMK_HOST_DEVICE int64_t size(const Mamba3Dims& d, bool grads) {
    return Work<acc>::size(d, grads) + tile_padded(d.nangles + (grads ? d.chunk * (4 + d.nangles) : 0));
  }
  SSMK_HOST_DEVICE ChunkWork(const Mamba3Dims& d, acc* area, bool grads) : wk(d, area, grads) {
    const int64_t Q = d.chunk;
    theta = area + Work<acc>::size(d, grads);
    dacs = theta + d.nangles;
    dw = dacs + Q;
    dgamma = dw + Q;
    E = dgamma + Q;
    dtheta = E + Q;
  }
};

// The buffers the stages share, carved from one area of size() elements (each part a whole
// number of tiles, so that the states and the work areas stay tile-aligned):
//   states  [slots, SS]  local_state: the chunk's own part of the state after it (from zero);
//                        state_pass: the state before the chunk (tile_state layout, SS elements)
//   decay   [slots]      e^{Acs_last}, the chunk's decay of the state
//   thetas  [slots, A]   angle_sums: the sum of the chunk's angle increments; chunk_angles: the
//                        angle before the chunk
//   dstates [slots, SS]  local_dstate: the chunk's own part of the gradient of the state before
//                        it; dstate_pass: the gradient of the state after it   (backward only)
//   dinit   [tasks, SS]  the gradient of the state before a task's first step  (backward only)
//   sums    [slots, ChunkSums::size]                                           (backward only)
//   work    [blocks, work_size]: the GPU blocks' ChunkWork areas
template <typename acc>
struct ChunkBuffers {
  int64_t SS, A, nsums, work_size, size;
  acc *states, *decay, *thetas, *dstates, *dinit, *sums, *work;
  // base nullptr: the sizes alone.
  SSMK_HOST_DEVICE ChunkBuffers(const Mamba3Dims& d, bool grads, int64_t blocks, acc* base)
      : SS(tile_state(d).size()), A(d.nangles), nsums(ChunkSums<acc>::size(d)),
        work_size(ChunkWork<acc>::size(d, grads)), size(0) {
    const int64_t slots = bwd_state_slots(d);
    const auto carve = [&](int64_t n, acc*& buf) {
      buf = base ? base + size : nullptr;
      size += tile_padded(n);
    };
    carve(slots * SS, states);
    carve(slots, decay);
    carve(slots * A, thetas);
    dstates = dinit = sums = nullptr;
    if (grads) {
      carve(slots * SS, dstates);
      carve(d.tasks() * SS, dinit);
      carve(slots * nsums, sums);
    }
    carve(blocks * work_size, work);
  }
};

// The scans across a task's nc chunks (the state, its gradient, the angle and its gradient): an
// exclusive scan in place, from the first chunk (or, reverse, the last), where value(c) is the
// chunk's own part and becomes the carry before the chunk, carry = next(carry, own, c). Returns
// the carry after the last chunk scanned.
template <typename acc, typename Value, typename Next>
SSMK_MATH_INLINE acc scan_chunks(int64_t nc, bool reverse, acc carry, Value&& value, Next&& next) {
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t c = reverse ? nc - 1 - i : i;
    acc& x = value(c);
    const acc own = x;
    x = carry;
    carry = next(carry, own, c);
  }
  return carry;
}

// Stage, per chunk: the sum of its steps' angle increments pi tanh(angles) dt, per angle (lane,
// lanes as for chunk_rows), into its thetas slot.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void angle_sums(const Mamba3Inputs<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                 const Lanes& run) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, A = p.nangles, b = ch.sp.b, h = ch.sp.h, row = (b * H + h) * L;
  run([&](int64_t lane, int64_t lanes) {
    for (int64_t j = lane; j < A; j += lanes) {
      acc u = 0;
      for (int64_t l = ch.t0; l < ch.t0 + ch.n; ++l) u += angle_step(p.angles[((b * L + l) * H + h) * A + j], p.dt[row + l]);
      buf.thetas[ch.slot() * A + j] = u;
    }
  });
}

// Stage, per task: the angle before each of its chunks from the chunks' sums (the angle is wrapped
// into [0, 2 pi) once per chunk here, then per step inside the chunk by chunk_coefficients), and
// with final_angle the angle after its last step; per angle (lane, lanes).
template <typename T>
SSMK_MATH_INLINE void chunk_angles(const Mamba3Inputs<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                   acc_t<T>* final_angle, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t A = p.nangles, nc = task_chunks(p, p.span(task));
  acc* thetas = buf.thetas + bwd_state_slot(p, task) * A;
  for (int64_t j = lane; j < A; j += lanes) {
    const acc init = p.init_angle ? p.init_angle[task * A + j] : acc(0);
    const acc theta = scan_chunks(
        nc, false, init, [&](int64_t c) -> acc& { return thetas[c * A + j]; },
        [](acc before, acc u, int64_t) { return wrap_angle(before + u); });
    if (final_angle) final_angle[task * A + j] = theta;
  }
}

// Forward stage, per task: chunk_angles, or for a task without tokens all its final states.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void fwd_angles(const Mamba3FwdParams<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                 const Lanes& run) {
  const Mamba3Span sp = p.span(task);
  run([&](int64_t lane, int64_t lanes) {
    if (sp.start < sp.end) {
      chunk_angles(p, task, buf, p.final_angle, lane, lanes);
    } else if (lane == 0) {
      empty_fwd(p, task);
    }
  });
}

// Stage, per chunk: its coefficients (and decay), rows, and its own part of the state after it,
// sum_s e^{Acs_last - Acs_s} w_s x_s k_s^T, into its states slot.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void local_state(const Mamba3Inputs<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                  ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  Work<acc_t<T>>& wk = cw.wk;
  const int64_t slot = ch.slot();
  run([&](int64_t lane, int64_t) {
    if (lane != 0) return;
    chunk_coefficients(p, ch.sp.b, ch.sp.h, ch.t0, ch.n, ch.sp.end, buf.thetas + slot * buf.A, cw.theta, wk);
    buf.decay[slot] = wk.ra[ch.n - 1];
  });
  run([&](int64_t lane, int64_t lanes) { chunk_rows(p, ch.sp.b, ch.sp.h, ch.t0, ch.n, wk, lane, lanes); });
  chunk_state(wk, ch.n, static_cast<const acc_t<T>*>(nullptr), buf.states + slot * buf.SS, run);
}

// Forward stage, per chunk: local_state, and the last chunk's k and v rows as the final k, v.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void fwd_local_state(const Mamba3FwdParams<T>& p, const ChunkRef& ch,
                                      const ChunkBuffers<acc_t<T>>& buf, ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  local_state(p, ch, buf, cw, run);
  if (!ch.last()) return;
  const Work<acc_t<T>>& wk = cw.wk;
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v, i = (ch.n - 1) * R;
  run([&](int64_t lane, int64_t lanes) {
    copy_rows(wk.k + i * wk.ldN, wk.ldN, R, N, p.final_k + ch.task * R * N, N, lane, lanes);
    copy_rows(wk.x + i * wk.ldP, wk.ldP, R, P, p.final_v + ch.task * R * P, P, lane, lanes);
  });
}

// Stage, per task and state element (lane, lanes): the scan across its chunks, S_{c+1} =
// decay_c S_c + (chunk c's own part), from the initial state; each slot then holds the state
// before its chunk. With `saved` (the forward's chunk_states, [slots, P, N]) those states are
// copied there too, with final_ssm the state after the last chunk.
template <typename T>
SSMK_MATH_INLINE void state_pass(const Mamba3Inputs<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                 acc_t<T>* final_ssm, acc_t<T>* saved, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const Mamba3Span sp = p.span(task);
  const int64_t nc = task_chunks(p, sp), first = bwd_state_slot(p, task), N = p.headdim_qk, P = p.headdim_v;
  if (nc == 0) return;
  const StateLayout st = tile_state(p);
  const acc rho = initial_pair_weight(p, sp);
  for (int64_t it = lane; it < st.size(); it += lanes) {
    const int64_t cc = it / st.ld, e = it % st.ld;
    const bool in = cc < P && e < N;
    const acc S = scan_chunks(
        nc, false, initial_state_element(p, task, rho, cc, e),
        [&](int64_t c) -> acc& { return buf.states[(first + c) * st.size() + it]; },
        [&](acc before, acc own, int64_t c) {
          if (saved && in) saved[((first + c) * P + cc) * N + e] = before;
          return buf.decay[first + c] * before + own;
        });
    if (final_ssm && in) final_ssm[(task * P + cc) * N + e] = S;
  }
}

// Forward stage, per chunk: its forward up to y from the state before it (chunk_forward), the
// gate and the outputs (and y before the gate for the CPU backward).
template <typename T, typename Lanes>
SSMK_MATH_INLINE void fwd_outputs(const Mamba3FwdParams<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                  ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  using acc = acc_t<T>;
  const int64_t b = ch.sp.b, h = ch.sp.h, L = p.seqlen, H = p.nheads, R = p.rank, P = p.headdim_v;
  const int64_t slot = ch.slot(), t0 = ch.t0, n = ch.n;
  Work<acc>& wk = cw.wk;
  const acc D = p.D ? p.D[h] : acc(0);
  chunk_forward(p, b, h, t0, n, ch.sp.end, buf.thetas + slot * buf.A, cw.theta, buf.states + slot * buf.SS, D, wk,
                run);
  run([&](int64_t lane, int64_t lanes) {
    if (p.gate_input) copy_rows(wk.y, wk.ldP, n * R, P, p.gate_input + ((b * H + h) * L + t0) * R * P, P, lane, lanes);
    chunk_gate_outputs(p, b, h, t0, n, wk, lane, lanes);
  });
}

// Backward stage, per chunk: its own part of the gradient of the state before it,
// (e^{Acs_t} dy)^T Q, into its dstates slot (the coefficients, rows and dy again: dy, the gate's
// gradient, does not depend on y).
template <typename T, typename Lanes>
SSMK_MATH_INLINE void local_dstate(const Mamba3BwdParams<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                   ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  using acc = acc_t<T>;
  const int64_t b = ch.sp.b, h = ch.sp.h, slot = ch.slot(), n = ch.n;
  Work<acc>& wk = cw.wk;
  run([&](int64_t lane, int64_t) {
    if (lane == 0) chunk_coefficients(p, b, h, ch.t0, n, ch.sp.end, buf.thetas + slot * buf.A, cw.theta, wk);
  });
  run([&](int64_t lane, int64_t lanes) {
    chunk_rows(p, b, h, ch.t0, n, wk, lane, lanes);
    chunk_scaled_dy(p, b, h, ch.t0, n, wk, lane, lanes);
  });
  run.products(tile_product(buf.dstates + slot * buf.SS, wk.ldN, wk.ldP, wk.ldN, false,
                            tile_term<true, false>(wk.dys, wk.ldP, wk.q, wk.ldN, wk.M)));
}

// Backward stage, per task and state element (lane, lanes): the scan across its chunks in
// reverse, dS_{c-1} = decay_c dS_c + (chunk c's own part), from the final state's gradient; each
// slot then holds the gradient of the state after its chunk, dinit that of the state before the
// first.
template <typename T>
SSMK_MATH_INLINE void dstate_pass(const Mamba3BwdParams<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                  int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const Mamba3Span sp = p.span(task);
  const int64_t nc = task_chunks(p, sp), first = bwd_state_slot(p, task), N = p.headdim_qk, P = p.headdim_v;
  if (nc == 0) return;
  const StateLayout st = tile_state(p);
  for (int64_t it = lane; it < st.size(); it += lanes) {
    const int64_t cc = it / st.ld, e = it % st.ld;
    const acc dfinal = p.dfinal_ssm && cc < P && e < N ? p.dfinal_ssm[(task * P + cc) * N + e] : acc(0);
    acc* own_parts = buf.dstates + first * st.size() + it;
    const acc* decay = buf.decay + first;
    buf.dinit[task * st.size() + it] = scan_chunks(
        nc, true, dfinal, [&](int64_t c) -> acc& { return own_parts[c * st.size()]; },
        [&](acc after, acc own, int64_t c) { return decay[c] * after + own; });
  }
}

// Backward stage, per chunk, from the state before it and the gradient of the state after it:
// the chunk's forward again, the gate's, the products', the per-step and the coefficients'
// gradients, the rotations' (their angle parts d theta into p.dangles for step_grads) and the
// inputs'; its parts of the task's sums into its ChunkSums.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void bwd_chunk(const Mamba3BwdParams<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, A = p.nangles;
  const int64_t b = ch.sp.b, h = ch.sp.h, t0 = ch.t0, n = ch.n, rows = n * R, row = (b * H + h) * L;
  const int64_t slot = ch.slot(), SS = buf.SS;
  Work<acc>& wk = cw.wk;
  const acc* S = buf.states + slot * SS;
  const acc* dS = buf.dstates + slot * SS;
  const ChunkSums<acc> sums(p, buf.sums + slot * buf.nsums);
  const acc D = p.D ? p.D[h] : acc(0);
  run([&](int64_t lane, int64_t lanes) {
    for (int64_t it = lane; it < buf.nsums; it += lanes) buf.sums[slot * buf.nsums + it] = acc(0);
    for (int64_t l = t0 + lane; l < t0 + n; l += lanes) p.dtrap[row + l] = p.ddt[row + l] = acc(0);
  });
  chunk_forward(p, b, h, t0, n, ch.sp.end, buf.thetas + slot * buf.A, cw.theta, S, D, wk, run);
  run([&](int64_t lane, int64_t lanes) {
    chunk_gate_grads(p, b, h, ch.task, t0, n, ch.last(), D, wk, sums.dmz, sums.dmo, sums.dD, lane, lanes);
  });
  chunk_product_grads(wk, n, S, dS, static_cast<acc*>(nullptr), run);
  run([&](int64_t lane, int64_t lanes) {
    chunk_step_sums(wk, n, cw.dacs, cw.dw, cw.dgamma, cw.E, lane, lanes);
    for (int64_t it = lane; it < rows * wk.P; it += lanes) {
      const int64_t j = it / wk.P, at = j * wk.ldP + it % wk.P;
      wk.dx[at] += wk.ew[j / R] * wk.kds[at];
    }
    if (ch.last() && p.dfinal_k) {
      for (int64_t it = lane; it < R * wk.N; it += lanes) {
        wk.dk[((n - 1) * R + it / wk.N) * wk.ldN + it % wk.N] += p.dfinal_k[ch.task * R * wk.N + it];
      }
    }
  });
  run([&](int64_t lane, int64_t) {
    if (lane != 0) return;
    for (int64_t t = 0; t < n; ++t) cw.dacs[n - 1] += wk.ew[t] * cw.E[t];
    cw.dacs[n - 1] += wk.ra[n - 1] * dot(dS, S, SS);
    coefficient_grads(p, row, t0, n, ch.sp.end, cw.dacs, cw.dw, cw.dgamma, wk.lam, wk.dtv, sums.spill);
  });
  run([&](int64_t lane, int64_t lanes) { chunk_rotation_grads(p, b, h, t0, n, wk, cw.dtheta, lane, lanes); });
  run([&](int64_t lane, int64_t lanes) {
    chunk_input_grads(p, b, h, t0, n, wk, sums.dqb, sums.dkb, sums.dmv, lane, lanes);
    for (int64_t it = lane; it < n * A; it += lanes) {
      p.dangles[((b * L + t0 + it / A) * H + h) * A + it % A] = cw.dtheta[it];
    }
    for (int64_t j = lane; j < A; j += lanes) {
      acc s = 0;
      for (int64_t t = 0; t < n; ++t) s += cw.dtheta[t * A + j];
      sums.dtheta[j] = s;
    }
  });
}

// Backward stage, per task, after every chunk's bwd_chunk: per angle, the gradient of the angle
// after each chunk (in reverse: d theta's sums of the chunks after it, from the final angle's
// gradient; it replaces the chunk's sum) and before the first step (the initial angle's); the
// initial state's gradients; and the sums over the chunks, in chunk order. A task without tokens
// passes its states' gradients through.
template <typename T, typename Lanes>
SSMK_MATH_INLINE void task_grads(const Mamba3BwdParams<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                 const Lanes& run) {
  using acc = acc_t<T>;
  const Mamba3Span sp = p.span(task);
  if (sp.start == sp.end) {
    run([&](int64_t lane, int64_t) {
      if (lane == 0) empty_bwd(p, task);
    });
    return;
  }
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const int64_t row = (sp.b * H + sp.h) * L, nc = task_chunks(p, sp), first = bwd_state_slot(p, task);
  const auto chunk_sums = [&](int64_t c) { return ChunkSums<acc>(p, buf.sums + (first + c) * buf.nsums); };
  run([&](int64_t lane, int64_t lanes) {
    for (int64_t j = lane; j < A; j += lanes) {
      p.dinit_angle[task * A + j] = scan_chunks(
          nc, true, p.dfinal_angle ? p.dfinal_angle[task * A + j] : acc(0),
          [&](int64_t c) -> acc& { return chunk_sums(c).dtheta[j]; },
          [](acc after, acc own, int64_t) { return after + own; });
    }
    if (lane == 0) initial_state_grads(p, task, row + sp.start, buf.dinit + task * buf.SS, tile_state(p).ld);
  });
  run([&](int64_t lane, int64_t lanes) {
    const auto sum_chunks = [&](acc* ChunkSums<acc>::*part, int64_t size, acc* out) {
      for (int64_t it = lane; it < size; it += lanes) {
        acc s = 0;
        for (int64_t c = 0; c < nc; ++c) s += (chunk_sums(c).*part)[it];
        out[task * size + it] = s;
      }
    };
    sum_chunks(&ChunkSums<acc>::dqb, R * N, p.dq_bias);
    sum_chunks(&ChunkSums<acc>::dkb, R * N, p.dk_bias);
    if (p.mimo) {
      sum_chunks(&ChunkSums<acc>::dmv, R * P, p.dmimo_v);
      sum_chunks(&ChunkSums<acc>::dmo, R * P, p.dmimo_o);
      if (p.dmimo_z) sum_chunks(&ChunkSums<acc>::dmz, R * P, p.dmimo_z);
    }
    if (lane == 0) {
      acc dD = 0;
      for (int64_t cc = 0; cc < P; ++cc) {
        acc s = 0;
        for (int64_t c = 0; c < nc; ++c) s += chunk_sums(c).dD[cc];
        dD += s;
      }
      p.dD[task] = dD;
    }
  });
}

// Backward stage, per chunk, after task_grads: the angle recurrence in reverse over its steps,
// per angle from the gradient of the angle after the chunk (d theta in p.dangles becomes the
// gradient of the angle after each step); then per step the angles' gradients and their share of
// d dt, the previous chunk's spill into the first step, and d trap (d lambda is complete: the
// initial state's part came in task_grads).
template <typename T, typename Lanes>
SSMK_MATH_INLINE void step_grads(const Mamba3BwdParams<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                 const Lanes& run) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, A = p.nangles, b = ch.sp.b, h = ch.sp.h, row = (b * H + h) * L;
  const auto dangle = [&](int64_t l) { return p.dangles + ((b * L + l) * H + h) * A; };
  run([&](int64_t lane, int64_t lanes) {
    const acc* after = ChunkSums<acc>(p, buf.sums + ch.slot() * buf.nsums).dtheta;
    for (int64_t j = lane; j < A; j += lanes) {
      acc carry = after[j];
      for (int64_t l = ch.t0 + ch.n - 1; l >= ch.t0; --l) {
        carry += dangle(l)[j];
        dangle(l)[j] = carry;
      }
    }
  });
  run([&](int64_t lane, int64_t lanes) {
    for (int64_t l = ch.t0 + lane; l < ch.t0 + ch.n; l += lanes) {
      acc ddt = 0;
      if (A > 0) {
        const acc* ang = p.angles + ((b * L + l) * H + h) * A;
        const acc dt = p.dt[row + l];
        acc* dang = dangle(l);
        for (int64_t j = 0; j < A; ++j) {
          ddt += dang[j] * angle_step(ang[j], acc(1));
          dang[j] *= angle_step_draw(ang[j], dt);
        }
      }
      if (l == ch.t0 && ch.c > 0) {
        const acc* spill = ChunkSums<acc>(p, buf.sums + (ch.slot() - 1) * buf.nsums).spill;
        ddt += spill[0];
        p.dtrap[row + l] += spill[1];
      }
      p.ddt[row + l] += ddt;
      trap_grad(p, row, l);
    }
  });
}

// The stages, each of one of three kinds: per task (task_stage), per task and state element
// (element_stage), per chunk (chunk_stage). A kind runs its items in any order, or at once; a
// stage starts when the one before it is done (run_fwd_stages, run_bwd_stages).
enum class Stage {
  kAngleSums,    // chunks: angle_sums
  kAngles,       // tasks: fwd_angles (forward), chunk_angles (backward)
  kLocalState,   // chunks: fwd_local_state (forward), local_state (backward)
  kStatePass,    // elements: state_pass
  kOutputs,      // chunks: fwd_outputs
  kLocalDState,  // chunks: local_dstate
  kDStatePass,   // elements: dstate_pass
  kChunkGrads,   // chunks: bwd_chunk
  kTaskGrads,    // tasks: task_grads
  kStepGrads,    // chunks: step_grads
};

template <typename T>
constexpr bool is_fwd(const Mamba3FwdParams<T>*) {
  return true;
}
template <typename T>
constexpr bool is_fwd(const Mamba3BwdParams<T>*) {
  return false;
}

template <Stage kStage, template <typename> class Params, typename T, typename Lanes>
SSMK_MATH_INLINE void task_stage(const Params<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf,
                                 const Lanes& run) {
  constexpr bool fwd = is_fwd(static_cast<const Params<T>*>(nullptr));
  if constexpr (kStage == Stage::kAngles && fwd) {
    fwd_angles(p, task, buf, run);
  } else if constexpr (kStage == Stage::kAngles) {
    run([&](int64_t lane, int64_t lanes) { chunk_angles(p, task, buf, static_cast<acc_t<T>*>(nullptr), lane, lanes); });
  } else if constexpr (kStage == Stage::kTaskGrads && !fwd) {
    task_grads(p, task, buf, run);
  }
}

template <Stage kStage, template <typename> class Params, typename T>
SSMK_MATH_INLINE void element_stage(const Params<T>& p, int64_t task, const ChunkBuffers<acc_t<T>>& buf, int64_t lane,
                                    int64_t lanes) {
  constexpr bool fwd = is_fwd(static_cast<const Params<T>*>(nullptr));
  if constexpr (kStage == Stage::kStatePass && fwd) {
    state_pass(p, task, buf, p.final_ssm, p.chunk_states, lane, lanes);
  } else if constexpr (kStage == Stage::kStatePass) {
    state_pass(p, task, buf, static_cast<acc_t<T>*>(nullptr), static_cast<acc_t<T>*>(nullptr), lane, lanes);
  } else if constexpr (kStage == Stage::kDStatePass && !fwd) {
    dstate_pass(p, task, buf, lane, lanes);
  }
}

template <Stage kStage, template <typename> class Params, typename T, typename Lanes>
SSMK_MATH_INLINE void chunk_stage(const Params<T>& p, const ChunkRef& ch, const ChunkBuffers<acc_t<T>>& buf,
                                  ChunkWork<acc_t<T>>& cw, const Lanes& run) {
  constexpr bool fwd = is_fwd(static_cast<const Params<T>*>(nullptr));
  if constexpr (kStage == Stage::kAngleSums) {
    angle_sums(p, ch, buf, run);
  } else if constexpr (kStage == Stage::kLocalState && fwd) {
    fwd_local_state(p, ch, buf, cw, run);
  } else if constexpr (kStage == Stage::kLocalState) {
    local_state(p, ch, buf, cw, run);
  } else if constexpr (kStage == Stage::kOutputs && fwd) {
    fwd_outputs(p, ch, buf, cw, run);
  } else if constexpr (kStage == Stage::kLocalDState && !fwd) {
    local_dstate(p, ch, buf, cw, run);
  } else if constexpr (kStage == Stage::kChunkGrads && !fwd) {
    bwd_chunk(p, ch, buf, cw, run);
  } else if constexpr (kStage == Stage::kStepGrads && !fwd) {
    step_grads(p, ch, buf, run);
  }
}

// The stages of the forward and the backward in order, run by `r` (the CPU's test hook, or the
// CUDA launcher): r.tasks<S>(), r.elements<S>(), r.chunks<S>() run stage S over its items. The
// backward first recomputes the states before the chunks, as the forward computes them.
template <typename Runner>
inline void run_state_stages(Runner& r) {
  r.template chunks<Stage::kAngleSums>();
  r.template tasks<Stage::kAngles>();
  r.template chunks<Stage::kLocalState>();
  r.template elements<Stage::kStatePass>();
}
template <typename Runner>
inline void run_fwd_stages(Runner& r) {
  run_state_stages(r);
  r.template chunks<Stage::kOutputs>();
}
template <typename Runner>
inline void run_bwd_stages(Runner& r) {
  run_state_stages(r);
  r.template chunks<Stage::kLocalDState>();
  r.template elements<Stage::kDStatePass>();
  r.template chunks<Stage::kChunkGrads>();
  r.template tasks<Stage::kTaskGrads>();
  r.template chunks<Stage::kStepGrads>();
}

// Thread blocks of the GPU's chunk stages: as many as fit on the multiprocessors at once (the
// forward's 128-thread blocks use up to 128 registers a thread, so four fit; the backward's up to
// 255, so two), at most one per chunk, and no more than kChunkWorkElements of work areas in all
// (a chunk's work grows as (Q R)^2: 20 MB at Q R = 1024); each takes every blocks-th chunk, in a
// work area of its own (ChunkBuffers::work).
constexpr int64_t kChunkWorkElements = int64_t{1} << 27;
SSMK_HOST_DEVICE int64_t chunk_blocks(const Mamba3Dims& d, bool grads, int64_t sms) {
  const int64_t by_memory = kChunkWorkElements / ChunkWork<float>::size(d, grads);
  int64_t blocks = (grads ? 2 : 4) * (sms > 0 ? sms : 1);
  if (blocks > by_memory) blocks = by_memory > 0 ? by_memory : 1;
  return blocks < bwd_state_slots(d) ? blocks : bwd_state_slots(d);
}

// The decode step of one task (batch row b, value head h) in four phases, run by step_task
// (SerialLanes or the GPU's BlockLanes): thread `lane` of `lanes` takes every lanes-th item of a
// phase. Barriers separate the phases on the GPU: chunk_rows (the step's q, k, x) reads the cos
// and sin of step_angles, step_rows those q, k, x and the old k_state, which step_store then
// overwrites. A state row outside [0, state_batch) (a negative index, or out of range on CUDA)
// leaves every state alone and gets zeros as output.
template <typename T>
struct StepTask {
  using acc = acc_t<T>;
  int64_t b, h, si;     // batch row, value head, its state row
  bool valid;           // si in [0, state_batch)
  acc *q, *k, *x;       // [R, N], [R, N], [R, P]: biased rotated q, k and mixed v (scratch)
  acc *cs, *sn;         // [A] cos, sin of the updated angle (scratch)
  int64_t M, ldN, ldP;  // chunk_rows' row count and leading dimensions: R, N, P (no padding)
  SSMK_MATH_INLINE StepTask(const Mamba3StepParams<T>& p, int64_t task, acc* scratch)
      : b(task / p.nheads), h(task % p.nheads), M(p.rank), ldN(p.headdim_qk), ldP(p.headdim_v) {
    si = p.state_batch_indices ? p.state_batch_indices[b] : b;
    valid = si >= 0 && si < p.state_batch;
    q = scratch;
    k = q + p.rank * p.headdim_qk;
    x = k + p.rank * p.headdim_qk;
    cs = x + p.rank * p.headdim_v;
    sn = cs + p.nangles;
  }
  // The index of (b, h) in the [B, H] coefficients and the [B, H, P] output.
  SSMK_MATH_INLINE int64_t bh(int64_t nheads) const { return b * nheads + h; }
};

// Scratch elements of one decode-step task (StepTask's buffers).
template <typename Params>
SSMK_HOST_DEVICE int64_t step_scratch(const Params& p) {
  return 2 * p.rank * p.headdim_qk + p.rank * p.headdim_v + 2 * p.nangles;
}

// Phase 1: angle <- (angle + pi tanh(angles) dt) mod 2 pi, in the state, and its cos and sin.
template <typename T>
SSMK_MATH_INLINE void step_angles(const Mamba3StepParams<T>& p, const StepTask<T>& t, int64_t lane, int64_t lanes) {
  if (!t.valid) return;
  const auto& st = p.angle_state;
  acc_t<T>* theta = st.data + t.si * st.stride[0] + t.h * st.stride[1];
  const int64_t bh = t.bh(p.nheads);
  const acc_t<T> dt = p.dt[bh];
  for (int64_t j = lane; j < p.nangles; j += lanes) {
    acc_t<T>& th = theta[j * st.stride[2]];
    th = wrap_angle(th + angle_step(p.angles[bh * p.nangles + j], dt));
    t.cs[j] = cos_(th);
    t.sn[j] = sin_(th);
  }
}

// Phase 3, per state row c (value channel): S[c] <- alpha S[c] + beta sum_r v_state[r, c] k_state[r]
// + gamma sum_r x[r, c] k[r], the output sum_r (S[c] . q[r] + D x[r, c]) (gated, mixed), and
// v_state[r, c] <- x[r, c].
template <typename T>
SSMK_MATH_INLINE void step_rows(const Mamba3StepParams<T>& p, const StepTask<T>& t, int64_t lane, int64_t lanes) {
  using acc = acc_t<T>;
  const int64_t R = p.rank, N = p.headdim_qk, P = p.headdim_v, bh = t.bh(p.nheads);
  T* out = p.out + bh * P;
  if (!t.valid) {
    for (int64_t c = lane; c < P; c += lanes) out[c] = T(0);
    return;
  }
  const acc dt = p.dt[bh], lam = ssmk::sigmoid(p.trap[bh]);
  const acc alpha = exp_(p.adt[bh]), beta = (acc(1) - lam) * dt * alpha, gamma = lam * dt;
  const auto &Sv = p.ssm_state, &Kv = p.k_state, &Vv = p.v_state;
  acc* S = Sv.data + t.si * Sv.stride[0] + t.h * Sv.stride[1];
  const acc* ks = Kv.data + t.si * Kv.stride[0] + t.h * Kv.stride[1];
  acc* vs = Vv.data + t.si * Vv.stride[0] + t.h * Vv.stride[1];
  const acc D = p.D ? p.D[t.h] : acc(0);
  const T* zr = p.z.data ? p.z.data + t.b * p.z.stride[0] + t.h * p.z.stride[1] : nullptr;
  for (int64_t c = lane; c < P; c += lanes) {
    acc* Sc = S + c * Sv.stride[2];
    for (int64_t e = 0; e < N; ++e) {
      acc prev = 0, cur = 0;
      for (int64_t r = 0; r < R; ++r) {
        prev += vs[r * Vv.stride[2] + c * Vv.stride[3]] * ks[r * Kv.stride[2] + e * Kv.stride[3]];
        cur += t.x[r * P + c] * t.k[r * N + e];
      }
      acc& s = Sc[e * Sv.stride[3]];
      s = alpha * s + beta * prev + gamma * cur;
    }
    acc o = 0;
    for (int64_t r = 0; r < R; ++r) {
      acc y = D * t.x[r * P + c];
      for (int64_t e = 0; e < N; ++e) y += Sc[e * Sv.stride[3]] * t.q[r * N + e];
      if (zr) {
        acc zv = static_cast<acc>(zr[c * p.z.stride[2]]);
        if (p.mimo) zv *= p.mimo_z[(t.h * R + r) * P + c];
        y *= ssmk::silu(zv);
      }
      o += p.mimo ? y * p.mimo_o[(t.h * R + r) * P + c] : y;
      vs[r * Vv.stride[2] + c * Vv.stride[3]] = t.x[r * P + c];
    }
    out[c] = static_cast<T>(o);
  }
}

// Phase 4: k_state <- k (after every row has read the old one).
template <typename T>
SSMK_MATH_INLINE void step_store(const Mamba3StepParams<T>& p, const StepTask<T>& t, int64_t lane, int64_t lanes) {
  if (!t.valid) return;
  const int64_t N = p.headdim_qk;
  const auto& Kv = p.k_state;
  acc_t<T>* ks = Kv.data + t.si * Kv.stride[0] + t.h * Kv.stride[1];
  for (int64_t i = lane; i < p.rank * N; i += lanes) ks[(i / N) * Kv.stride[2] + (i % N) * Kv.stride[3]] = t.k[i];
}

// The whole step of one task, its phases run by `run` (SerialLanes, or the GPU's BlockLanes).
template <typename T, typename Lanes>
SSMK_MATH_INLINE void step_task(const Mamba3StepParams<T>& p, int64_t task, acc_t<T>* scratch, const Lanes& run) {
  const StepTask<T> t(p, task, scratch);
  run([&](int64_t lane, int64_t lanes) { step_angles(p, t, lane, lanes); });
  run([&](int64_t lane, int64_t lanes) {
    if (t.valid) chunk_rows(p, t.b, t.h, 0, 1, t, lane, lanes);
  });
  run([&](int64_t lane, int64_t lanes) { step_rows(p, t, lane, lanes); });
  run([&](int64_t lane, int64_t lanes) { step_store(p, t, lane, lanes); });
}

}  // namespace ssmk::mamba3
