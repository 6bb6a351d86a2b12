// Matrix products of small buffers on whole kTile x kTile tiles, the unit of the tensor cores'
// WMMA products. Every dimension of an operand or a result is padded to a multiple of kTile and
// the padding holds zeros, so that a product computes whole tiles, padding included, and is still
// exact. A product is described once (TileProduct) for both devices; how its tiles are computed is
// the caller's: on a block's warps with tensor cores (cuda/tile_product_mma.h), or element by
// element with tile_element below, which the CPU runs and which so checks every product's
// operands, padding and skipped ranges.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/macros.h"

namespace ssmk {

constexpr int64_t kTile = 16;
SSMK_HOST_DEVICE constexpr int64_t tile_padded(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// Zero structure over a chunk's rows i = t R + r (step t = i / R, rank R) that lets a product
// skip work without changing its result:
//   kLowerA    A[m, k] = 0 when step(k) > step(m): a row tile's K range ends after its last step;
//   kUpperA    A[m, k] = 0 when step(k) < step(m): it starts at its first step;
//   kLowerOut  only C[m, n] with step(n) <= step(m) is read: tiles wholly above are not computed
//              (their elements keep whatever they held).
enum class StepMask { kNone, kLowerA, kUpperA, kLowerOut };

// One term op(A) [M, K] . op(B) [K, N] of a product. A is row-major with leading dimension lda,
// or with kTransA its transpose is (A[m, k] = a[k lda + m]); B likewise (kTransB: B[k, n] =
// b[n ldb + k]). K is a multiple of kTile.
template <typename T, bool kTransA, bool kTransB>
struct TileTerm {
  static constexpr bool kTA = kTransA, kTB = kTransB;
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  int64_t K;
  StepMask mask;  // kNone, kLowerA or kUpperA
  int64_t rank;
  SSMK_HOST_DEVICE T a_at(int64_t m, int64_t k) const { return kTransA ? a[k * lda + m] : a[m * lda + k]; }
  SSMK_HOST_DEVICE T b_at(int64_t k, int64_t n) const { return kTransB ? b[n * ldb + k] : b[k * ldb + n]; }
  // [k0, k1), multiples of kTile: where rows m0 .. m0 + kTile - 1 of A may be non-zero.
  SSMK_HOST_DEVICE void k_range(int64_t m0, int64_t& k0, int64_t& k1) const {
    k0 = 0;
    k1 = K;
    if (mask == StepMask::kLowerA) {
      const int64_t end = tile_padded(((m0 + kTile - 1) / rank + 1) * rank);
      k1 = end < K ? end : K;
    } else if (mask == StepMask::kUpperA) {
      const int64_t begin = (m0 / rank * rank) / kTile * kTile;
      k0 = begin < K ? begin : K;
    }
  }
};

// A product without its second term.
struct NoTerm {};

template <bool kTransA = false, bool kTransB = false, typename T>
SSMK_HOST_DEVICE TileTerm<T, kTransA, kTransB> tile_term(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K,
                                                         StepMask mask = StepMask::kNone, int64_t rank = 1) {
  return TileTerm<T, kTransA, kTransB>{a, lda, b, ldb, K, mask, rank};
}

// C [M, N] = (or += when accumulate) term1 + term2, C row-major with leading dimension ldc; M and
// N multiples of kTile. Tiles are numbered row-major over C.
template <typename T, typename Term1, typename Term2 = NoTerm>
struct TileProduct {
  using value_type = T;
  static constexpr bool kTwoTerms = !std::is_same_v<Term2, NoTerm>;
  T* c;
  int64_t ldc, M, N;
  bool accumulate;
  Term1 t1;
  Term2 t2;
  StepMask out;  // kNone or kLowerOut
  int64_t rank;
  SSMK_HOST_DEVICE int64_t tiles() const { return (M / kTile) * (N / kTile); }
  SSMK_HOST_DEVICE int64_t row0(int64_t tile) const { return tile / (N / kTile) * kTile; }
  SSMK_HOST_DEVICE int64_t col0(int64_t tile) const { return tile % (N / kTile) * kTile; }
  SSMK_HOST_DEVICE bool skipped(int64_t m0, int64_t n0) const {
    return out == StepMask::kLowerOut && n0 / rank > (m0 + kTile - 1) / rank;
  }
};

template <typename T, typename Term1>
SSMK_HOST_DEVICE TileProduct<T, Term1> tile_product(T* c, int64_t ldc, int64_t M, int64_t N, bool accumulate,
                                                    const Term1& t1, StepMask out = StepMask::kNone,
                                                    int64_t rank = 1) {
  return TileProduct<T, Term1>{c, ldc, M, N, accumulate, t1, NoTerm{}, out, rank};
}
template <typename T, typename Term1, typename Term2>
SSMK_HOST_DEVICE TileProduct<T, Term1, Term2> tile_product(T* c, int64_t ldc, int64_t M, int64_t N, bool accumulate,
                                                           const Term1& t1, const Term2& t2) {
  return TileProduct<T, Term1, Term2>{c, ldc, M, N, accumulate, t1, t2, StepMask::kNone, 1};
}

template <typename T, typename Term>
SSMK_HOST_DEVICE T add_term(T s, const Term& t, int64_t m0, int64_t m, int64_t n) {
  int64_t k0, k1;
  t.k_range(m0, k0, k1);
  for (int64_t k = k0; k < k1; ++k) s += t.a_at(m, k) * t.b_at(k, n);
  return s;
}

// Element e (0 .. kTile^2 - 1, row-major) of tile `tile` of a product, with the tensor cores' order
// of terms: C (when accumulating), then the first term's K range, then the second's (within a
// K step of the tensor cores the order is the hardware's, so results agree up to rounding).
template <typename Product>
SSMK_HOST_DEVICE void tile_element(const Product& pr, int64_t tile, int64_t e) {
  using T = typename Product::value_type;
  const int64_t m0 = pr.row0(tile), n0 = pr.col0(tile);
  if (pr.skipped(m0, n0)) return;
  const int64_t m = m0 + e / kTile, n = n0 + e % kTile;
  T s = pr.accumulate ? pr.c[m * pr.ldc + n] : T(0);
  s = add_term(s, pr.t1, m0, m, n);
  if constexpr (Product::kTwoTerms) s = add_term(s, pr.t2, m0, m, n);
  pr.c[m * pr.ldc + n] = s;
}

// Every element of a product, item `lane` of `lanes` taking every lanes-th (a block's threads, or
// one CPU thread).
template <typename Product>
SSMK_HOST_DEVICE void tile_product_elements(const Product& pr, int64_t lane, int64_t lanes) {
  for (int64_t it = lane; it < pr.tiles() * kTile * kTile; it += lanes) {
    tile_element(pr, it / (kTile * kTile), it % (kTile * kTile));
  }
}

}  // namespace ssmk
