// Unit tests of the host side of the shared math headers (no torch needed): the vectorisable
// exp, the activations and their derivatives, the causal conv's tap/sequence rules and the SSD
// decay rules.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "causal_conv1d/causal_conv1d_math.h"
#include "common/math.h"
#include "ssd/ssd_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
    ++failures;
  }
}

void test_fast_exp() {
  double worst = 0.0;
  for (double x = -87.0; x <= 88.0; x += 1e-3) {
    const float xf = static_cast<float>(x);
    const double want = std::exp(static_cast<double>(xf));
    const double got = ssmk::fast_exp(xf);
    worst = std::fmax(worst, std::fabs(got - want) / want);
  }
  expect(worst < 3e-7, "fast_exp max relative error on [-87, 88]", worst, 3e-7);
  expect(ssmk::fast_exp(0.0f) == 1.0f, "fast_exp(0)", ssmk::fast_exp(0.0f), 1.0);
  expect(ssmk::fast_exp(-1000.0f) == 0.0f, "fast_exp(-1000)", ssmk::fast_exp(-1000.0f), 0.0);
  const float inf = std::numeric_limits<float>::infinity();
  expect(ssmk::fast_exp(-inf) == 0.0f, "fast_exp(-inf)", ssmk::fast_exp(-inf), 0.0);
  expect(std::isinf(ssmk::fast_exp(inf)), "fast_exp(inf)", ssmk::fast_exp(inf), inf);
  expect(std::isinf(ssmk::fast_exp(100.0f)), "fast_exp(100)", ssmk::fast_exp(100.0f), inf);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  expect(std::isnan(ssmk::fast_exp(nan)), "fast_exp(nan)", ssmk::fast_exp(nan), nan);
}

void test_fast_log1p() {
  double worst = 0.0;
  for (double x = -30.0; x <= 30.0; x += 1e-3) {
    const float u = static_cast<float>(std::exp(x));
    const double want = std::log1p(static_cast<double>(u));
    worst = std::fmax(worst, std::fabs(ssmk::fast_log1p(u) - want) / want);
  }
  expect(worst < 3e-7, "fast_log1p max relative error on [e^-30, e^30]", worst, 3e-7);
  expect(ssmk::fast_log1p(0.0f) == 0.0f, "fast_log1p(0)", ssmk::fast_log1p(0.0f), 0.0);
  expect(ssmk::fast_log1p(1e-30f) == 1e-30f, "fast_log1p(1e-30)", ssmk::fast_log1p(1e-30f), 1e-30);
  const float inf = std::numeric_limits<float>::infinity();
  expect(std::isinf(ssmk::fast_log1p(inf)), "fast_log1p(inf)", ssmk::fast_log1p(inf), inf);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  expect(std::isnan(ssmk::fast_log1p(nan)), "fast_log1p(nan)", ssmk::fast_log1p(nan), nan);
  for (double x = -30.0; x <= 30.0; x += 1e-2) {
    const float xf = static_cast<float>(x);
    const double want = std::log1p(std::exp(static_cast<double>(xf)));
    expect(std::fabs(ssmk::softplus(xf) - want) <= 4e-7 * want, "softplus(float)", ssmk::softplus(xf), want);
  }
}

void test_activations() {
  for (double x = -30.0; x <= 30.0; x += 0.01) {
    const double s = 1.0 / (1.0 + std::exp(-x));
    expect(std::fabs(ssmk::sigmoid(x) - s) < 1e-15, "sigmoid(double)", ssmk::sigmoid(x), s);
    expect(std::fabs(ssmk::silu(x) - x * s) < 1e-13, "silu(double)", ssmk::silu(x), x * s);
    const float xf = static_cast<float>(x);
    expect(std::fabs(ssmk::silu(xf) - static_cast<float>(x * s)) <= 1e-6 * std::fmax(1.0, std::fabs(x)),
           "silu(float)", ssmk::silu(xf), x * s);
    const double h = 1e-6;
    const double fd_silu = (ssmk::silu(x + h) - ssmk::silu(x - h)) / (2 * h);
    expect(std::fabs(ssmk::silu_grad(x) - fd_silu) < 1e-7, "silu_grad", ssmk::silu_grad(x), fd_silu);
    const double sp = std::log1p(std::exp(x));
    expect(std::fabs(ssmk::softplus(x) - sp) < 1e-8 * std::fmax(1.0, sp), "softplus", ssmk::softplus(x), sp);
    const double fd_sp = (std::log1p(std::exp(x + h)) - std::log1p(std::exp(x - h))) / (2 * h);
    expect(std::fabs(ssmk::softplus_grad(x) - fd_sp) < 1e-7, "softplus_grad", ssmk::softplus_grad(x), fd_sp);
  }
}

