// Warp-level tensor-core products of 16x16 tiles held in shared memory: the mma.sync
// instructions through the WMMA interface of <mma.h> (fragment layouts are the compiler's, so
// kernels only decide what lives where in shared memory).
//
// Three operand precisions, all accumulating in float32:
//   kHalf, kBFloat16  operands rounded to the 16-bit type (16x16x16 steps);
//   kTf32x3           float32 operands split into a TF32 high part and a TF32 low part,
//                     a.b ~= a_hi.b_hi + a_hi.b_lo + a_lo.b_hi (Ootomo & Yokota 2022, "3xTF32"):
//                     about float32 accuracy at a third of the TF32 tensor-core rate (16x16x8).
// Pointers passed to load/store must be 32-byte aligned and leading dimensions multiples of
// 16 bytes (the WMMA rules); the kernels' shared-memory layouts are chosen for that.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace ssmk::cuda {

enum class MmaPrecision { kHalf, kBFloat16, kTf32x3 };

template <MmaPrecision P>
struct MmaTraits;

// The 16-bit precisions: operands stored and multiplied in the 16-bit type, 16x16x16 steps.
template <typename T>
struct Mma16BitTraits {
  using smem_t = T;
  using frag_t = T;
  static constexpr int kK = 16;
};

template <>
struct MmaTraits<MmaPrecision::kHalf> : Mma16BitTraits<__half> {
  static __device__ __forceinline__ smem_t from_float(float v) { return __float2half_rn(v); }
};

template <>
struct MmaTraits<MmaPrecision::kBFloat16> : Mma16BitTraits<__nv_bfloat16> {
  static __device__ __forceinline__ smem_t from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct MmaTraits<MmaPrecision::kTf32x3> {
  using smem_t = float;
  using frag_t = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
  static __device__ __forceinline__ smem_t from_float(float v) { return v; }
};

// 16x16 float32 accumulator tiles += (16 x kK A) . (kK x 16 B), with A and B fragments loaded
// from shared (or global) memory, row-major unless LayoutA / LayoutB say col_major (leading
// dimensions in elements).
template <MmaPrecision P, typename LayoutA = nvcuda::wmma::row_major, typename LayoutB = nvcuda::wmma::row_major>
struct WarpMma {
  using Traits = MmaTraits<P>;
  using smem_t = typename Traits::smem_t;
  static constexpr int kK = Traits::kK;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, typename Traits::frag_t, LayoutA>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, typename Traits::frag_t, LayoutB>;
  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;

  static __device__ __forceinline__ void zero(FragAcc& acc) { nvcuda::wmma::fill_fragment(acc, 0.0f); }

  // An operand fragment: `hi` is what the tensor cores multiply; for 3xTF32 `lo` holds the
  // residual (unused and removed by the compiler otherwise).
  static __device__ __forceinline__ void load_a(FragA& hi, FragA& lo, const smem_t* a, unsigned lda) {
    nvcuda::wmma::load_matrix_sync(hi, a, lda);
    if constexpr (P == MmaPrecision::kTf32x3) split_tf32(hi, lo);
  }
  static __device__ __forceinline__ void load_b(FragB& hi, FragB& lo, const smem_t* b, unsigned ldb) {
    nvcuda::wmma::load_matrix_sync(hi, b, ldb);
    if constexpr (P == MmaPrecision::kTf32x3) split_tf32(hi, lo);
  }

  // acc += a . b
  static __device__ __forceinline__ void mma(FragAcc& acc, const FragA& a_hi, const FragA& a_lo,
                                             const FragB& b_hi, const FragB& b_lo) {
    if constexpr (P == MmaPrecision::kTf32x3) {
      // Small terms first: they would be lost if added after the large one.
      nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);
      nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);
    }
    nvcuda::wmma::mma_sync(acc, a_hi, b_hi, acc);
  }

  // Element-wise on the fragment (the layout does not matter): hi = tf32(v), lo = tf32(v - hi).
  // The high parts are rounded here, before the low ones are used with them.
  template <typename Frag>
  static __device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float v = hi.x[i];
      const float h = nvcuda::wmma::__float_to_tf32(v);
      hi.x[i] = h;
      lo.x[i] = nvcuda::wmma::__float_to_tf32(v - h);
    }
  }

  static __device__ __forceinline__ void store(float* c, unsigned ldc, const FragAcc& acc) {
    nvcuda::wmma::store_matrix_sync(c, acc, ldc, nvcuda::wmma::mem_row_major);
  }
  static __device__ __forceinline__ void load(FragAcc& acc, const float* c, unsigned ldc) {
    nvcuda::wmma::load_matrix_sync(acc, c, ldc, nvcuda::wmma::mem_row_major);
  }
};

}  // namespace ssmk::cuda
