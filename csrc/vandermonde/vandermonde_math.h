// Math of the S4D (log-)Vandermonde kernels, shared by the CPU and CUDA kernels.
//
//   forward:    y_l = sum_n c_n exp(x_n l),   l = 0..L-1
//   transpose:  T_n = sum_l u_l exp(x_n l),  T1_n = sum_l l u_l exp(x_n l)
//
// Powers. exp(x l) is never evaluated per element. l is split as l = l0 + m K + k with a tile
// start l0 (a multiple of kTileL), a block m < kBlocksPerTile and an offset k < K = kBlockK:
//   exp(x l) = exp(x l0) * exp(x K)^m * exp(x k)
// exp(x l0) is evaluated directly in double at every tile (the periodic re-anchoring: the error
// never grows with l); exp(x K)^m and the table exp(x k), k < K, are built by repeated
// multiplication in double (at most 31 steps each, error below 1e-14); only the final factors are
// rounded to the input precision, so a complex64 term carries about three float32 roundings
// whatever l is. For float32 x, x l0 is exact in double (24 + 31 bits), and sin/cos of it are
// evaluated with full argument reduction, so large Im x (|Im x| up to pi L) costs no accuracy.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace ssmk::vandermonde {

constexpr int kBlockK = 32;
constexpr int kBlocksPerTile = 32;
constexpr int kTileL = kBlockK * kBlocksPerTile;

struct Cd {
  double re, im;
};

SSMK_HOST_DEVICE Cd cmul(Cd a, Cd b) { return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re}; }

// exp(x * l) evaluated directly in double.
SSMK_HOST_DEVICE Cd exp_xl(double xr, double xi, double l) {
  using std::cos;
  using std::exp;
  using std::sin;
  const double mag = exp(xr * l);
  const double ph = xi * l;
  return {mag * cos(ph), mag * sin(ph)};
}

// Calls emit(k, exp(x k)) for k < kBlockK (repeated multiplication by exp(x) in double) and
// returns exp(x K) (direct).
template <typename Emit>
SSMK_HOST_DEVICE Cd power_table(double xr, double xi, Emit&& emit) {
  const Cd step = exp_xl(xr, xi, 1.0);
  Cd p{1.0, 0.0};
  for (int k = 0; k < kBlockK; ++k) {
    emit(k, p);
    p = cmul(p, step);
  }
  return exp_xl(xr, xi, static_cast<double>(kBlockK));
}

}  // namespace ssmk::vandermonde
