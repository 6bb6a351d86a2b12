// CPU kernels of the S4 Cauchy product. z (and, in the backward, conj(dout)) are split once into
// real/imaginary arrays in the accumulation dtype, so the inner loops run over contiguous l with
// the per-n values of v and w broadcast, and vectorise (AVX2: 8 complex terms per instruction in
// complex64). Forward: tasks are (row, tile of kTileL outputs), as the CUDA blocks. Backward:
// tasks are runs of (row, n); each walks l in chunks of kChunkL and adds the chunk sums in chunk
// order in double, the order the CUDA reduction kernel uses (bitwise reproducible).
#include <ATen/Parallel.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <vector>

#include "cauchy/cauchy.h"
#include "common/cpu.h"
#include "common/parallel.h"
#include "common/static_switch.h"

namespace ssmk {
namespace {

template <typename T, bool kSym>
SSMK_CPU_INLINE void fwd_tasks(const CauchyFwdParams<T>& p, const T* zr, const T* zi, int64_t begin,
                               int64_t end) {
  using C = c10::complex<T>;
  constexpr int64_t kTile = cauchy::kTileL;
  const int64_t tiles = (p.L + kTile - 1) / kTile;
  alignas(64) T a1r[kTile], a1i[kTile], a2r[kTile], a2i[kTile];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / tiles, l0 = (task % tiles) * kTile;
    const int64_t nl = std::min(kTile, p.L - l0);
    const C* v = p.v.data + b * p.v.stride[0];
    const C* w = p.w.data + b * p.w.stride[0];
    const T* zrt = zr + l0;
    const T* zit = zi + l0;
    for (int64_t j = 0; j < nl; ++j) a1r[j] = a1i[j] = a2r[j] = a2i[j] = T(0);
    for (int64_t n = 0; n < p.N; ++n) {
      const C vn = v[n * p.v.stride[1]], wn = w[n * p.w.stride[1]];
      const T vr = vn.real(), vi = vn.imag(), wr = wn.real(), wi = wn.imag();
#pragma omp simd
      for (int64_t j = 0; j < nl; ++j) {
        cauchy::fwd_term<kSym>(zrt[j], zit[j], vr, vi, wr, wi, a1r[j], a1i[j], a2r[j], a2i[j]);
      }
    }
    C* out = p.out + b * p.L + l0;
    for (int64_t j = 0; j < nl; ++j) out[j] = C(a1r[j] + a2r[j], a1i[j] + a2i[j]);
  }
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T, bool kSym), (T, kSym),
                      (const CauchyFwdParams<T>& p, const T* zr, const T* zi, int64_t begin, int64_t end),
                      (p, zr, zi, begin, end))

// The n of one row handled together, so that each chunk of z and conj(dout) is read from cache
// for all of them.
constexpr int64_t kBwdGroup = 16;

