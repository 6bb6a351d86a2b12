// CUDA kernels of the S4 Cauchy product.
//
// Forward: one block per (tile of kTileL outputs, row); each of the kThreads threads owns
// kTileL / kThreads outputs (l = l0 + t + i kThreads: coalesced stores) with their accumulators in
// registers; v and w of the row are staged in shared memory kNChunk at a time and read as
// broadcasts. Per (n, l): one complex term (two when symmetric), about 16 FLOPs and one division
// each; memory traffic is the output only (8 B per l in complex64), so the kernel is compute
// bound: expected ~50-70% of the FP32 rate (the divisions run partly on the SFU).
// Backward: one block per (chunk of kChunkL l, group of kThreads n, row); each thread owns one n
// and walks the chunk's l in order with z and conj(dout) staged in shared memory; the eight sums
// go to a [B, chunks, N, 8] double buffer that reduce_kernel adds in chunk order (bitwise
// reproducible, no atomics). ~45 FLOPs and two divisions per (n, l); compute bound.
#pragma once

#include <c10/util/complex.h>

#include "cauchy/cauchy.h"
#include "cauchy/cauchy_math.h"

namespace ssmk::cauchy {

template <typename T_>
struct KernelTraits {
  using T = T_;
  using C = c10::complex<T>;
  static constexpr int kThreads = kCudaThreads;
  static constexpr int kPerThread = kTileL / kThreads;
  static constexpr int kNChunk = 256;  // v and w staged per pass (fwd)
  static constexpr int kLChunk = 256;  // z and conj(dout) staged per pass (bwd)
  static_assert(kTileL % kThreads == 0, "tile must split evenly over the threads");
  static_assert(kChunkL % kLChunk == 0, "backward chunk must split into staged passes");
};

template <typename Traits, bool kSym>
__global__ void __launch_bounds__(Traits::kThreads) cauchy_fwd_kernel(CauchyFwdParams<typename Traits::T> p) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  constexpr int kThreads = Traits::kThreads, kPer = Traits::kPerThread, kNChunk = Traits::kNChunk;
  __shared__ T sv[4][kNChunk];  // vr, vi, wr, wi
  const int64_t tiles = (p.L + kTileL - 1) / kTileL;
  const int64_t b = blockIdx.x / tiles;
  const int64_t l0 = (blockIdx.x % tiles) * kTileL;
  const C* v = p.v.data + b * p.v.stride[0];
  const C* w = p.w.data + b * p.w.stride[0];
  const C* z = p.z.data;
  T zr[kPer], zi[kPer], a1r[kPer], a1i[kPer], a2r[kPer], a2i[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t l = l0 + threadIdx.x + i * kThreads;
    const C zl = l < p.L ? z[l * p.z.stride[0]] : C(T(2), T(0));
    zr[i] = zl.real();
    zi[i] = zl.imag();
    a1r[i] = a1i[i] = a2r[i] = a2i[i] = T(0);
  }
  for (int64_t n0 = 0; n0 < p.N; n0 += kNChunk) {
    const int nc = static_cast<int>(p.N - n0 < kNChunk ? p.N - n0 : kNChunk);
    __syncthreads();  // the previous chunk has been read
    for (int j = threadIdx.x; j < nc; j += kThreads) {
      const C vn = v[(n0 + j) * p.v.stride[1]], wn = w[(n0 + j) * p.w.stride[1]];
      sv[0][j] = vn.real();
      sv[1][j] = vn.imag();
      sv[2][j] = wn.real();
      sv[3][j] = wn.imag();
    }
    __syncthreads();
    for (int j = 0; j < nc; ++j) {
      const T vr = sv[0][j], vi = sv[1][j], wr = sv[2][j], wi = sv[3][j];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        fwd_term<kSym>(zr[i], zi[i], vr, vi, wr, wi, a1r[i], a1i[i], a2r[i], a2i[i]);
      }
    }
  }
  C* out = p.out + b * p.L;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t l = l0 + threadIdx.x + i * kThreads;
    if (l < p.L) out[l] = C(a1r[i] + a2r[i], a1i[i] + a2i[i]);
  }
}

template <typename Traits, bool kSym>
__global__ void __launch_bounds__(Traits::kThreads) cauchy_bwd_kernel(CauchyBwdParams<typename Traits::T> p, double* partials) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  constexpr int kThreads = Traits::kThreads, kLChunk = Traits::kLChunk;
  __shared__ T sz[4][kLChunk];  // zr, zi, gr, gi (g = conj(dout))
  const int64_t groups = (p.N + kThreads - 1) / kThreads;
  const int64_t chunk = blockIdx.x % p.num_chunks;
  const int64_t rest = blockIdx.x / p.num_chunks;
  const int64_t b = rest / groups;
  const int64_t n = (rest % groups) * kThreads + threadIdx.x;
  const bool active = n < p.N;
  const C* w = p.w.data + b * p.w.stride[0];
  const C wn = active ? w[n * p.w.stride[1]] : C(T(0), T(0));
  const T wr = wn.real(), wi = wn.imag();
  const C* z = p.z.data;
  const C* g = p.dout.data + b * p.dout.stride[0];
  T Ar = 0, Ai = 0, A2r = 0, A2i = 0, Br = 0, Bi = 0, B2r = 0, B2i = 0;
  const int64_t c0 = chunk * kChunkL;
  const int64_t c1 = c0 + kChunkL < p.L ? c0 + kChunkL : p.L;
  for (int64_t s0 = c0; s0 < c1; s0 += kLChunk) {
    const int nl = static_cast<int>(c1 - s0 < kLChunk ? c1 - s0 : kLChunk);
    __syncthreads();
    for (int j = threadIdx.x; j < nl; j += kThreads) {
      const C zl = z[(s0 + j) * p.z.stride[0]], gl = g[(s0 + j) * p.dout.stride[1]];
      sz[0][j] = zl.real();
      sz[1][j] = zl.imag();
      sz[2][j] = gl.real();
      sz[3][j] = -gl.imag();
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < nl; ++j) {
        bwd_term<kSym>(sz[0][j], sz[1][j], sz[2][j], sz[3][j], wr, wi, Ar, Ai, A2r, A2i, Br, Bi,
                       B2r, B2i);
      }
    }
  }
  if (active) {
    double* out = partials + ((b * p.num_chunks + chunk) * p.N + n) * 8;
    out[0] = Ar;
    out[1] = Ai;
    out[2] = A2r;
    out[3] = A2i;
    out[4] = Br;
    out[5] = Bi;
    out[6] = B2r;
    out[7] = B2i;
  }
}

// dv, dw per (row, n): the chunk partials added in chunk order.
template <typename Traits>
__global__ void cauchy_bwd_reduce_kernel(CauchyBwdParams<typename Traits::T> p, const double* partials) {
  using T = typename Traits::T;
  using C = typename Traits::C;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.N) return;
  const int64_t b = idx / p.N, n = idx % p.N;
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    const double* part = partials + ((b * p.num_chunks + c) * p.N + n) * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] += part[k];
  }
  const C vn = p.v.data[b * p.v.stride[0] + n * p.v.stride[1]];
  double dvr, dvi, dwr, dwi;
  grads_from_sums(s, vn.real(), vn.imag(), p.symmetric, dvr, dvi, dwr, dwi);
  p.dv[idx] = C(static_cast<T>(dvr), static_cast<T>(dvi));
  p.dw[idx] = C(static_cast<T>(dwr), static_cast<T>(dwi));
}

}  // namespace ssmk::cauchy
