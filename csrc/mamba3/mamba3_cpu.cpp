// CPU kernels of mamba3_scan and mamba3_step. One (batch, value head) task at a time
// (at::parallel_for over tasks), the sequence in chunks of p.chunk steps (mamba3_math.h): per
// chunk, the masked (Q R) x (Q R) product of rotated queries and keys, its product with the mixed
// values, the inter-chunk term from the carried state, and the state update. Inner loops run over
// contiguous head-dim rows that the compiler vectorises (AVX2+FMA variants chosen at run time).
// The backward recomputes the chunk states in a forward pass, then walks the chunks in reverse.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "mamba3/mamba3.h"

namespace ssmk {
namespace {

using mamba3::angle_step;
using mamba3::angle_step_draw;
using mamba3::rotate_pairs;
using mamba3::rotate_pairs_bwd;
using mamba3::wrap_angle;

template <typename acc>
SSMK_CPU_INLINE acc dot(const acc* a, const acc* b, int64_t n) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc>
SSMK_CPU_INLINE void axpy(acc* y, acc a, const acc* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One task's chunk buffers (rows i = t R + r of the chunk).
template <typename acc>
struct Work {
  int64_t Q, R, N, P, A;
  std::vector<acc> q, k, x;            // [Q R, N], [Q R, N], [Q R, P]: biased rotated q, k; mixed v
  std::vector<acc> cs, sn;             // [Q, A] cos, sin of the angle at each step
  std::vector<acc> lam, dtv, gam, w, acs;  // [Q]
  std::vector<acc> cb, m;              // [Q R, Q R] q_i . k_j and the mask e^{Acs_t - Acs_s} c_ts
  std::vector<acc> y, dy, dx, dq, dk;  // [Q R, P] / [Q R, N]
  std::vector<acc> vec_p, vec_n;       // [P], [N]
  explicit Work(const Mamba3Dims& d)
      : Q(d.chunk), R(d.rank), N(d.headdim_qk), P(d.headdim_v), A(d.nangles),
        q(Q * R * N), k(Q * R * N), x(Q * R * P), cs(Q * A), sn(Q * A),
        lam(Q), dtv(Q), gam(Q), w(Q), acs(Q), cb(Q * R * Q * R), m(Q * R * Q * R),
        y(Q * R * P), dy(Q * R * P), dx(Q * R * P), dq(Q * R * N), dk(Q * R * N), vec_p(P), vec_n(N) {}
};

// Per-step coefficients and the rotated, biased q and k and the mixed v of steps t0 .. t0+n-1;
// theta [A] carries the angle across chunks.
template <typename T>
SSMK_CPU_INLINE void load_chunk(const Mamba3Inputs<T>& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                                acc_t<T>* theta, Work<acc_t<T>>& wk) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const int64_t g = h / (H / p.ngroups);
  const int64_t row = (b * H + h) * L;
  acc cum = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = t0 + t;
    const acc dt = p.dt[row + l];
    const acc lam = ssmk::sigmoid(p.trap[row + l]);
    wk.dtv[t] = dt;
    wk.lam[t] = lam;
    wk.gam[t] = lam * dt;
    const acc sigma = l + 1 < L ? (acc(1) - ssmk::sigmoid(p.trap[row + l + 1])) * p.dt[row + l + 1] : acc(0);
    wk.w[t] = wk.gam[t] + sigma;
    cum += p.adt[row + l];
    wk.acs[t] = cum;
    acc* cs = wk.cs.data() + t * A;
    acc* sn = wk.sn.data() + t * A;
    if (A > 0) {
      const acc* ang = p.angles + ((b * L + l) * H + h) * A;
      for (int64_t j = 0; j < A; ++j) {
        theta[j] = wrap_angle(theta[j] + angle_step(ang[j], dt));
        cs[j] = std::cos(theta[j]);
        sn[j] = std::sin(theta[j]);
      }
    }
    const T* vr = p.v.data + b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = t * R + r;
      acc* qi = wk.q.data() + i * N;
      acc* ki = wk.k.data() + i * N;
      const T* qs = p.q.data + b * p.q.stride[0] + l * p.q.stride[1] + r * p.q.stride[2] + g * p.q.stride[3];
      const T* ks = p.k.data + b * p.k.stride[0] + l * p.k.stride[1] + r * p.k.stride[2] + g * p.k.stride[3];
      for (int64_t c = 0; c < N; ++c) {
        qi[c] = static_cast<acc>(qs[c * p.q.stride[4]]);
        ki[c] = static_cast<acc>(ks[c * p.k.stride[4]]);
      }
      if (p.q_bias) axpy(qi, acc(1), p.q_bias + (h * R + r) * N, N);
      if (p.k_bias) axpy(ki, acc(1), p.k_bias + (h * R + r) * N, N);
      rotate_pairs(qi, cs, sn, A);
      rotate_pairs(ki, cs, sn, A);
      acc* xi = wk.x.data() + i * P;
      for (int64_t c = 0; c < P; ++c) xi[c] = static_cast<acc>(vr[c * p.v.stride[3]]);
      if (p.mimo) {
        const acc* mv = p.mimo_v + (h * R + r) * P;
        for (int64_t c = 0; c < P; ++c) xi[c] *= mv[c];
      }
    }
  }
}

