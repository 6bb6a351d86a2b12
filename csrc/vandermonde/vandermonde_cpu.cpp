// CPU kernels of the (log-)Vandermonde products, with the factorisation of vandermonde_math.h:
// exp(x (l0 + m K + k)) = exp(x l0) exp(x K)^m exp(x k).
//
// Forward (tasks: row, tile of kTileL outputs, as the CUDA blocks): per tile and n the weight
// c_n exp(x_n l0) exp(x_n K)^m is formed once per block m, so the inner loop over the K offsets
// of a block is one complex multiply-add per (n, l) against the row's table exp(x_n k) (real
// part only when symmetric), vectorised over k.
// Transpose (tasks: runs of up to kGroup n of one row): per block, P_n = sum_k u_{l} exp(x_n k)
// vectorised over n (table stored [k][n]), then added with its anchor in double; per tile the
// partial sum is formed first and added to the total in tile order, the order of the CUDA
// reduction kernel (bitwise reproducible).
#include <ATen/Parallel.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "common/parallel.h"
#include "common/static_switch.h"
#include "vandermonde/vandermonde.h"

namespace ssmk {
namespace {

using vandermonde::Cd;
using vandermonde::cmul;
using vandermonde::exp_xl;
constexpr int64_t K = vandermonde::kBlockK;
constexpr int64_t kBlocks = vandermonde::kBlocksPerTile;
constexpr int64_t kTile = vandermonde::kTileL;

template <typename T>
struct FwdScratch {
  std::vector<T> br, bi;  // [N][K] table exp(x_n k)
  std::vector<Cd> sk;     // [N] exp(x_n K)
  std::vector<T> cr, ci;  // [kBlocks][N] block weights
  int64_t row = -1;
};

template <typename T, bool kSym>
SSMK_CPU_INLINE void fwd_tasks(const VandermondeFwdParams<T>& p, FwdScratch<T>& s, int64_t begin,
                               int64_t end) {
  using C = c10::complex<T>;
  const int64_t N = p.N, L = p.L;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.num_tiles, l0 = (task % p.num_tiles) * kTile;
    const C* x = p.x.data + b * p.x.stride[0];
    const C* c = p.c.data + b * p.c.stride[0];
    if (s.row != b) {
      for (int64_t n = 0; n < N; ++n) {
        const C xn = x[n * p.x.stride[1]];
        s.sk[n] = vandermonde::power_table(xn.real(), xn.imag(), [&](int k, Cd e) {
          s.br[n * K + k] = static_cast<T>(e.re);
          s.bi[n * K + k] = static_cast<T>(e.im);
        });
      }
      s.row = b;
    }
    const int64_t blocks = std::min<int64_t>(kBlocks, (L - l0 + K - 1) / K);
    for (int64_t n = 0; n < N; ++n) {
      const C xn = x[n * p.x.stride[1]], cn = c[n * p.c.stride[1]];
      Cd a = cmul({cn.real(), cn.imag()}, exp_xl(xn.real(), xn.imag(), static_cast<double>(l0)));
      for (int64_t m = 0; m < blocks; ++m) {
        s.cr[m * N + n] = static_cast<T>(a.re);
        s.ci[m * N + n] = static_cast<T>(a.im);
        a = cmul(a, s.sk[n]);
      }
    }
    for (int64_t m = 0; m < blocks; ++m) {
      const int64_t lm = l0 + m * K, nk = std::min(K, L - lm);
      alignas(64) T accr[K] = {};
      alignas(64) T acci[K] = {};
      const T* cr = s.cr.data() + m * N;
      const T* ci = s.ci.data() + m * N;
      for (int64_t n = 0; n < N; ++n) {
        const T wr = cr[n], wi = ci[n];
        const T* br = s.br.data() + n * K;
        const T* bi = s.bi.data() + n * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          accr[k] += wr * br[k] - wi * bi[k];
          if (!kSym) acci[k] += wr * bi[k] + wi * br[k];
        }
      }
      if (kSym) {
        T* out = p.out_real + b * L + lm;
        for (int64_t k = 0; k < nk; ++k) out[k] = T(2) * accr[k];
      } else {
        C* out = p.out + b * L + lm;
        for (int64_t k = 0; k < nk; ++k) out[k] = C(accr[k], acci[k]);
      }
    }
  }
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T, bool kSym), (T, kSym),
                      (const VandermondeFwdParams<T>& p, FwdScratch<T>& s, int64_t begin, int64_t end),
                      (p, s, begin, end))

}  // namespace

template <typename T>
void vandermonde_fwd_cpu(const VandermondeFwdParams<T>& p) {
  SSMK_BOOL_SWITCH(p.symmetric, kSym, [&] {
    cpu::parallel_items(p.batch * p.num_tiles, p.L / std::max<int64_t>(1, p.num_tiles) * p.N, [&](int64_t begin, int64_t end) {
      FwdScratch<T> s;
      s.br.resize(p.N * K);
      s.bi.resize(p.N * K);
      s.sk.resize(p.N);
      s.cr.resize(kBlocks * p.N);
      s.ci.resize(kBlocks * p.N);
      fwd_tasks_dispatch<T, kSym>(p, s, begin, end);
    });
  });
}

