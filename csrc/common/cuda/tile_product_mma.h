// tile_product.h's products on tensor cores: each of a block's warps takes every warps-th 16x16
// tile of C and sums its terms' K ranges with WMMA products, the operands' fragments loaded
// straight from the buffers (global or shared memory) through their row- or column-major layout.
// float32 operands go through 3xTF32 (mma.h: about float32 accuracy); other types fall back to
// tile_element on the block's threads. Buffers must be 32-byte aligned and leading dimensions
// multiples of kTile (tile_product.h pads both), which meets the WMMA rules.
#pragma once

#include <type_traits>

#include "common/cuda/mma.h"
#include "common/tile_product.h"

namespace ssmk::cuda {

template <typename Term>
using TermMma = WarpMma<MmaPrecision::kTf32x3,
                        std::conditional_t<Term::kTA, nvcuda::wmma::col_major, nvcuda::wmma::row_major>,
                        std::conditional_t<Term::kTB, nvcuda::wmma::col_major, nvcuda::wmma::row_major>>;

template <typename Term, typename FragAcc>
__device__ __forceinline__ void mma_term(FragAcc& acc, const Term& t, int64_t m0, int64_t n0) {
  using Mma = TermMma<Term>;
  int64_t k0, k1;
  t.k_range(m0, k0, k1);
  for (int64_t k = k0; k < k1; k += Mma::kK) {
    typename Mma::FragA a, a_lo;
    typename Mma::FragB b, b_lo;
    Mma::load_a(a, a_lo, Term::kTA ? t.a + k * t.lda + m0 : t.a + m0 * t.lda + k, static_cast<unsigned>(t.lda));
    Mma::load_b(b, b_lo, Term::kTB ? t.b + n0 * t.ldb + k : t.b + k * t.ldb + n0, static_cast<unsigned>(t.ldb));
    Mma::mma(acc, a, a_lo, b, b_lo);
  }
}

// The tiles of one product that warp `warp` of `warps` owns: the block's tiles are numbered on
// across its products from `first`, so that consecutive products start on other warps.
template <typename Product>
__device__ __forceinline__ void mma_tiles(const Product& pr, int warp, int warps, int64_t& first) {
  using Mma = WarpMma<MmaPrecision::kTf32x3>;
  const int64_t start = ((warp - first) % warps + warps) % warps;
  for (int64_t tile = start; tile < pr.tiles(); tile += warps) {
    const int64_t m0 = pr.row0(tile), n0 = pr.col0(tile);
    if (pr.skipped(m0, n0)) continue;
    float* c = pr.c + m0 * pr.ldc + n0;
    typename Mma::FragAcc acc;
    if (pr.accumulate) {
      Mma::load(acc, c, static_cast<unsigned>(pr.ldc));
    } else {
      Mma::zero(acc);
    }
    mma_term(acc, pr.t1, m0, n0);
    if constexpr (Product::kTwoTerms) mma_term(acc, pr.t2, m0, n0);
    Mma::store(c, static_cast<unsigned>(pr.ldc), acc);
  }
  first += pr.tiles();
}

// The products on the calling block (every thread calls it; no barrier inside: the caller waits).
template <typename... Products>
__device__ __forceinline__ void block_tile_products(const Products&... prs) {
  if constexpr ((std::is_same_v<typename Products::value_type, float> && ...)) {
    const int warp = static_cast<int>(threadIdx.x) / 32, warps = static_cast<int>(blockDim.x) / 32;
    int64_t first = 0;
    (mma_tiles(prs, warp, warps, first), ...);
  } else {
    (tile_product_elements(prs, static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x)), ...);
  }
}

}  // namespace ssmk::cuda