template <typename T, bool kSym>
SSMK_CPU_INLINE void bwd_tasks(const CauchyBwdParams<T>& p, const T* zr, const T* zi, T* gr, T* gi,
                               int64_t begin, int64_t end) {
  using C = c10::complex<T>;
  constexpr int64_t kChunk = cauchy::kChunkL;
  const int64_t L = p.L;
  int64_t loaded_row = -1;
  int64_t idx = begin;
  while (idx < end) {
    const int64_t b = idx / p.N, n0 = idx % p.N;
    const int64_t count = std::min({kBwdGroup, end - idx, p.N - n0});
    if (b != loaded_row) {
      const C* g = p.dout.data + b * p.dout.stride[0];
      for (int64_t l = 0; l < L; ++l) {
        const C gl = g[l * p.dout.stride[1]];
        gr[l] = gl.real();
        gi[l] = -gl.imag();  // conj(dout)
      }
      loaded_row = b;
    }
    const C* v = p.v.data + b * p.v.stride[0];
    const C* w = p.w.data + b * p.w.stride[0];
    double sums[kBwdGroup][8] = {};
    for (int64_t l0 = 0; l0 < L; l0 += kChunk) {
      const int64_t nl = std::min(kChunk, L - l0);
      for (int64_t i = 0; i < count; ++i) {
        const C wn = w[(n0 + i) * p.w.stride[1]];
        const T wr = wn.real(), wi = wn.imag();
        T Ar = 0, Ai = 0, A2r = 0, A2i = 0, Br = 0, Bi = 0, B2r = 0, B2i = 0;
#pragma omp simd reduction(+ : Ar, Ai, A2r, A2i, Br, Bi, B2r, B2i)
        for (int64_t j = 0; j < nl; ++j) {
          cauchy::bwd_term<kSym>(zr[l0 + j], zi[l0 + j], gr[l0 + j], gi[l0 + j], wr, wi, Ar, Ai,
                                 A2r, A2i, Br, Bi, B2r, B2i);
        }
        double* s = sums[i];
        s[0] += Ar;
        s[1] += Ai;
        s[2] += A2r;
        s[3] += A2i;
        s[4] += Br;
        s[5] += Bi;
        s[6] += B2r;
        s[7] += B2i;
      }
    }
    C* dv = p.dv + b * p.N;
    C* dw = p.dw + b * p.N;
    for (int64_t i = 0; i < count; ++i) {
      const C vn = v[(n0 + i) * p.v.stride[1]];
      double dvr, dvi, dwr, dwi;
      cauchy::grads_from_sums(sums[i], vn.real(), vn.imag(), kSym, dvr, dvi, dwr, dwi);
      dv[n0 + i] = C(static_cast<T>(dvr), static_cast<T>(dvi));
      dw[n0 + i] = C(static_cast<T>(dwr), static_cast<T>(dwi));
    }
    idx += count;
  }
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename T, bool kSym), (T, kSym),
                      (const CauchyBwdParams<T>& p, const T* zr, const T* zi, T* gr, T* gi, int64_t begin,
                       int64_t end),
                      (p, zr, zi, gr, gi, begin, end))

template <typename T>
void split_z(const CauchyCommon<T>& p, std::vector<T>& zr, std::vector<T>& zi) {
  zr.resize(p.L);
  zi.resize(p.L);
  for (int64_t l = 0; l < p.L; ++l) {
    zr[l] = p.z.data[l * p.z.stride[0]].real();
    zi[l] = p.z.data[l * p.z.stride[0]].imag();
  }
}

}  // namespace

template <typename T>
void cauchy_fwd_cpu(const CauchyFwdParams<T>& p) {
  std::vector<T> zr, zi;
  split_z(p, zr, zi);
  const int64_t tiles = (p.L + cauchy::kTileL - 1) / cauchy::kTileL;
  SSMK_BOOL_SWITCH(p.symmetric, kSym, [&] {
    cpu::parallel_items(p.batch * tiles, cauchy::kTileL * p.N, [&](int64_t begin, int64_t end) {
      fwd_tasks_dispatch<T, kSym>(p, zr.data(), zi.data(), begin, end);
    });
  });
}

template <typename T>
void cauchy_bwd_cpu(const CauchyBwdParams<T>& p) {
  std::vector<T> zr, zi;
  split_z(p, zr, zi);
  SSMK_BOOL_SWITCH(p.symmetric, kSym, [&] {
    cpu::parallel_items(p.batch * p.N, p.L, [&](int64_t begin, int64_t end) {
      std::vector<T> gr(p.L), gi(p.L);
      bwd_tasks_dispatch<T, kSym>(p, zr.data(), zi.data(), gr.data(), gi.data(), begin, end);
    });
  });
}

template void cauchy_fwd_cpu<float>(const CauchyFwdParams<float>&);
template void cauchy_fwd_cpu<double>(const CauchyFwdParams<double>&);
template void cauchy_bwd_cpu<float>(const CauchyBwdParams<float>&);
template void cauchy_bwd_cpu<double>(const CauchyBwdParams<double>&);

}  // namespace ssmk
