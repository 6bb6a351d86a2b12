// Unit tests of common/tile_product.h (no torch needed): every product form the Mamba-3 kernels use
// (plain or transposed operands, one or two terms, accumulating, and the step structures that
// skip K ranges or tiles) against a dense triple loop, for ranks that do and do not divide the
// 16-row tile.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/tile_product.h"

namespace {

using ssmk::kTile;
using ssmk::StepMask;

int failures = 0;
std::mt19937 rng(7);

std::vector<double> random_matrix(int64_t rows, int64_t cols) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<double> m(rows * cols);
  for (double& x : m) x = u(rng);
  return m;
}

// Zeros where the step structure says A is zero (rows and columns are chunk rows of rank R).
void apply_mask(std::vector<double>& a, int64_t M, int64_t K, StepMask mask, int64_t R) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const bool zero = (mask == StepMask::kLowerA && k / R > m / R) || (mask == StepMask::kUpperA && k / R < m / R);
      if (zero) a[m * K + k] = 0.0;
    }
  }
}

std::vector<double> transposed(const std::vector<double>& a, int64_t rows, int64_t cols) {
  std::vector<double> t(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  }
  return t;
}

void check(const std::vector<double>& got, const std::vector<double>& want, int64_t M, int64_t N, StepMask out,
           int64_t R, const char* what) {
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      if (out == StepMask::kLowerOut && n / R > m / R) continue;
      worst = std::fmax(worst, std::fabs(got[m * N + n] - want[m * N + n]));
    }
  }
  if (worst > 1e-12) {
    std::printf("FAIL %s: max error %.3g\n", what, worst);
    ++failures;
  }
}

// C (+)= op(A) op(B) with A [M, K] masked by `mask`, stored transposed when kTA; B [K, N] likewise.
template <bool kTA, bool kTB>
void one_term(int64_t M, int64_t N, int64_t K, StepMask mask, StepMask out, int64_t R, bool accumulate) {
  std::vector<double> a = random_matrix(M, K), b = random_matrix(K, N), c0 = random_matrix(M, N);
  apply_mask(a, M, K, mask, R);
  std::vector<double> want = accumulate ? c0 : std::vector<double>(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) want[m * N + n] += a[m * K + k] * b[k * N + n];
    }
  }
  const std::vector<double> as = kTA ? transposed(a, M, K) : a, bs = kTB ? transposed(b, K, N) : b;
  std::vector<double> got = c0;
  const auto term = ssmk::tile_term<kTA, kTB>(as.data(), kTA ? M : K, bs.data(), kTB ? K : N, K, mask, R);
  const auto pr = ssmk::tile_product(got.data(), N, M, N, accumulate, term, out, R);
  ssmk::tile_product_elements(pr, 0, 1);
  char what[160];
  std::snprintf(what, sizeof(what), "one term transA %d transB %d M %lld N %lld K %lld mask %d out %d R %lld acc %d",
                int(kTA), int(kTB), (long long)M, (long long)N, (long long)K, int(mask), int(out), (long long)R,
                int(accumulate));
  check(got, want, M, N, out, R, what);
}

// C = A1 B1 + A2^T B2 split across lanes, as the backward's dq and dk.
void two_terms(int64_t M, int64_t N, int64_t K1, int64_t K2, int64_t R, int64_t lanes) {
  std::vector<double> a1 = random_matrix(M, K1), b1 = random_matrix(K1, N);
  std::vector<double> a2 = random_matrix(M, K2), b2 = random_matrix(K2, N);
  apply_mask(a1, M, K1, StepMask::kLowerA, R);
  std::vector<double> want(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K1; ++k) want[m * N + n] += a1[m * K1 + k] * b1[k * N + n];
      for (int64_t k = 0; k < K2; ++k) want[m * N + n] += a2[m * K2 + k] * b2[k * N + n];
    }
  }
  const std::vector<double> a2t = transposed(a2, M, K2);
  std::vector<double> got(M * N, std::nan(""));
  const auto pr = ssmk::tile_product(got.data(), N, M, N, false,
                                     ssmk::tile_term(a1.data(), K1, b1.data(), N, K1, StepMask::kLowerA, R),
                                     ssmk::tile_term<true, false>(a2t.data(), M, b2.data(), N, K2));
  for (int64_t lane = 0; lane < lanes; ++lane) ssmk::tile_product_elements(pr, lane, lanes);
  check(got, want, M, N, StepMask::kNone, R, "two terms across lanes");
}

void test_k_ranges() {
  // Rank 3: rows 15 .. 17 are step 5, across the first tile boundary.
  const auto lower = ssmk::tile_term(static_cast<const double*>(nullptr), 48, static_cast<const double*>(nullptr),
                                     16, 48, StepMask::kLowerA, 3);
  int64_t k0, k1;
  lower.k_range(0, k0, k1);
  if (k0 != 0 || k1 != 32) {
    std::printf("FAIL kLowerA range of rows 0..15, rank 3: [%lld, %lld), want [0, 32)\n", (long long)k0, (long long)k1);
    ++failures;
  }
  auto upper = lower;
  upper.mask = StepMask::kUpperA;
  upper.k_range(16, k0, k1);
  if (k0 != 0 || k1 != 48) {
    std::printf("FAIL kUpperA range of rows 16..31, rank 3: [%lld, %lld), want [0, 48)\n", (long long)k0, (long long)k1);
    ++failures;
  }
  upper.k_range(32, k0, k1);
  if (k0 != 16 || k1 != 48) {
    std::printf("FAIL kUpperA range of rows 32..47, rank 3: [%lld, %lld), want [16, 48)\n", (long long)k0, (long long)k1);
    ++failures;
  }
}

}  // namespace

int main() {
  test_k_ranges();
  for (int64_t R : {1, 2, 3, 4, 5}) {
    for (bool acc : {false, true}) {
      one_term<false, false>(48, 32, 48, StepMask::kLowerA, StepMask::kNone, R, acc);
      one_term<true, false>(48, 16, 48, StepMask::kUpperA, StepMask::kNone, R, acc);
      one_term<false, true>(48, 48, 32, StepMask::kNone, StepMask::kLowerOut, R, acc);
      one_term<true, true>(32, 16, 48, StepMask::kNone, StepMask::kNone, R, acc);
    }
    two_terms(48, 32, 48, 16, R, 3);
  }
  one_term<false, false>(kTile, kTile, kTile, StepMask::kLowerA, StepMask::kNone, 16, false);
  if (failures == 0) std::printf("all tile product tests passed\n");
  return failures == 0 ? 0 : 1;
}
