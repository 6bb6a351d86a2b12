// CPU kernels of mamba3_scan and mamba3_step: the per-task kernels of mamba3_task.h over
// at::parallel_for, each thread with its own scratch area, in AVX2+FMA variants chosen at run
// time (common/cpu.h).
#include "common/aten.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

// A block of up to kBlockChunks chunks of one task in per-thread buffers: rows i = t R + r of
// chunk c at c Q R + i, the rows past a short last chunk zero (so the batched products over the
// block's chunks need no special case), and the per-step coefficients at c Q + t.
constexpr int64_t kBlockChunks = 16;

template <typename acc>
struct Block {
  int64_t Q, R, QR, N, P, A, chunks;
  at::Tensor q, k, x, xe, cbm, y, yi, states;  // [C, QR, N|P], [C, QR, QR], [C, P, N]
  std::vector<acc> cs, sn, lam, dtv, gam, w, acs;  // [C Q (A)]
  std::vector<acc> scratch;                    // backs a Work whose pointers are moved per chunk
  std::vector<int64_t> len;                    // steps of each chunk
  Block(const Mamba3Dims& d, at::ScalarType dtype)
      : Q(d.chunk), R(d.rank), QR(d.chunk * d.rank), N(d.headdim_qk), P(d.headdim_v), A(d.nangles),
        chunks(std::min<int64_t>(kBlockChunks, d.nchunks())) {
    const auto o = at::TensorOptions().dtype(dtype);
    q = at::empty({chunks, QR, N}, o);
    k = at::empty({chunks, QR, N}, o);
    x = at::empty({chunks, QR, P}, o);
    xe = at::empty({chunks, QR, P}, o);
    cbm = at::empty({chunks, QR, QR}, o);
    y = at::empty({chunks, QR, P}, o);
    yi = at::empty({chunks, QR, P}, o);
    states = at::empty({chunks, P, N}, o);
    for (auto* v : {&lam, &dtv, &gam, &w, &acs}) v->resize(chunks * Q);
    cs.resize(chunks * Q * A);
    sn.resize(chunks * Q * A);
    scratch.resize(mamba3::Work<acc>::size(d));
    len.resize(chunks);
  }
  acc* ptr(const at::Tensor& t, int64_t c, int64_t rowlen) const { return t.data_ptr<acc>() + c * QR * rowlen; }
  acc* state(int64_t c) const { return states.data_ptr<acc>() + c * P * N; }
  // Loads chunk c of the block (steps t0 .. t0+n-1) with mamba3::load_chunk, then zeroes its pad.
  template <typename T>
  void load(const Mamba3Inputs<T>& p, int64_t b, int64_t h, int64_t c, int64_t t0, int64_t n, acc* theta) {
    mamba3::Work<acc> wk(p, scratch.data());
    wk.q = ptr(q, c, N);
    wk.k = ptr(k, c, N);
    wk.x = ptr(x, c, P);
    wk.cs = cs.data() + c * Q * A;
    wk.sn = sn.data() + c * Q * A;
    wk.lam = lam.data() + c * Q;
    wk.dtv = dtv.data() + c * Q;
    wk.gam = gam.data() + c * Q;
    wk.w = w.data() + c * Q;
    wk.acs = acs.data() + c * Q;
    mamba3::load_chunk(p, b, h, t0, n, theta, wk);
    len[c] = n;
    if (n < Q) {
      std::fill(wk.q + n * R * N, wk.q + QR * N, acc(0));
      std::fill(wk.k + n * R * N, wk.k + QR * N, acc(0));
      std::fill(wk.x + n * R * P, wk.x + QR * P, acc(0));
      for (int64_t t = n; t < Q; ++t) {
        wk.lam[t] = wk.dtv[t] = wk.gam[t] = wk.w[t] = acc(0);
        wk.acs[t] = wk.acs[n - 1];
      }
    }
  }
  // cbm[c] <- (q k^T) masked: e^{Acs_t - Acs_s} w_s below the diagonal steps, gamma_t on them.
  // Rows of one step share their mask row (computed once, vectorised).
  void mask(int64_t nb, acc* drow) {
    for (int64_t c = 0; c < nb; ++c) {
      const acc* ac = acs.data() + c * Q;
      const acc* wc = w.data() + c * Q;
      acc* m = ptr(cbm, c, QR);
      for (int64_t ti = 0; ti < Q; ++ti) {
        const acc at = ac[ti];
#pragma omp simd
        for (int64_t tj = 0; tj < ti; ++tj) drow[tj] = mamba3::exp_(at - ac[tj]) * wc[tj];
        drow[ti] = gam[c * Q + ti];
        for (int64_t r = 0; r < R; ++r) {
          acc* row = m + (ti * R + r) * QR;
          if (R == 1) {
#pragma omp simd
            for (int64_t j = 0; j <= ti; ++j) row[j] *= drow[j];
          } else {
            for (int64_t j = 0; j < (ti + 1) * R; ++j) row[j] *= drow[j / R];
          }
          std::fill(row + (ti + 1) * R, row + QR, acc(0));
        }
      }
    }
  }
};

