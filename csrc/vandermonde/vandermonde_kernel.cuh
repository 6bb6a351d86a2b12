// CUDA kernels of the (log-)Vandermonde products, with the factorisation of vandermonde_math.h.
//
// Forward: one block per (tile of kTileL outputs, row), 256 threads = 8 warps; lane k owns the
// offset k of a block of K = 32 and warp w the blocks m = w + 8 j (j < 4), so each thread keeps
// 4 accumulators in registers. Per chunk of kNChunk n, the first kNChunk threads build in shared
// memory the table exp(x_n k) (k < K) and the block weights c_n exp(x_n l0) exp(x_n K)^m in
// double (one direct exp per n and tile: the re-anchoring) and round them once. The main loop is
// one complex multiply-add per (n, l) (real part only when symmetric): 8 FLOPs (4) per (n, l),
// reading one table entry and one broadcast weight from shared memory; writes 8 B (4 B) per l.
// Compute bound: expected ~40-60% of the FP32 rate at N >= 32, lower at small N where the
// double-precision prologue is not amortised.
// Transpose: one block per (tile, group of 32 n, row); lane = n, warp w takes the blocks
// m = w + 8 j, sums u_l exp(x_n k) over the block's K offsets in float (u staged in shared
// memory) and adds it with its anchor exp(x_n (l0 + m K)) in double. The 8 warps' sums are added
// in warp order into a [B, tiles, N, 4] double buffer, which reduce_kernel adds in tile order
// (bitwise reproducible, no atomics). 8 (16 with T1) FLOPs per (n, l).
#pragma once

#include <c10/util/complex.h>

#include "vandermonde/vandermonde.h"
#include "vandermonde/vandermonde_math.h"