// cb[i, j] = q_i . k_j and m[i, j] = e^{Acs_t - Acs_s} c_ts for the rows of steps s <= t.
template <typename acc>
SSMK_CPU_INLINE void chunk_products(Work<acc>& wk, int64_t n) {
  const int64_t R = wk.R, N = wk.N, rows = n * R, ld = wk.Q * R;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t ti = i / R;
    const acc* qi = wk.q.data() + i * N;
    for (int64_t j = 0; j < (ti + 1) * R; ++j) {
      const int64_t tj = j / R;
      const acc coef = tj < ti ? wk.w[tj] : wk.gam[ti];
      wk.cb[i * ld + j] = dot(qi, wk.k.data() + j * N, N);
      wk.m[i * ld + j] = std::exp(wk.acs[ti] - wk.acs[tj]) * coef;
    }
  }
}

// y_i = sum_j cb m x_j + e^{Acs_t} H q_i + D x_i (before the gate), for H the state before the chunk.
template <typename acc>
SSMK_CPU_INLINE void chunk_outputs(Work<acc>& wk, int64_t n, const acc* H, acc D) {
  const int64_t R = wk.R, N = wk.N, P = wk.P, rows = n * R, ld = wk.Q * R;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t ti = i / R;
    acc* yi = wk.y.data() + i * P;
    const acc* xi = wk.x.data() + i * P;
    const acc* qi = wk.q.data() + i * N;
    const acc ri = std::exp(wk.acs[ti]);
    for (int64_t c = 0; c < P; ++c) yi[c] = ri * dot(H + c * N, qi, N) + D * xi[c];
    for (int64_t j = 0; j < (ti + 1) * R; ++j) axpy(yi, wk.cb[i * ld + j] * wk.m[i * ld + j], wk.x.data() + j * P, P);
  }
}

// H <- e^{Acs_last} H + sum_j e^{Acs_last - Acs_s} w_s x_j k_j^T.
template <typename acc>
SSMK_CPU_INLINE void chunk_state(const Work<acc>& wk, int64_t n, acc* H) {
  const int64_t R = wk.R, N = wk.N, P = wk.P;
  const acc last = wk.acs[n - 1], kd = std::exp(last);
#pragma omp simd
  for (int64_t c = 0; c < P * N; ++c) H[c] *= kd;
  for (int64_t j = 0; j < n * R; ++j) {
    const int64_t tj = j / R;
    const acc e = std::exp(last - wk.acs[tj]) * wk.w[tj];
    const acc* xj = wk.x.data() + j * P;
    const acc* kj = wk.k.data() + j * N;
    for (int64_t c = 0; c < P; ++c) axpy(H + c * N, e * xj[c], kj, N);
  }
}

