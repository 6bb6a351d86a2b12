// Per-element math of the Mamba-3 scan, shared by the CPU and CUDA kernels.
//
// Per (batch b, value head h), with lambda_t = sigmoid(trap_t) (Lahoti et al. 2026, "Mamba-3",
// arXiv 2603.15569, Sec. 3.1, the exponential-trapezoidal rule; mamba_ssm's mamba3_siso_step_ref):
//   S_t = e^{adt_t} S_{t-1} + (1 - lambda_t) dt_t e^{adt_t} v_{t-1} k_{t-1}^T + lambda_t dt_t v_t k_t^T
//   y_t = S_t q_t + D v_t
// With gamma_t = lambda_t dt_t, sigma_t = (1 - lambda_{t+1}) dt_{t+1} (0 past the end) and
// w_t = gamma_t + sigma_t, the shifted state St_t = S_t + sigma_t v_t k_t^T obeys the plain SSD
// recurrence St_t = e^{adt_t} St_{t-1} + w_t v_t k_t^T from St_{-1} = S_init + sigma_{-1} v_init k_init^T,
// and y_t = St_t q_t - sigma_t (q_t . k_t) v_t + D v_t. Within a chunk this is
//   y_t = sum_{s <= t} (q_t . k_s) e^{Acs_t - Acs_s} c_ts v_s + e^{Acs_t} St_prev q_t + D v_t,
//   c_ts = w_s for s < t, gamma_t for s = t,
// where Acs is the cumulative sum of adt within the chunk: an SSD chunk with a modified mask.
// MIMO (rank R) sums the same products over the ranks of s and keeps one output row per rank of t.
#pragma once

#include <cmath>

#include "common/macros.h"
#include "common/math.h"

namespace ssmk::mamba3 {

constexpr int kMaxChunk = 256;
constexpr int kMaxRank = 16;
constexpr double kPi = 3.14159265358979323846;

// The angle reduced to [0, 2 pi), as mamba_ssm keeps its angle state.
template <typename T>
SSMK_HOST_DEVICE T wrap_angle(T a) {
  const T two_pi = T(2 * kPi);
  return a - two_pi * std::floor(a / two_pi);
}

// Angle increment pi tanh(angles) dt and its derivatives by angles and by dt.
template <typename T>
SSMK_HOST_DEVICE T angle_step(T raw, T dt) {
  return T(kPi) * std::tanh(raw) * dt;
}
template <typename T>
SSMK_HOST_DEVICE T angle_step_draw(T raw, T dt) {
  const T th = std::tanh(raw);
  return T(kPi) * (T(1) - th * th) * dt;
}

// Rotates the first `npairs` adjacent pairs of x [N] by cs[j], sn[j] (in place).
template <typename T>
SSMK_HOST_DEVICE void rotate_pairs(T* x, const T* cs, const T* sn, int64_t npairs) {
  for (int64_t j = 0; j < npairs; ++j) {
    const T x0 = x[2 * j], x1 = x[2 * j + 1];
    x[2 * j] = x0 * cs[j] - x1 * sn[j];
    x[2 * j + 1] = x0 * sn[j] + x1 * cs[j];
  }
}

// Element c of a row x [N] as rotate_pairs leaves it, the unrotated row read through at(e): one
// output element, for kernels that split a row's elements across threads.
template <typename T, typename At>
SSMK_HOST_DEVICE T rotated_element(const At& at, int64_t c, const T* cs, const T* sn, int64_t npairs) {
  if (c >= 2 * npairs) return at(c);
  const int64_t j = c / 2;
  const T x0 = at(2 * j), x1 = at(2 * j + 1);
  return c % 2 == 0 ? x0 * cs[j] - x1 * sn[j] : x0 * sn[j] + x1 * cs[j];
}

// The adjoint of rotate_pairs on the gradient g [N] of the rotated vector xr: g becomes the
// gradient of the unrotated vector, and dangle[j] gets d loss / d angle_j.
template <typename T>
SSMK_HOST_DEVICE void rotate_pairs_bwd(T* g, const T* xr, const T* cs, const T* sn, int64_t npairs, T* dangle) {
  for (int64_t j = 0; j < npairs; ++j) {
    const T g0 = g[2 * j], g1 = g[2 * j + 1];
    dangle[j] += g1 * xr[2 * j] - g0 * xr[2 * j + 1];
    g[2 * j] = g0 * cs[j] + g1 * sn[j];
    g[2 * j + 1] = -g0 * sn[j] + g1 * cs[j];
  }
}

}  // namespace ssmk::mamba3
