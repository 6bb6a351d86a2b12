// The host-visible part of the batched tensor-core GEMM (batched_gemm.h): its parameters, tile
// sizes and zero structures, without CUDA headers, so host code and the CPU mirror of the GEMM's
// row blocking (ssd) use the same definitions.
#pragma once

#include <cstdint>

namespace ssmk::cuda {

// Output tile kGemmTileM x kGemmTileN, K step kGemmTileK, for every operand precision.
constexpr int kGemmTileM = 64, kGemmTileN = 64, kGemmTileK = 32;

// Zero structure of a product's operand or result that the GEMM exploits (results are the same
// either way, up to rounding), per kGemmTileM-row block of A:
//   kLowerA    A[m, k] = 0 for k > m   (the K loop of a row tile stops after its last row)
//   kUpperA    A[m, k] = 0 for k < m   (the K loop starts at the tile's first row)
//   kLowerOut  only out[m, n] with n <= m is needed; tiles strictly above the diagonal are
//              written as zeros (or left alone when accumulating) without any product.
enum class Triangle : int { kNone = 0, kLowerA = 1, kUpperA = 2, kLowerOut = 3 };

struct BatchedGemmParams {
  const float* a;  // [batch, M, K]
  int64_t a_batch_stride, a_row_stride, a_col_stride;
  const float* b;  // [batch, K, N]
  int64_t b_batch_stride, b_row_stride, b_col_stride;
  float* out;  // [batch, M, N] contiguous
  int64_t batch, M, N, K;
  int64_t tiles_m, tiles_n;
  bool accumulate;
  Triangle triangle;
};

// Offsets inside one matrix (and M, N, K) must fit in int32, including the tile overhang past
// the matrix edges that the kernel computes (but does not load) addresses for.
inline bool batched_gemm_fits_int32(const BatchedGemmParams& p) {
  auto abs64 = [](int64_t v) { return v < 0 ? -v : v; };
  const int64_t lim = (int64_t(1) << 31) - 1;
  const int64_t a_span = (p.M + kGemmTileM) * abs64(p.a_row_stride) + (p.K + kGemmTileK) * abs64(p.a_col_stride);
  const int64_t b_span = (p.K + kGemmTileK) * abs64(p.b_row_stride) + (p.N + kGemmTileN) * abs64(p.b_col_stride);
  return p.M < lim && p.N < lim && p.K < lim && a_span < lim && b_span < lim;
}

}  // namespace ssmk::cuda