namespace ssmk::vandermonde {

template <typename T_>
struct KernelTraits {
  using T = T_;
  using C = c10::complex<T>;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPerThread = kBlocksPerTile / kWarps;  // blocks m per thread
  static constexpr int kNChunk = 32;                          // n per shared-memory pass (fwd)
  static constexpr int kGroup = kCudaTransposeGroup;          // n per block (transpose)
  static_assert(kBlockK == 32, "one lane per offset k");
  static_assert(kBlocksPerTile % kWarps == 0, "blocks must split evenly over the warps");
};

template <typename Traits, bool kSym>
__global__ void __launch_bounds__(Traits::kThreads) vand_fwd_kernel(VandermondeFwdParams<typename Traits::T> p) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  constexpr int kNChunk = Traits::kNChunk, kPer = Traits::kPerThread, kWarps = Traits::kWarps;
  __shared__ T tab[2][kNChunk][kBlockK];         // exp(x_n k), re / im
  __shared__ T wgt[2][kBlocksPerTile][kNChunk];  // c_n exp(x_n (l0 + m K)), re / im
  const int64_t b = blockIdx.x / p.num_tiles;
  const int64_t l0 = (blockIdx.x % p.num_tiles) * kTileL;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const C* x = p.x.data + b * p.x.stride[0];
  const C* c = p.c.data + b * p.c.stride[0];
  T accr[kPer], acci[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) accr[j] = acci[j] = T(0);
  for (int64_t n0 = 0; n0 < p.N; n0 += kNChunk) {
    const int nc = static_cast<int>(p.N - n0 < kNChunk ? p.N - n0 : kNChunk);
    __syncthreads();  // the previous chunk has been read
    if (threadIdx.x < nc) {
      const int i = threadIdx.x;
      const C xn = x[(n0 + i) * p.x.stride[1]], cn = c[(n0 + i) * p.c.stride[1]];
      const Cd sk = power_table(xn.real(), xn.imag(), [&](int k, Cd e) {
        tab[0][i][k] = static_cast<T>(e.re);
        tab[1][i][k] = static_cast<T>(e.im);
      });
      Cd a = cmul({cn.real(), cn.imag()}, exp_xl(xn.real(), xn.imag(), static_cast<double>(l0)));
      for (int m = 0; m < kBlocksPerTile; ++m) {
        wgt[0][m][i] = static_cast<T>(a.re);
        wgt[1][m][i] = static_cast<T>(a.im);
        a = cmul(a, sk);
      }
    }
    __syncthreads();
    for (int i = 0; i < nc; ++i) {
      const T br = tab[0][i][lane], bi = tab[1][i][lane];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int m = warp + j * kWarps;
        const T wr = wgt[0][m][i], wi = wgt[1][m][i];
        accr[j] += wr * br - wi * bi;
        if (!kSym) acci[j] += wr * bi + wi * br;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t l = l0 + (warp + j * kWarps) * kBlockK + lane;
    if (l < p.L) {
      if (kSym) {
        p.out_real[b * p.L + l] = T(2) * accr[j];
      } else {
        p.out[b * p.L + l] = C(accr[j], acci[j]);
      }
    }
  }
}

template <typename Traits, bool kT1>
__global__ void __launch_bounds__(Traits::kThreads) vand_t_kernel(VandermondeTransposeParams<typename Traits::T> p, double* partials) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  constexpr int kGroup = Traits::kGroup, kPer = Traits::kPerThread, kWarps = Traits::kWarps;
  __shared__ T su[2][kTileL];                 // u of the tile, re / im
  __shared__ T tab[2][kBlockK][kGroup];       // exp(x_n k), re / im
  __shared__ double red[kWarps][kGroup][4];   // per-warp sums, added in warp order
  const int64_t groups = (p.N + kGroup - 1) / kGroup;
  const int64_t tile = blockIdx.x % p.num_tiles;
  const int64_t rest = blockIdx.x / p.num_tiles;
  const int64_t b = rest / groups;
  const int64_t n0 = (rest % groups) * kGroup;
  const int64_t l0 = tile * kTileL;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = n0 + lane;
  const C* x = p.x.data + b * p.x.stride[0];
  const C xn = n < p.N ? x[n * p.x.stride[1]] : C(T(0), T(0));
  const C* u = p.u.data + b * p.u.stride[0];
  for (int j = threadIdx.x; j < kTileL; j += Traits::kThreads) {
    const int64_t l = l0 + j;
    const C ul = l < p.L ? u[l * p.u.stride[1]] : C(T(0), T(0));
    su[0][j] = ul.real();
    su[1][j] = ul.imag();
  }
  if (warp == 0) {
    power_table(xn.real(), xn.imag(), [&](int k, Cd e) {
      tab[0][k][lane] = static_cast<T>(e.re);
      tab[1][k][lane] = static_cast<T>(e.im);
    });
  }
  __syncthreads();
  // Anchor of this thread's first block, then steps of kWarps blocks.
  Cd anchor = exp_xl(xn.real(), xn.imag(), static_cast<double>(l0 + warp * kBlockK));
  const Cd step = exp_xl(xn.real(), xn.imag(), static_cast<double>(kWarps * kBlockK));
  double s0r = 0, s0i = 0, s1r = 0, s1i = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int m = warp + j * kWarps;
    if (l0 + m * kBlockK >= p.L) break;  // past the end (u is zero there; anchors may overflow)
    T pr = 0, pi = 0, qr = 0, qi = 0;
    for (int k = 0; k < kBlockK; ++k) {
      const T br = tab[0][k][lane], bi = tab[1][k][lane];
      const T ur = su[0][m * kBlockK + k], ui = su[1][m * kBlockK + k];
      pr += ur * br - ui * bi;
      pi += ur * bi + ui * br;
      if (kT1) {
        const T lw = static_cast<T>(l0 + m * kBlockK + k);
        qr += lw * (ur * br - ui * bi);
        qi += lw * (ur * bi + ui * br);
      }
    }
    const Cd pa = cmul(anchor, {static_cast<double>(pr), static_cast<double>(pi)});
    s0r += pa.re;
    s0i += pa.im;
    if (kT1) {
      const Cd qa = cmul(anchor, {static_cast<double>(qr), static_cast<double>(qi)});
      s1r += qa.re;
      s1i += qa.im;
    }
    anchor = cmul(anchor, step);
  }
  red[warp][lane][0] = s0r;
  red[warp][lane][1] = s0i;
  red[warp][lane][2] = s1r;
  red[warp][lane][3] = s1i;
  __syncthreads();
  if (warp == 0 && n < p.N) {
    double t[4] = {0, 0, 0, 0};
    for (int w = 0; w < kWarps; ++w) {
#pragma unroll
      for (int q = 0; q < 4; ++q) t[q] += red[w][lane][q];
    }
    double* out = partials + ((b * p.num_tiles + tile) * p.N + n) * 4;
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = t[q];
  }
}

// T, T1 per (row, n): the tile partials added in tile order.
template <typename Traits>
__global__ void vand_t_reduce_kernel(VandermondeTransposeParams<typename Traits::T> p, const double* partials) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.N) return;
  const int64_t b = idx / p.N, n = idx % p.N;
  double s[4] = {0, 0, 0, 0};
  for (int64_t t = 0; t < p.num_tiles; ++t) {
    const double* part = partials + ((b * p.num_tiles + t) * p.N + n) * 4;
#pragma unroll
    for (int q = 0; q < 4; ++q) s[q] += part[q];
  }
  p.t[idx] = C(static_cast<T>(s[0]), static_cast<T>(s[1]));
  if (p.with_t1) p.t1[idx] = C(static_cast<T>(s[2]), static_cast<T>(s[3]));
}

}  // namespace ssmk::vandermonde