void test_silu_float() {
  double worst = 0.0;
  for (double x = -88.0; x <= 87.0; x += 1e-3) {
    const float xf = static_cast<float>(x);
    const double want = xf / (1.0 + std::exp(-static_cast<double>(xf)));
    if (std::fabs(want) > 1e-30) worst = std::fmax(worst, std::fabs(ssmk::silu(xf) - want) / std::fabs(want));
  }
  expect(worst < 2e-7, "silu(float) max relative error on [-88, 87]", worst, 2e-7);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  expect(ssmk::silu(100.0f) == 100.0f, "silu(100)", ssmk::silu(100.0f), 100.0);
  expect(ssmk::silu(-100.0f) == 0.0f, "silu(-100)", ssmk::silu(-100.0f), 0.0);
  expect(ssmk::silu(inf) == inf, "silu(inf)", ssmk::silu(inf), inf);
  expect(std::isnan(ssmk::silu(-inf)), "silu(-inf) (= -inf * 0)", ssmk::silu(-inf), nan);
  expect(std::isnan(ssmk::silu(nan)), "silu(nan)", ssmk::silu(nan), nan);
}

void test_causal_conv1d_rules() {
  using namespace ssmk::causal_conv1d;
  expect(tap_position(0, 3, 4) == 0, "tap_position(0, 3, 4)", tap_position(0, 3, 4), 0);
  expect(tap_position(0, 0, 4) == -3, "tap_position(0, 0, 4)", tap_position(0, 0, 4), -3);
  const int32_t seq[] = {0, 0, 1, 1, 1};
  expect(same_sequence(seq, 1, 1, -2), "history belongs to the first sequence", 0, 1);
  expect(!same_sequence(seq, 1, 2, 1), "taps do not cross a sequence change", 1, 0);
  expect(same_sequence(seq, 1, 4, 2), "taps within a sequence", 0, 1);
  const double g = activation_backward(0.5, 2.0, true);
  expect(std::fabs(g - 2.0 * ssmk::silu_grad(0.5)) < 1e-15, "activation_backward", g, 2.0 * ssmk::silu_grad(0.5));
  expect(activation(-3.0, false) == -3.0, "identity activation", activation(-3.0, false), -3.0);
}

// The decay rule the CUDA GEMM loader (GlLoad) and build_gl_kernel apply to C . B: zero above the
// diagonal and across a sequence change, e^{Acs_t - Acs_s} otherwise.
void test_ssd_rules() {
  using ssmk::ssd::segment_decay;
  const float acs[] = {-0.5f, -1.25f, -2.0f, -2.5f};
  const int32_t seg[] = {3, 3, 4, 4};
  expect(segment_decay(acs, static_cast<const int32_t*>(nullptr), 1, 2) == 0.0f, "segment_decay above the diagonal",
         segment_decay(acs, static_cast<const int32_t*>(nullptr), 1, 2), 0.0);
  const double d31 = segment_decay(acs, static_cast<const int32_t*>(nullptr), 3, 1);
  expect(std::fabs(d31 - std::exp(-2.5 + 1.25)) < 1e-7, "segment_decay(3, 1)", d31, std::exp(-2.5 + 1.25));
  expect(segment_decay(acs, seg, 2, 1) == 0.0f, "segment_decay across sequences", segment_decay(acs, seg, 2, 1), 0.0);
  expect(segment_decay(acs, seg, 3, 3) == 1.0f, "segment_decay on the diagonal", segment_decay(acs, seg, 3, 3), 1.0);
  float da[] = {1.0f, 2.0f, 3.0f, 4.0f};
  ssmk::ssd::reverse_segment_cumsum(da, seg, 4);
  expect(da[0] == 3.0f && da[1] == 2.0f && da[2] == 7.0f && da[3] == 4.0f, "reverse_segment_cumsum restarts", da[0], 3.0);
}

}  // namespace

int main() {
  test_fast_exp();
  test_fast_log1p();
  test_activations();
  test_silu_float();
  test_causal_conv1d_rules();
  test_ssd_rules();
  if (failures == 0) std::printf("all math tests passed\n");
  return failures == 0 ? 0 : 1;
}
