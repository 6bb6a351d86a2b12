// Per-element math of the diagonal linear recurrence, shared by the CPU and CUDA kernels.
//
//   h_t = a_t * h_{t-1} + b_t            (reverse: h_t = a_t * h_{t+1} + b_t)
//
// A step is the affine map h -> a * h + b, so a run of steps composes into one pair (A, B):
// first (A1, B1), then (A2, B2) gives (A2 * A1, A2 * B1 + B2). This associative combine is what
// the chunked scans use; a chunk's pair is (product of its a, its scan started from zero).
//
// The backward (see docs/linear_scan.md) is the same recurrence run the other way:
//   dh_t = conj(a_{t+1}) * dh_{t+1} + g_t,  da_t = dh_t * conj(h_{t-1}),  db_t = dh_t,
//   dinitial_state = conj(a_0) * dh_0,
// with conj the identity for real inputs (PyTorch's convention for complex gradients).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include <cstdint>

#include "common/macros.h"
#include "common/types.h"

namespace ssmk::linear_scan {

// One CUDA block scans kChunk = kThreads * kItems consecutive steps of one row; the CPU uses the
// same chunks when it splits long rows (fewer than kFewRows rows of at least two chunks).
constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;
constexpr int64_t kFewRows = 64;

template <typename T>
using scan_acc_t = ::ssmk::acc_t<T>;

template <typename T>
SSMK_HOST_DEVICE T one() {
  return T(1);
}
template <typename T>
SSMK_HOST_DEVICE T zero() {
  return T(0);
}

// One step of the recurrence.
template <typename T>
SSMK_HOST_DEVICE T step(T a, T h, T b) {
  return a * h + b;
}

// (A, B) of a run of steps; `then` composes a later run after this one.
template <typename T>
struct Affine {
  T a, b;
  SSMK_HOST_DEVICE Affine then(const Affine& later) const {
    return Affine{later.a * a, later.a * b + later.b};
  }
  SSMK_HOST_DEVICE T apply(T h) const { return a * h + b; }
};

template <typename T>
SSMK_HOST_DEVICE Affine<T> identity_affine() {
  return Affine<T>{one<T>(), zero<T>()};
}

}  // namespace ssmk::linear_scan