namespace {

// n per transpose task: the table [K][kGroup] and the block sums stay in L1.
constexpr int64_t kGroup = 64;

template <typename T>
struct TScratch {
  std::vector<T> ur, ui, wr, wi;  // row of u and of l * u
  int64_t row = -1;
};

template <typename T, bool kT1>
SSMK_CPU_INLINE void t_tasks(const VandermondeTransposeParams<T>& p, TScratch<T>& s, int64_t begin, int64_t end) {
  using C = c10::complex<T>;
  const int64_t N = p.N, L = p.L;
  const int64_t groups = (N + kGroup - 1) / kGroup;
  alignas(64) T btr[K][kGroup], bti[K][kGroup];
  alignas(64) T pr[kGroup], pi[kGroup], qr[kGroup], qi[kGroup];
  Cd sk[kGroup], anchor[kGroup], part[kGroup], part1[kGroup], tot[kGroup], tot1[kGroup];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / groups, n0 = (task % groups) * kGroup;
    const int64_t G = std::min(kGroup, N - n0);
    const int64_t Gv = (G + 7) / 8 * 8;  // lanes computed: G rounded up to a vector
    const C* x = p.x.data + b * p.x.stride[0] + n0 * p.x.stride[1];
    if (s.row != b) {
      const C* u = p.u.data + b * p.u.stride[0];
      for (int64_t l = 0; l < L; ++l) {
        const C ul = u[l * p.u.stride[1]];
        s.ur[l] = ul.real();
        s.ui[l] = ul.imag();
        if (kT1) {
          s.wr[l] = static_cast<T>(l) * ul.real();
          s.wi[l] = static_cast<T>(l) * ul.imag();
        }
      }
      s.row = b;
    }
    for (int64_t i = 0; i < Gv; ++i) {  // padding lanes compute with x = 0 and are dropped
      const C xn = i < G ? x[i * p.x.stride[1]] : C(0, 0);
      sk[i] = vandermonde::power_table(xn.real(), xn.imag(), [&](int k, Cd e) {
        btr[k][i] = static_cast<T>(e.re);
        bti[k][i] = static_cast<T>(e.im);
      });
      tot[i] = tot1[i] = Cd{0.0, 0.0};
    }
    for (int64_t l0 = 0; l0 < L; l0 += kTile) {
      for (int64_t i = 0; i < Gv; ++i) {
        const C xn = i < G ? x[i * p.x.stride[1]] : C(0, 0);
        anchor[i] = exp_xl(xn.real(), xn.imag(), static_cast<double>(l0));
        part[i] = part1[i] = Cd{0.0, 0.0};
      }
      const int64_t blocks = std::min<int64_t>(kBlocks, (L - l0 + K - 1) / K);
      for (int64_t m = 0; m < blocks; ++m) {
        const int64_t lm = l0 + m * K, nk = std::min(K, L - lm);
        for (int64_t i = 0; i < Gv; ++i) pr[i] = pi[i] = qr[i] = qi[i] = T(0);
        for (int64_t k = 0; k < nk; ++k) {
          const T ar = s.ur[lm + k], ai = s.ui[lm + k];
#pragma omp simd
          for (int64_t i = 0; i < Gv; ++i) {
            pr[i] += ar * btr[k][i] - ai * bti[k][i];
            pi[i] += ar * bti[k][i] + ai * btr[k][i];
          }
          if (kT1) {
            const T cr = s.wr[lm + k], ci = s.wi[lm + k];
#pragma omp simd
            for (int64_t i = 0; i < Gv; ++i) {
              qr[i] += cr * btr[k][i] - ci * bti[k][i];
              qi[i] += cr * bti[k][i] + ci * btr[k][i];
            }
          }
        }
        for (int64_t i = 0; i < Gv; ++i) {
          const Cd pa = cmul(anchor[i], {pr[i], pi[i]});
          part[i].re += pa.re;
          part[i].im += pa.im;
          if (kT1) {
            const Cd qa = cmul(anchor[i], {qr[i], qi[i]});
            part1[i].re += qa.re;
            part1[i].im += qa.im;
          }
          anchor[i] = cmul(anchor[i], sk[i]);
        }
      }
      for (int64_t i = 0; i < Gv; ++i) {
        tot[i].re += part[i].re;
        tot[i].im += part[i].im;
        tot1[i].re += part1[i].re;
        tot1[i].im += part1[i].im;
      }
    }
    C* t = p.t + b * N + n0;
    for (int64_t i = 0; i < G; ++i) t[i] = C(static_cast<T>(tot[i].re), static_cast<T>(tot[i].im));
    if (kT1) {
      C* t1 = p.t1 + b * N + n0;
      for (int64_t i = 0; i < G; ++i) t1[i] = C(static_cast<T>(tot1[i].re), static_cast<T>(tot1[i].im));
    }
  }
}
SSMK_CPU_MULTIVERSION(t_tasks, (typename T, bool kT1), (T, kT1),
                      (const VandermondeTransposeParams<T>& p, TScratch<T>& s, int64_t begin, int64_t end),
                      (p, s, begin, end))

}  // namespace

template <typename T>
void vandermonde_transpose_cpu(const VandermondeTransposeParams<T>& p) {
  const int64_t groups = (p.N + kGroup - 1) / kGroup;
  SSMK_BOOL_SWITCH(p.with_t1, kT1, [&] {
    cpu::parallel_items(p.batch * groups, kGroup * p.L, [&](int64_t begin, int64_t end) {
      TScratch<T> s;
      s.ur.resize(p.L);
      s.ui.resize(p.L);
      if (kT1) {
        s.wr.resize(p.L);
        s.wi.resize(p.L);
      }
      t_tasks_dispatch<T, kT1>(p, s, begin, end);
    });
  });
}

template void vandermonde_fwd_cpu<float>(const VandermondeFwdParams<float>&);
template void vandermonde_fwd_cpu<double>(const VandermondeFwdParams<double>&);
template void vandermonde_transpose_cpu<float>(const VandermondeTransposeParams<float>&);
template void vandermonde_transpose_cpu<double>(const VandermondeTransposeParams<double>&);

}  // namespace ssmk
