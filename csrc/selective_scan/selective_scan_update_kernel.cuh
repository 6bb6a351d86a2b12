// CUDA decode step of the selective scan: one warp per (batch, head, headdim) row, the lanes
// striding over dstate; the output is a warp reduction (fixed order). Reads and writes the row's
// state once (2 x N x 4 bytes) plus N values of A, B and C: bandwidth-bound, ~70-80% of the copy
// bandwidth expected at decode sizes large enough to fill the GPU.
#pragma once

#include "common/cuda/launch.h"
#include "common/cuda/reduce.h"
#include "common/math.h"
#include "selective_scan/selective_scan.h"

namespace ssmk::selective_scan {

constexpr int kUpdateWarps = 4;

template <typename input_t>
__global__ void __launch_bounds__(kUpdateWarps * 32) selective_state_update_kernel(SelectiveStateUpdateParams p) {
  using acc_t = ssmk::acc_type<input_t>;
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kUpdateWarps + threadIdx.x / 32;
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  if (r >= p.batch * H * P) return;
  const int64_t b = r / (H * P), hd = (r / P) % H, pd = r % P;
  auto* out = static_cast<input_t*>(p.out) + r;
  const int64_t sb = p.state_indices ? p.state_indices[b] : b;
  // An index past the state's batch cannot be reported without a host sync: treated as padding.
  if (sb < 0 || sb >= p.state_batch) {
    if (lane == 0) *out = input_t(0);
    return;
  }
  const auto* x_ptr = static_cast<const input_t*>(p.x);
  const auto* dt_ptr = static_cast<const input_t*>(p.dt);
  const acc_t x = static_cast<acc_t>(x_ptr[b * p.x_batch_stride + hd * p.x_head_stride + pd * p.x_dim_stride]);
  const acc_t dt_raw = static_cast<acc_t>(dt_ptr[b * p.dt_batch_stride + hd * p.dt_head_stride + pd * p.dt_dim_stride]);
  const int64_t hp = hd * P + pd;
  const acc_t bias = p.dt_bias ? static_cast<const acc_t*>(p.dt_bias)[hp] : acc_t(0);
  const acc_t dt = delta_transform(dt_raw, bias, p.softplus);
  const acc_t* A = static_cast<const acc_t*>(p.A) + hp * N;
  const int64_t g = hd / (H / p.groups);
  const acc_t* Bv = static_cast<const acc_t*>(p.B) + (b * p.groups + g) * N;
  const acc_t* Cv = static_cast<const acc_t*>(p.C) + (b * p.groups + g) * N;
  auto* state = static_cast<acc_t*>(p.state) + sb * p.state_batch_stride + hd * p.state_head_stride +
                pd * p.state_dim_stride;
  const acc_t dtx = dt * x;
  acc_t y = 0;
  for (int64_t n = lane; n < N; n += 32) {
    acc_t* s = state + n * p.state_n_stride;
    const acc_t h = discretize(dt, A[n]) * *s + dtx * Bv[n];
    *s = h;
    y += Cv[n] * h;
  }
  y = ssmk::cuda::warp_reduce_sum(y);
  if (lane == 0) {
    const acc_t Dd = p.D ? static_cast<const acc_t*>(p.D)[hp] : acc_t(0);
    const acc_t zv = p.z ? static_cast<acc_t>(static_cast<const input_t*>(p.z)[b * p.z_batch_stride +
                                                                               hd * p.z_head_stride +
                                                                               pd * p.z_dim_stride])
                         : acc_t(0);
    *out = static_cast<input_t>(epilogue(y, x, Dd, zv, p.z != nullptr));
  }
}

template <typename input_t>
void launch_update(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.nheads * p.headdim;
  if (rows == 0) return;
  const int64_t blocks = ssmk::cuda::ceil_div(rows, kUpdateWarps);
  selective_state_update_kernel<input_t><<<static_cast<unsigned>(blocks), kUpdateWarps * 32, 0, stream>>>(p);
  SSMK_CUDA_CHECK_LAUNCH();
}

}  // namespace ssmk::selective_scan
