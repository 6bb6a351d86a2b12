// CUDA decode step of the selective scan: one warp per (batch, head, headdim) row, the lanes
// striding over dstate; the output is a warp reduction (fixed order). Reads and writes the row's
// state once (2 x N x 4 bytes) plus N values of A, B and C: bandwidth-bound, ~70-80% of the copy
// bandwidth expected at decode sizes large enough to fill the GPU.
#pragma once

#include "common/cuda/reduce.h"
#include "common/math.h"
#include "selective_scan/selective_scan.h"

namespace ssmk::selective_scan {

constexpr int kUpdateWarps = 4;

template <typename input_t>
__global__ void __launch_bounds__(kUpdateWarps * 32) selective_state_update_kernel(SelectiveStateUpdateParams<input_t> p) {
  using acc_t = ssmk::acc_t<input_t>;
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kUpdateWarps + threadIdx.x / 32;
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  if (r >= p.batch * H * P) return;
  const int64_t b = r / (H * P), hd = (r / P) % H, pd = r % P;
  input_t* out = p.out + r;
  const int64_t sb = p.state_batch_indices ? p.state_batch_indices[b] : b;
  // An index past the state's batch cannot be reported without a host sync: treated as padding.
  if (sb < 0 || sb >= p.state_batch) {
    if (lane == 0) *out = input_t(0);
    return;
  }
  const acc_t x = static_cast<acc_t>(p.x.data[b * p.x.stride[0] + hd * p.x.stride[1] + pd * p.x.stride[2]]);
  const acc_t dt_raw = static_cast<acc_t>(p.dt.data[b * p.dt.stride[0] + hd * p.dt.stride[1] + pd * p.dt.stride[2]]);
  const int64_t hp = hd * P + pd;
  const acc_t bias = p.dt_bias ? p.dt_bias[hp] : acc_t(0);
  const acc_t dt = delta_transform(dt_raw, bias, p.dt_softplus);
  const acc_t* A = p.A + hp * N;
  const int64_t g = hd / (H / p.groups);
  const acc_t* Bv = p.B + (b * p.groups + g) * N;
  const acc_t* Cv = p.C + (b * p.groups + g) * N;
  acc_t* state = p.state.data + sb * p.state.stride[0] + hd * p.state.stride[1] + pd * p.state.stride[2];
  const acc_t dtx = dt * x;
  acc_t y = 0;
  for (int64_t n = lane; n < N; n += 32) {
    acc_t* s = state + n * p.state.stride[3];
    const acc_t h = discretize(dt, A[n]) * *s + dtx * Bv[n];
    *s = h;
    y += Cv[n] * h;
  }
  y = ssmk::cuda::warp_reduce_sum(y);
  if (lane == 0) {
    const acc_t Dd = p.D ? p.D[hp] : acc_t(0);
    const acc_t zv =
        p.z.data ? static_cast<acc_t>(p.z.data[b * p.z.stride[0] + hd * p.z.stride[1] + pd * p.z.stride[2]]) : acc_t(0);
    *out = static_cast<input_t>(epilogue(y, x, Dd, zv, p.z.data != nullptr));
  }
}

}  // namespace ssmk::selective_scan
