// Per-element math of the S4 Cauchy kernel, shared by the CPU and CUDA kernels.
//
//   y[b, l] = sum_n v_n / (z_l - w_n)  [+ conj(v_n) / (z_l - conj(w_n)) when symmetric]
//
// Complex numbers are handled as split real/imaginary parts so that the CPU loops over l
// vectorise and the GPU keeps everything in registers. 1/d is formed as conj(d) / |d|^2 (one real
// division per term). The two conjugate terms share Re(z_l - w_n) but are accumulated in separate
// accumulators: adding them per term first would subtract nearly equal imaginary parts whenever
// Im(w_n) is small and lose precision.
//
// Backward (PyTorch's convention: the gradient of a real loss is dL/dRe + i dL/dIm), with
// gbar = conj(dout_l):
//   A_n  = sum_l gbar_l / (z_l - w_n),      A2_n = sum_l gbar_l / (z_l - w_n)^2
//   Bs_n = sum_l gbar_l / (z_l - conj w_n), B2_n = sum_l gbar_l / (z_l - conj w_n)^2
//   dv_n = conj(A_n) + Bs_n,   dw_n = conj(v_n A2_n) + conj(v_n) B2_n
// (the first term is holomorphic in (v, w), the conjugate term anti-holomorphic; see
// docs/s4_kernels.md for the derivation).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace ssmk::cauchy {

// Outputs per CPU task and per CUDA block of the forward (a tile of l).
constexpr int kTileL = 256;
// The backward sums over l in chunks of kChunkL: each chunk gives a partial sum per (b, n) in the
// accumulation dtype, and the partials are added in chunk order in double precision. The CPU
// walks the chunks in order inside one task; the GPU computes them in separate blocks and a
// second kernel adds them in the same order, so both are bitwise reproducible run to run.
constexpr int kChunkL = 2048;

// Adds v / (z - w) (and conj(v) / (z - conj(w)) if kSym) to the accumulators.
template <bool kSym, typename T>
SSMK_HOST_DEVICE void fwd_term(T zr, T zi, T vr, T vi, T wr, T wi, T& a1r, T& a1i, T& a2r,
                               T& a2i) {
  const T dr = zr - wr;
  const T di1 = zi - wi;
  const T q = dr * dr;
  const T inv1 = T(1) / (q + di1 * di1);
  // v * conj(d1) / |d1|^2
  a1r += (vr * dr + vi * di1) * inv1;
  a1i += (vi * dr - vr * di1) * inv1;
  if (kSym) {
    const T di2 = zi + wi;
    const T inv2 = T(1) / (q + di2 * di2);
    // conj(v) * conj(d2) / |d2|^2 with d2 = z - conj(w)
    a2r += (vr * dr - vi * di2) * inv2;
    a2i += -(vi * dr + vr * di2) * inv2;
  }
}

// Backward accumulation at one (n, l): gbar = conj(dout_l).
// acc[0..1] = A, acc[2..3] = A2, acc[4..5] = Bs, acc[6..7] = B2 (real, imaginary).
template <bool kSym, typename T>
SSMK_HOST_DEVICE void bwd_term(T zr, T zi, T gr, T gi, T wr, T wi, T& Ar, T& Ai, T& A2r, T& A2i,
                               T& Br, T& Bi, T& B2r, T& B2i) {
  const T dr = zr - wr;
  const T di1 = zi - wi;
  const T q = dr * dr;
  const T s1 = T(1) / (q + di1 * di1);
  const T p1r = dr * s1, p1i = -di1 * s1;  // 1 / (z - w)
  const T t1r = gr * p1r - gi * p1i;       // gbar / (z - w)
  const T t1i = gr * p1i + gi * p1r;
  Ar += t1r;
  Ai += t1i;
  A2r += t1r * p1r - t1i * p1i;
  A2i += t1r * p1i + t1i * p1r;
  if (kSym) {
    const T di2 = zi + wi;
    const T s2 = T(1) / (q + di2 * di2);
    const T p2r = dr * s2, p2i = -di2 * s2;  // 1 / (z - conj w)
    const T t2r = gr * p2r - gi * p2i;
    const T t2i = gr * p2i + gi * p2r;
    Br += t2r;
    Bi += t2i;
    B2r += t2r * p2r - t2i * p2i;
    B2i += t2r * p2i + t2i * p2r;
  }
}

// dv, dw from the four sums (in double: the cross-chunk accumulation type).
SSMK_HOST_DEVICE void grads_from_sums(const double* s, double vr, double vi, bool sym, double& dvr,
                                      double& dvi, double& dwr, double& dwi) {
  // conj(A) and conj(v * A2)
  dvr = s[0];
  dvi = -s[1];
  dwr = vr * s[2] - vi * s[3];
  dwi = -(vr * s[3] + vi * s[2]);
  if (sym) {
    dvr += s[4];
    dvi += s[5];
    // conj(v) * B2
    dwr += vr * s[6] + vi * s[7];
    dwi += vr * s[7] - vi * s[6];
  }
}

}  // namespace ssmk::cauchy