// The state before step 0: S_init + (1 - lambda_0) dt_0 sum_r v_init_r k_init_r^T, and the angle.
template <typename T>
SSMK_CPU_INLINE void initial_state(const Mamba3Inputs<T>& p, int64_t b, int64_t h, acc_t<T>* H, acc_t<T>* theta) {
  using acc = acc_t<T>;
  const int64_t bh = b * p.nheads + h, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  if (p.init_ssm) {
    std::copy(p.init_ssm + bh * P * N, p.init_ssm + (bh + 1) * P * N, H);
  } else {
    std::fill(H, H + P * N, acc(0));
  }
  for (int64_t j = 0; j < A; ++j) theta[j] = p.init_angle ? p.init_angle[bh * A + j] : acc(0);
  if (p.init_k && p.init_v) {
    const int64_t row = bh * p.seqlen;
    const acc rho = (acc(1) - ssmk::sigmoid(p.trap[row])) * p.dt[row];
    for (int64_t r = 0; r < R; ++r) {
      const acc* kr = p.init_k + (bh * R + r) * N;
      const acc* vr = p.init_v + (bh * R + r) * P;
      for (int64_t c = 0; c < P; ++c) axpy(H + c * N, rho * vr[c], kr, N);
    }
  }
}

template <typename T>
SSMK_CPU_INLINE void fwd_tasks(const Mamba3FwdParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles, Q = p.chunk;
  Work<acc> wk(p);
  std::vector<acc> S(P * N), theta(A), o(P);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / H, h = task % H;
    initial_state(p, b, h, S.data(), theta.data());
    const acc D = p.D ? p.D[h] : acc(0);
    int64_t n = 0;
    for (int64_t t0 = 0; t0 < L; t0 += Q) {
      n = std::min(Q, L - t0);
      load_chunk(p, b, h, t0, n, theta.data(), wk);
      chunk_products(wk, n);
      chunk_outputs(wk, n, S.data(), D);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
        std::fill(o.begin(), o.end(), acc(0));
        for (int64_t r = 0; r < R; ++r) {
          const acc* yi = wk.y.data() + (t * R + r) * P;
          const acc* mz = p.mimo ? p.mimo_z + (h * R + r) * P : nullptr;
          const acc* mo = p.mimo ? p.mimo_o + (h * R + r) * P : nullptr;
          for (int64_t c = 0; c < P; ++c) {
            acc yv = yi[c];
            if (zr) {
              acc zv = static_cast<acc>(zr[c * p.z.stride[3]]);
              if (mz) zv *= mz[c];
              yv *= ssmk::silu(zv);
            }
            o[c] += mo ? yv * mo[c] : yv;
          }
        }
        T* out = p.out + ((b * L + l) * H + h) * P;
        for (int64_t c = 0; c < P; ++c) out[c] = static_cast<T>(o[c]);
      }
      chunk_state(wk, n, S.data());
    }
    const int64_t bh = b * H + h;
    std::copy(S.begin(), S.end(), p.final_ssm + bh * P * N);
    std::copy(theta.begin(), theta.end(), p.final_angle + bh * A);
    std::copy(wk.k.begin() + (n - 1) * R * N, wk.k.begin() + n * R * N, p.final_k + bh * R * N);
    std::copy(wk.x.begin() + (n - 1) * R * P, wk.x.begin() + n * R * P, p.final_v + bh * R * P);
  }
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T), (T), (const Mamba3FwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void bwd_tasks(const Mamba3BwdParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles, Q = p.chunk;
  const int64_t nc = p.nchunks(), ld = Q * R;
  Work<acc> wk(p);
  std::vector<acc> states(nc * P * N), thetas(nc * A), theta(A), dS(P * N), dS_prev(P * N);
  std::vector<acc> dacs(Q), dw(Q), dgamma(Q), dlam(L), dtheta(Q * A), carry(A);
  std::vector<acc> dqb(R * N), dkb(R * N), dmv(R * P), dmz(R * P), dmo(R * P), dzacc(P), dvacc(P);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / H, h = task % H, bh = b * H + h, row = bh * L;
    const acc D = p.D ? p.D[h] : acc(0);
    // The state (and the angle) before every chunk.
    initial_state(p, b, h, states.data(), theta.data());
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t t0 = c * Q, n = std::min(Q, L - t0);
      std::copy(theta.begin(), theta.end(), thetas.begin() + c * A);
      load_chunk(p, b, h, t0, n, theta.data(), wk);
      if (c + 1 < nc) {
        std::copy(states.begin() + c * P * N, states.begin() + (c + 1) * P * N, states.begin() + (c + 1) * P * N);
        chunk_state(wk, n, states.data() + (c + 1) * P * N);
      }
    }
    if (p.dfinal_ssm) {
      std::copy(p.dfinal_ssm + bh * P * N, p.dfinal_ssm + (bh + 1) * P * N, dS.begin());
    } else {
      std::fill(dS.begin(), dS.end(), acc(0));
    }
    for (int64_t j = 0; j < A; ++j) carry[j] = p.dfinal_angle ? p.dfinal_angle[bh * A + j] : acc(0);
    std::fill(dlam.begin(), dlam.end(), acc(0));
    std::fill(p.ddt + row, p.ddt + row + L, acc(0));
    std::fill(dqb.begin(), dqb.end(), acc(0));
    std::fill(dkb.begin(), dkb.end(), acc(0));
    std::fill(dmv.begin(), dmv.end(), acc(0));
    std::fill(dmz.begin(), dmz.end(), acc(0));
    std::fill(dmo.begin(), dmo.end(), acc(0));
    acc dD = 0;
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t t0 = c * Q, n = std::min(Q, L - t0), rows = n * R;
      const acc* S = states.data() + c * P * N;
      std::copy(thetas.begin() + c * A, thetas.begin() + (c + 1) * A, theta.begin());
      load_chunk(p, b, h, t0, n, theta.data(), wk);
      chunk_products(wk, n);
      chunk_outputs(wk, n, S, D);
      // The gate and the output mixing: dy (gradient of y before the gate), dz, dmimo_z, dmimo_o.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const T* go = p.dout.data + b * p.dout.stride[0] + l * p.dout.stride[1] + h * p.dout.stride[2];
        const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
        std::fill(dzacc.begin(), dzacc.end(), acc(0));
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = t * R + r;
          const acc* yi = wk.y.data() + i * P;
          acc* dyi = wk.dy.data() + i * P;
          const acc* mz = p.mimo && zr ? p.mimo_z + (h * R + r) * P : nullptr;
          const acc* mo = p.mimo ? p.mimo_o + (h * R + r) * P : nullptr;
          for (int64_t cc = 0; cc < P; ++cc) {
            const acc gout = static_cast<acc>(go[cc * p.dout.stride[3]]);
            acc g = mo ? gout * mo[cc] : gout;
            acc gated = yi[cc];
            if (zr) {
              const acc zraw = static_cast<acc>(zr[cc * p.z.stride[3]]);
              const acc zv = mz ? zraw * mz[cc] : zraw;
              const acc sz = ssmk::silu(zv);
              const acc dzv = g * yi[cc] * ssmk::silu_grad(zv);
              if (mz) {
                dzacc[cc] += dzv * mz[cc];
                dmz[r * P + cc] += dzv * zraw;
              } else {
                dzacc[cc] += dzv;
              }
              gated *= sz;
              g *= sz;
            }
            if (mo) dmo[r * P + cc] += gout * gated;
            dyi[cc] = g;
          }
          const acc* xi = wk.x.data() + i * P;
          dD += dot(dyi, xi, P);
          acc* dxi = wk.dx.data() + i * P;
          for (int64_t cc = 0; cc < P; ++cc) dxi[cc] = D * dyi[cc];
        }
        if (p.dz) {
          T* dzr = p.dz + ((b * L + l) * H + h) * P;
          for (int64_t cc = 0; cc < P; ++cc) dzr[cc] = static_cast<T>(dzacc[cc]);
        }
      }
      std::fill(wk.dq.begin(), wk.dq.begin() + rows * N, acc(0));
      std::fill(wk.dk.begin(), wk.dk.begin() + rows * N, acc(0));
      if (c == nc - 1) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = (n - 1) * R + r;
          if (p.dfinal_k) axpy(wk.dk.data() + i * N, acc(1), p.dfinal_k + (bh * R + r) * N, N);
          if (p.dfinal_v) axpy(wk.dx.data() + i * P, acc(1), p.dfinal_v + (bh * R + r) * P, P);
        }
      }
      std::fill(dacs.begin(), dacs.end(), acc(0));
      std::fill(dw.begin(), dw.end(), acc(0));
      std::fill(dgamma.begin(), dgamma.end(), acc(0));
      // Intra-chunk products: d q_i, d k_j, d x_j, d Acs and the mask coefficients.
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t ti = i / R;
        const acc* dyi = wk.dy.data() + i * P;
        const acc* qi = wk.q.data() + i * N;
        acc* dqi = wk.dq.data() + i * N;
        for (int64_t j = 0; j < (ti + 1) * R; ++j) {
          const int64_t tj = j / R;
          const acc dxy = dot(dyi, wk.x.data() + j * P, P);
          const acc cbm = wk.cb[i * ld + j], mm = wk.m[i * ld + j];
          axpy(dqi, dxy * mm, wk.k.data() + j * N, N);
          axpy(wk.dk.data() + j * N, dxy * mm, qi, N);
          axpy(wk.dx.data() + j * P, cbm * mm, dyi, P);
          const acc pij = cbm * dxy, wij = pij * mm;
          dacs[ti] += wij;
          dacs[tj] -= wij;
          if (tj < ti) {
            dw[tj] += pij * std::exp(wk.acs[ti] - wk.acs[tj]);
          } else {
            dgamma[ti] += pij;  // the diagonal's coefficient is gamma_t (no decay)
          }
        }
      }
      // The inter-chunk term e^{Acs_t} S q_i.
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t ti = i / R;
        const acc ri = std::exp(wk.acs[ti]);
        const acc* dyi = wk.dy.data() + i * P;
        const acc* qi = wk.q.data() + i * N;
        acc* dqi = wk.dq.data() + i * N;
        acc s = 0;
        for (int64_t cc = 0; cc < P; ++cc) {
          s += dyi[cc] * dot(S + cc * N, qi, N);
          axpy(dqi, ri * dyi[cc], S + cc * N, N);
        }
        dacs[ti] += ri * s;
      }
      // The state update into the next chunk, whose gradient is dS.
      const acc last = wk.acs[n - 1], kd = std::exp(last);
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t tj = j / R;
        const acc e = std::exp(last - wk.acs[tj]);
        const acc ew = e * wk.w[tj];
        const acc* kj = wk.k.data() + j * N;
        const acc* xj = wk.x.data() + j * P;
        acc* dxj = wk.dx.data() + j * P;
        acc* dkj = wk.dk.data() + j * N;
        acc E = 0;
        for (int64_t cc = 0; cc < P; ++cc) {
          const acc dsk = dot(dS.data() + cc * N, kj, N);
          E += xj[cc] * dsk;
          dxj[cc] += ew * dsk;
          axpy(dkj, ew * xj[cc], dS.data() + cc * N, N);
        }
        dw[tj] += e * E;
        dacs[n - 1] += ew * E;
        dacs[tj] -= ew * E;
      }
      dacs[n - 1] += kd * dot(dS.data(), S, P * N);
      for (int64_t cc = 0; cc < P * N; ++cc) dS_prev[cc] = kd * dS[cc];
      for (int64_t i = 0; i < rows; ++i) {
        const acc ri = std::exp(wk.acs[i / R]);
        const acc* dyi = wk.dy.data() + i * P;
        const acc* qi = wk.q.data() + i * N;
        for (int64_t cc = 0; cc < P; ++cc) axpy(dS_prev.data() + cc * N, ri * dyi[cc], qi, N);
      }
      std::swap(dS, dS_prev);
      // d adt: the reverse cumulative sum of d Acs within the chunk.
      acc run = 0;
      for (int64_t t = n - 1; t >= 0; --t) {
        run += dacs[t];
        p.dadt[row + t0 + t] = run;
      }
      // w = gamma + sigma; gamma_t = lambda_t dt_t; sigma_t = (1 - lambda_{t+1}) dt_{t+1}.
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const acc dg = dgamma[t] + dw[t];
        p.ddt[row + l] += wk.lam[t] * dg;
        dlam[l] += wk.dtv[t] * dg;
        if (l + 1 < L) {
          const acc lam1 = ssmk::sigmoid(p.trap[row + l + 1]);
          p.ddt[row + l + 1] += (acc(1) - lam1) * dw[t];
          dlam[l + 1] -= p.dt[row + l + 1] * dw[t];
        }
      }
      // v mixing, the rotations, and the angle recurrence in reverse.
      std::fill(dtheta.begin(), dtheta.end(), acc(0));
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const T* vr = p.v.data + b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2];
        std::fill(dvacc.begin(), dvacc.end(), acc(0));
        const acc* cs = wk.cs.data() + t * A;
        const acc* sn = wk.sn.data() + t * A;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = t * R + r;
          const acc* dxi = wk.dx.data() + i * P;
          if (p.mimo) {
            const acc* mv = p.mimo_v + (h * R + r) * P;
            for (int64_t cc = 0; cc < P; ++cc) {
              dvacc[cc] += dxi[cc] * mv[cc];
              dmv[r * P + cc] += dxi[cc] * static_cast<acc>(vr[cc * p.v.stride[3]]);
            }
          } else {
            axpy(dvacc.data(), acc(1), dxi, P);
          }
          acc* dqi = wk.dq.data() + i * N;
          acc* dki = wk.dk.data() + i * N;
          rotate_pairs_bwd(dqi, wk.q.data() + i * N, cs, sn, A, dtheta.data() + t * A);
          rotate_pairs_bwd(dki, wk.k.data() + i * N, cs, sn, A, dtheta.data() + t * A);
          axpy(dqb.data() + r * N, acc(1), dqi, N);
          axpy(dkb.data() + r * N, acc(1), dki, N);
          acc* dqo = p.dq + (((b * L + l) * R + r) * H + h) * N;
          acc* dko = p.dk + (((b * L + l) * R + r) * H + h) * N;
          std::copy(dqi, dqi + N, dqo);
          std::copy(dki, dki + N, dko);
        }
        T* dvo = p.dv + ((b * L + l) * H + h) * P;
        for (int64_t cc = 0; cc < P; ++cc) dvo[cc] = static_cast<T>(dvacc[cc]);
      }
      for (int64_t t = n - 1; t >= 0 && A > 0; --t) {
        const int64_t l = t0 + t;
        const acc* ang = p.angles + ((b * L + l) * H + h) * A;
        acc* dang = p.dangles + ((b * L + l) * H + h) * A;
        const acc dt = wk.dtv[t];
        acc ddt = 0;
        for (int64_t j = 0; j < A; ++j) {
          carry[j] += dtheta[t * A + j];
          dang[j] = carry[j] * angle_step_draw(ang[j], dt);
          ddt += carry[j] * angle_step(ang[j], acc(1));
        }
        p.ddt[row + l] += ddt;
      }
    }
    // The initial state: S_init + rho sum_r v_init_r k_init_r^T, rho = (1 - lambda_0) dt_0.
    std::copy(dS.begin(), dS.end(), p.dinit_ssm + bh * P * N);
    std::copy(carry.begin(), carry.end(), p.dinit_angle + bh * A);
    {
      const acc lam0 = ssmk::sigmoid(p.trap[row]), dt0 = p.dt[row];
      const acc rho = (acc(1) - lam0) * dt0;
      acc drho = 0;
      for (int64_t r = 0; r < R; ++r) {
        const acc* kr = p.init_k ? p.init_k + (bh * R + r) * N : nullptr;
        const acc* vr = p.init_v ? p.init_v + (bh * R + r) * P : nullptr;
        acc* dkr = p.dinit_k + (bh * R + r) * N;
        acc* dvr = p.dinit_v + (bh * R + r) * P;
        std::fill(dkr, dkr + N, acc(0));
        for (int64_t cc = 0; cc < P; ++cc) {
          const acc dsk = kr ? dot(dS.data() + cc * N, kr, N) : acc(0);
          dvr[cc] = rho * dsk;
          if (vr) {
            drho += vr[cc] * dsk;
            axpy(dkr, rho * vr[cc], dS.data() + cc * N, N);
          }
        }
      }
      p.ddt[row] += (acc(1) - lam0) * drho;
      dlam[0] -= dt0 * drho;
    }
    for (int64_t l = 0; l < L; ++l) {
      const acc lam = ssmk::sigmoid(p.trap[row + l]);
      p.dtrap[row + l] = dlam[l] * lam * (acc(1) - lam);
    }
    std::copy(dqb.begin(), dqb.end(), p.dq_bias + bh * R * N);
    std::copy(dkb.begin(), dkb.end(), p.dk_bias + bh * R * N);
    p.dD[bh] = dD;
    if (p.mimo) {
      std::copy(dmv.begin(), dmv.end(), p.dmimo_v + bh * R * P);
      std::copy(dmo.begin(), dmo.end(), p.dmimo_o + bh * R * P);
      if (p.dmimo_z) std::copy(dmz.begin(), dmz.end(), p.dmimo_z + bh * R * P);
    }
  }
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename T), (T), (const Mamba3BwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void step_tasks(const Mamba3StepParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  const int64_t H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  std::vector<acc> q(R * N), k(R * N), x(R * P), cs(A), sn(A), o(P);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / H, h = task % H, g = h / (H / p.ngroups);
    T* out = p.out + (b * H + h) * P;
    const int64_t si = p.state_batch_indices ? p.state_batch_indices[b] : b;
    if (si < 0 || si >= p.state_batch) {
      std::fill(out, out + P, T(0));
      continue;
    }
    const acc dt = p.dt[b * H + h], adt = p.adt[b * H + h];
    const acc lam = ssmk::sigmoid(p.trap[b * H + h]);
    const acc alpha = std::exp(adt), beta = (acc(1) - lam) * dt * alpha, gamma = lam * dt;
    acc* theta = p.angle_state.data + si * p.angle_state.stride[0] + h * p.angle_state.stride[1];
    for (int64_t j = 0; j < A; ++j) {
      acc& th = theta[j * p.angle_state.stride[2]];
      th = wrap_angle(th + angle_step(p.angles[(b * H + h) * A + j], dt));
      cs[j] = std::cos(th);
      sn[j] = std::sin(th);
    }
    const T* vr = p.v.data + b * p.v.stride[0] + h * p.v.stride[1];
    for (int64_t r = 0; r < R; ++r) {
      const T* qs = p.q.data + b * p.q.stride[0] + r * p.q.stride[1] + g * p.q.stride[2];
      const T* ks = p.k.data + b * p.k.stride[0] + r * p.k.stride[1] + g * p.k.stride[2];
      acc* qr = q.data() + r * N;
      acc* kr = k.data() + r * N;
      for (int64_t c = 0; c < N; ++c) {
        qr[c] = static_cast<acc>(qs[c * p.q.stride[3]]) + (p.q_bias ? p.q_bias[(h * R + r) * N + c] : acc(0));
        kr[c] = static_cast<acc>(ks[c * p.k.stride[3]]) + (p.k_bias ? p.k_bias[(h * R + r) * N + c] : acc(0));
      }
      rotate_pairs(qr, cs.data(), sn.data(), A);
      rotate_pairs(kr, cs.data(), sn.data(), A);
      for (int64_t c = 0; c < P; ++c) {
        const acc v = static_cast<acc>(vr[c * p.v.stride[2]]);
        x[r * P + c] = p.mimo ? v * p.mimo_v[(h * R + r) * P + c] : v;
      }
    }
    acc* S = p.ssm_state.data + si * p.ssm_state.stride[0] + h * p.ssm_state.stride[1];
    acc* ks = p.k_state.data + si * p.k_state.stride[0] + h * p.k_state.stride[1];
    acc* vs = p.v_state.data + si * p.v_state.stride[0] + h * p.v_state.stride[1];
    const int64_t sp = p.ssm_state.stride[2], sn_ = p.ssm_state.stride[3];
    for (int64_t c = 0; c < P; ++c) {
      for (int64_t e = 0; e < N; ++e) {
        acc prev = 0, cur = 0;
        for (int64_t r = 0; r < R; ++r) {
          prev += vs[r * p.v_state.stride[2] + c * p.v_state.stride[3]] * ks[r * p.k_state.stride[2] + e * p.k_state.stride[3]];
          cur += x[r * P + c] * k[r * N + e];
        }
        acc& s = S[c * sp + e * sn_];
        s = alpha * s + beta * prev + gamma * cur;
      }
    }
    const acc D = p.D ? p.D[h] : acc(0);
    const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + h * p.z.stride[1] : nullptr;
    std::fill(o.begin(), o.end(), acc(0));
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < P; ++c) {
        acc y = D * x[r * P + c];
        for (int64_t e = 0; e < N; ++e) y += S[c * sp + e * sn_] * q[r * N + e];
        if (zr) {
          acc zv = static_cast<acc>(zr[c * p.z.stride[2]]);
          if (p.mimo) zv *= p.mimo_z[(h * R + r) * P + c];
          y *= ssmk::silu(zv);
        }
        o[c] += p.mimo ? y * p.mimo_o[(h * R + r) * P + c] : y;
      }
      for (int64_t e = 0; e < N; ++e) ks[r * p.k_state.stride[2] + e * p.k_state.stride[3]] = k[r * N + e];
      for (int64_t c = 0; c < P; ++c) vs[r * p.v_state.stride[2] + c * p.v_state.stride[3]] = x[r * P + c];
    }
    for (int64_t c = 0; c < P; ++c) out[c] = static_cast<T>(o[c]);
  }
}
SSMK_CPU_MULTIVERSION(step_tasks, (typename T), (T), (const Mamba3StepParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

}  // namespace

template <typename T>
void mamba3_fwd_cpu(const Mamba3FwdParams<T>& p) {
  at::parallel_for(0, p.tasks(), 1, [&](int64_t b, int64_t e) { fwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_bwd_cpu(const Mamba3BwdParams<T>& p) {
  at::parallel_for(0, p.tasks(), 1, [&](int64_t b, int64_t e) { bwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_step_cpu(const Mamba3StepParams<T>& p) {
  at::parallel_for(0, p.batch * p.nheads, 1, [&](int64_t b, int64_t e) { step_tasks_dispatch<T>(p, b, e); });
}

#define SSMK_MAMBA3_INSTANTIATE(T)                               \
  template void mamba3_fwd_cpu<T>(const Mamba3FwdParams<T>&);    \
  template void mamba3_bwd_cpu<T>(const Mamba3BwdParams<T>&);    \
  template void mamba3_step_cpu<T>(const Mamba3StepParams<T>&);
SSMK_FLOAT_TYPES(SSMK_MAMBA3_INSTANTIATE)

}  // namespace ssmk