// One forward task in blocks of chunks: per block, the batched products cbm = q k^T (masked),
// y = cbm x, the chunk-local states x_e^T k (x_e = e^{Acs_last - Acs_s} w_s x), the scan of the
// states across the block's chunks, and e^{Acs_t} St_prev q (the inter-chunk term).
template <typename T>
SSMK_CPU_INLINE void fwd_task_blocked(const Mamba3FwdParams<T>& p, int64_t task, Block<acc_t<T>>& bk,
                                      acc_t<T>* S, acc_t<T>* theta, acc_t<T>* o, acc_t<T>* drow) {
  using acc = acc_t<T>;
  const int64_t L = p.seqlen, H = p.nheads, R = p.rank, N = p.headdim_qk, P = p.headdim_v, A = p.nangles;
  const int64_t Q = p.chunk, QR = bk.QR, nc = p.nchunks();
  const int64_t b = task / H, h = task % H, bh = b * H + h;
  mamba3::initial_state(p, b, h, S, theta);
  const acc D = p.D ? p.D[h] : acc(0);
  for (int64_t c0 = 0; c0 < nc; c0 += bk.chunks) {
    const int64_t nb = std::min(bk.chunks, nc - c0);
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t t0 = (c0 + c) * Q;
      bk.load(p, b, h, c, t0, std::min(Q, L - t0), theta);
    }
    const at::Tensor q = bk.q.narrow(0, 0, nb), k = bk.k.narrow(0, 0, nb), x = bk.x.narrow(0, 0, nb);
    at::Tensor cbm = bk.cbm.narrow(0, 0, nb), y = bk.y.narrow(0, 0, nb), yi = bk.yi.narrow(0, 0, nb);
    at::Tensor xe = bk.xe.narrow(0, 0, nb), st = bk.states.narrow(0, 0, nb);
    at::bmm_out(cbm, q, k.transpose(1, 2));
    bk.mask(nb, drow);
    at::bmm_out(y, cbm, x);
    for (int64_t c = 0; c < nb; ++c) {
      const acc* ac = bk.acs.data() + c * Q;
      const acc last = ac[Q - 1];
      const acc* xc = bk.ptr(bk.x, c, P);
      acc* xec = bk.ptr(bk.xe, c, P);
      for (int64_t j = 0; j < QR; ++j) {
        const acc e = mamba3::exp_(last - ac[j / R]) * bk.w[c * Q + j / R];
#pragma omp simd
        for (int64_t cc = 0; cc < P; ++cc) xec[j * P + cc] = e * xc[j * P + cc];
      }
    }
    at::bmm_out(st, xe.transpose(1, 2), k);
    // The scan: states[c] <- the state before chunk c; S <- the state after the block.
    for (int64_t c = 0; c < nb; ++c) {
      acc* sc = bk.state(c);
      const acc kd = mamba3::exp_(bk.acs[c * Q + Q - 1]);
#pragma omp simd
      for (int64_t j = 0; j < P * N; ++j) {
        const acc local = sc[j];
        sc[j] = S[j];
        S[j] = kd * S[j] + local;
      }
    }
    at::bmm_out(yi, q, st.transpose(1, 2));
    // y = intra + e^{Acs_t} inter + D x, then the gate and the output mixing.
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t t0 = (c0 + c) * Q, n = bk.len[c];
      const acc* yc = bk.ptr(bk.y, c, P);
      const acc* yic = bk.ptr(bk.yi, c, P);
      const acc* xc = bk.ptr(bk.x, c, P);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t l = t0 + t;
        const acc ri = mamba3::exp_(bk.acs[c * Q + t]);
        const T* zr = p.z.data ? p.z.data + b * p.z.stride[0] + l * p.z.stride[1] + h * p.z.stride[2] : nullptr;
        std::fill(o, o + P, acc(0));
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = (t * R + r) * P;
          const acc* mz = p.mimo ? p.mimo_z + (h * R + r) * P : nullptr;
          const acc* mo = p.mimo ? p.mimo_o + (h * R + r) * P : nullptr;
          for (int64_t cc = 0; cc < P; ++cc) {
            acc yv = yc[i + cc] + ri * yic[i + cc] + D * xc[i + cc];
            if (zr) {
              acc zv = static_cast<acc>(zr[cc * p.z.stride[3]]);
              if (mz) zv *= mz[cc];
              yv *= ssmk::silu(zv);
            }
            o[cc] += mo ? yv * mo[cc] : yv;
          }
        }
        T* out = p.out + ((b * L + l) * H + h) * P;
        for (int64_t cc = 0; cc < P; ++cc) out[cc] = static_cast<T>(o[cc]);
      }
      if (c0 + c == nc - 1) {
        std::copy(bk.ptr(bk.k, c, N) + (n - 1) * R * N, bk.ptr(bk.k, c, N) + n * R * N, p.final_k + bh * R * N);
        std::copy(xc + (n - 1) * R * P, xc + n * R * P, p.final_v + bh * R * P);
      }
    }
  }
  std::copy(S, S + P * N, p.final_ssm + bh * P * N);
  std::copy(theta, theta + A, p.final_angle + bh * A);
}

template <typename T>
SSMK_CPU_INLINE void fwd_tasks(const Mamba3FwdParams<T>& p, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  Block<acc> bk(p, c10::CppTypeToScalarType<acc>::value);
  std::vector<acc> s(p.headdim_v * p.headdim_qk + p.nangles + p.headdim_v + p.chunk);
  acc* S = s.data();
  acc* theta = S + p.headdim_v * p.headdim_qk;
  acc* o = theta + p.nangles;
  acc* drow = o + p.headdim_v;
  for (int64_t task = begin; task < end; ++task) fwd_task_blocked(p, task, bk, S, theta, o, drow);
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T), (T), (const Mamba3FwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void bwd_tasks(const Mamba3BwdParams<T>& p, int64_t begin, int64_t end) {
  std::vector<acc_t<T>> scratch(mamba3::bwd_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::bwd_task(p, task, scratch.data());
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename T), (T), (const Mamba3BwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void step_tasks(const Mamba3StepParams<T>& p, int64_t begin, int64_t end) {
  std::vector<acc_t<T>> scratch(mamba3::step_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::step_task(p, task, scratch.data());
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
