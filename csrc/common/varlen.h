// Packed variable-length sequences: the host checks of `cu_seqlens` and `seq_idx` that every op
// shares (API.md: packed sequences).
//
// cu_seqlens [num_seqs + 1], int32 or int64, batch == 1: sequence s holds tokens
// [cu_seqlens[s], cu_seqlens[s + 1]) of the one row. seq_idx [batch, seqlen] int32: the sequence
// of each token, non-decreasing along seqlen.
//
// Content (starts at 0, non-decreasing, ends at seqlen) is checked only for CPU tensors: reading
// CUDA memory here would synchronise the stream. With SSM_KERNELS_DEBUG=1 in the environment CUDA
// tensors are checked too, at the cost of one device sync per call. CUDA kernels clamp every
// offset they read into [0, seqlen], so bad content gives unspecified values, never an
// out-of-bounds access.
#pragma once

#include "common/aten.h"

#include <cstdlib>
#include <optional>

#include "common/checks.h"

namespace ssmk {

inline bool varlen_debug_checks() {
  static const bool on = [] {
    const char* v = std::getenv("SSM_KERNELS_DEBUG");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

// Packed-sequence layout of one call, as the kernels read it.
struct Varlen {
  at::Tensor offsets;    // [num_seqs + 1] int64 contiguous, on the inputs' device; undefined if none
  int64_t num_seqs = 0;  // 0 without cu_seqlens
  bool packed() const { return offsets.defined(); }
};

// Checks cu_seqlens against the inputs' batch and seqlen (ref: the tensor whose device every
// argument shares) and returns it as int64 offsets. `seq_idx` is given only to reject passing both.
inline Varlen check_cu_seqlens(const std::optional<at::Tensor>& cu_seqlens,
                               const std::optional<at::Tensor>& seq_idx, int64_t batch,
                               int64_t seqlen, const at::Tensor& ref) {
  Varlen v;
  if (!cu_seqlens) return v;
  const at::Tensor& c = *cu_seqlens;
  SSMK_CHECK_VALUE(!seq_idx, "cu_seqlens: expected at most one of cu_seqlens and seq_idx, got both");
  SSMK_CHECK_TYPE(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong,
                  "cu_seqlens: expected dtype int32 or int64, got ", c.scalar_type());
  SSMK_CHECK_VALUE(c.dim() == 1 && c.size(0) >= 2,
                   "cu_seqlens: expected shape (num_seqs + 1,) with num_seqs >= 1, got ", c.sizes());
  check_same_device(c, ref, "cu_seqlens");
  SSMK_CHECK_VALUE(batch == 1, "cu_seqlens: expected batch 1 (sequences packed into one row), got batch ",
                   batch);
  v.offsets = c.to(at::kLong).contiguous();
  v.num_seqs = c.size(0) - 1;
  if (c.is_cpu() || varlen_debug_checks()) {
    const at::Tensor h = v.offsets.cpu();
    const int64_t* o = h.data_ptr<int64_t>();
    SSMK_CHECK_VALUE(o[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got ", o[0]);
    for (int64_t s = 0; s < v.num_seqs; ++s) {
      SSMK_CHECK_VALUE(o[s + 1] >= o[s], "cu_seqlens: expected non-decreasing values, got cu_seqlens[", s,
                       "] = ", o[s], " > cu_seqlens[", s + 1, "] = ", o[s + 1]);
    }
    SSMK_CHECK_VALUE(o[v.num_seqs] == seqlen, "cu_seqlens: expected the last value to equal seqlen ", seqlen,
                     ", got ", o[v.num_seqs]);
  }
  return v;
}

// seq_idx [batch, seqlen] int32 on ref's device, non-decreasing along seqlen (content checked as
// for cu_seqlens above).
inline void check_seq_idx(const at::Tensor& seq_idx, int64_t batch, int64_t seqlen, const at::Tensor& ref) {
  check_shape(seq_idx, {batch, seqlen}, "seq_idx");
  check_dtype(seq_idx, at::kInt, "seq_idx");
  check_same_device(seq_idx, ref, "seq_idx");
  if (!seq_idx.is_cpu() && !varlen_debug_checks()) return;
  const at::Tensor s = seq_idx.cpu().contiguous();
  const int32_t* v = s.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t l = 0; l + 1 < seqlen; ++l) {
      const int32_t cur = v[b * seqlen + l], next = v[b * seqlen + l + 1];
      SSMK_CHECK_VALUE(next >= cur, "seq_idx: expected values non-decreasing along seqlen, got seq_idx[", b, ", ",
                       l, "] = ", cur, " > seq_idx[", b, ", ", l + 1, "] = ", next);
    }
  }
}

}  // namespace ssmk
