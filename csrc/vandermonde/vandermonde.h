// log_vandermonde / log_vandermonde_transpose: the typed params of the two device products every
// op and gradient is built from (host code in vandermonde_op.cpp): the forward product
// y = sum_n c_n exp(x_n l) and the transposed product T_n = sum_l u_l exp(x_n l) with its
// l-weighted twin T1_n. T is the real type of the complex data (float for complex64).
#pragma once

#include <c10/util/complex.h>

#include <cstdint>

#include "common/types.h"
#include "vandermonde/vandermonde_math.h"

namespace ssmk {

template <typename T>
struct VandermondeNodes {
  int64_t batch, N, L;
  int64_t num_tiles;                     // ceil(L / kTileL)
  View<const c10::complex<T>, 2> x;      // nodes [B, N], any strides
};

// out[b, l] = sum_n c[b, n] exp(x[b, n] l), or the real 2 Re(.) of it when symmetric.
template <typename T>
struct VandermondeFwdParams : VandermondeNodes<T> {
  bool symmetric;
  View<const c10::complex<T>, 2> c;  // weights [B, N], any strides
  T* out_real;                       // [B, L], contiguous (symmetric)
  c10::complex<T>* out;              // [B, L], contiguous (not symmetric)
};

// t[b, n] = sum_l u[b, l] exp(x[b, n] l) and t1[b, n] = sum_l l u[b, l] exp(x[b, n] l).
template <typename T>
struct VandermondeTransposeParams : VandermondeNodes<T> {
  bool with_t1;
  View<const c10::complex<T>, 2> u;  // [B, L], any strides
  c10::complex<T>* t;                // [B, N], contiguous
  c10::complex<T>* t1;               // [B, N], contiguous (with_t1)
};

namespace vandermonde {
// n per CUDA block of the transposed product.
constexpr int kCudaTransposeGroup = 32;
}  // namespace vandermonde

template <typename T> void vandermonde_fwd_cpu(const VandermondeFwdParams<T>& p);
template <typename T> void vandermonde_transpose_cpu(const VandermondeTransposeParams<T>& p);

#if defined(SSMK_WITH_CUDA)
template <typename T> void vandermonde_fwd_cuda(const VandermondeFwdParams<T>& p, const CudaContext& ctx);
// partials: [B, num_tiles, N, 4] double scratch (T re/im, T1 re/im).
template <typename T> void vandermonde_transpose_cuda(const VandermondeTransposeParams<T>& p, double* partials,
                                const CudaContext& ctx);
#endif

}  // namespace ssmk
