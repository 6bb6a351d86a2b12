// cauchy: the typed params of the S4 Cauchy product and its device launchers (host code is in
// cauchy_op.cpp). T is the real type of the complex data (float for complex64).
#pragma once

#include <c10/util/complex.h>

#include <cstdint>

#include "cauchy/cauchy_math.h"
#include "common/types.h"

namespace ssmk {

template <typename T>
struct CauchyCommon {
  using C = c10::complex<T>;
  int64_t batch, N, L;
  bool symmetric;
  View<const C, 2> v;  // [B, N], any strides (broadcast rows have stride 0)
  View<const C, 2> w;  // [B, N], any strides
  View<const C, 1> z;  // [L]
};

template <typename T>
struct CauchyFwdParams : CauchyCommon<T> {
  c10::complex<T>* out;  // [B, L], contiguous
};

template <typename T>
struct CauchyBwdParams : CauchyCommon<T> {
  int64_t num_chunks;                  // ceil(L / kChunkL)
  View<const c10::complex<T>, 2> dout;  // [B, L], any strides
  c10::complex<T>* dv;                 // [B, N], contiguous
  c10::complex<T>* dw;                 // [B, N], contiguous
};

namespace cauchy {
// Threads of a CUDA block: the forward's outputs per tile and the backward's n per block.
constexpr int kCudaThreads = 64;
}  // namespace cauchy

template <typename T> void cauchy_fwd_cpu(const CauchyFwdParams<T>& p);
template <typename T> void cauchy_bwd_cpu(const CauchyBwdParams<T>& p);

#if defined(SSMK_WITH_CUDA)
template <typename T> void cauchy_fwd_cuda(const CauchyFwdParams<T>& p, const CudaContext& ctx);
// partials: [B, num_chunks, N, 8] double scratch (see cauchy_math.h).
template <typename T> void cauchy_bwd_cuda(const CauchyBwdParams<T>& p, double* partials, const CudaContext& ctx);
#endif

}  // namespace ssmk
