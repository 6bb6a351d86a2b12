// Packed variable-length sequences as the kernels of both devices read them (the host check is
// common/varlen.h). No ATen here, so CUDA kernel files include it.
//
// A scan over a packed row resets its state where a sequence starts and reads off a final state
// where one ends. Kernels ask, per token, whether it starts or ends a sequence and which one:
// everything else (chunking, carries, block scans) is unchanged, because a reset step is the
// affine map h -> 0 * h + (a * h0 + b), which composes like any other step.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/types.h"

namespace ssmk {

struct PackedSeqs {
  const int64_t* offsets;          // cu_seqlens [num_seqs + 1] (batch 1), or nullptr
  int64_t num_seqs;                // 0 without cu_seqlens
  View<const int32_t, 2> seq_idx;  // [B, L], or data nullptr
  SSMK_HOST_DEVICE bool packed() const { return offsets != nullptr; }
  SSMK_HOST_DEVICE bool any() const { return offsets != nullptr || seq_idx.data != nullptr; }
};

// What token t of a row is to the scan. With cu_seqlens every sequence's first and last token are
// reported, with seq the sequence's index (its initial and final state are per sequence). With
// seq_idx only changes of index inside the row are (seq = -1: the state restarts from zero and the
// finished sequence's state is dropped); the row's own first and last token keep the row's
// initial and final state.
struct TokenBounds {
  bool start, end;
  int64_t seq;
};

// The sequence holding token t: the last s < num_seqs with offsets[s] <= t (always in
// [0, num_seqs), whatever the offsets hold, so it indexes per-sequence states safely).
SSMK_HOST_DEVICE int64_t packed_seq_of(const int64_t* offsets, int64_t num_seqs, int64_t t) {
  int64_t lo = 0, hi = num_seqs;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Bounds of token t (0 <= t < L) of batch row b. `hint` is a sequence index at or before t's
// (e.g. the previous token's; 0 to start): tokens visited in ascending order cost O(1) each.
SSMK_HOST_DEVICE TokenBounds token_bounds(const PackedSeqs& ps, int64_t b, int64_t t, int64_t L,
                                                 int64_t& hint) {
  if (ps.offsets) {
    int64_t s = hint;
    while (s + 1 < ps.num_seqs && ps.offsets[s + 1] <= t) ++s;
    hint = s;
    return TokenBounds{ps.offsets[s] == t, ps.offsets[s + 1] == t + 1, s};
  }
  if (ps.seq_idx.data) {
    const int32_t* row = ps.seq_idx.data + b * ps.seq_idx.stride[0];
    const int64_t st = ps.seq_idx.stride[1];
    const int32_t v = row[t * st];
    return TokenBounds{t > 0 && row[(t - 1) * st] != v, t + 1 < L && row[(t + 1) * st] != v, -1};
  }
  return TokenBounds{false, false, -1};
}

// The bounds of a thread's kItems tokens t_first, t_first + 1, ... of batch row b: f(k, bounds of
// token t_first + k) for each k in turn (none from L on), one ascending hint walk.
template <int kItems, typename F>
SSMK_HOST_DEVICE void for_token_bounds(const PackedSeqs& ps, int64_t b, int64_t t_first, int64_t L, F&& f) {
  int64_t hint = ps.packed() && t_first < L ? packed_seq_of(ps.offsets, ps.num_seqs, t_first) : 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < kItems; ++k) {
    const int64_t t = t_first + k;
    f(k, t < L ? token_bounds(ps, b, t, L, hint) : TokenBounds{false, false, -1});
  }
}

}  // namespace ssmk
