// linear_scan: typed kernel parameters and the kernel launchers of both devices.
//
// The leading shape (...) of a, b [..., L] is flattened to R rows; a row's elements need not be
// contiguous (any row and time strides); the outputs are contiguous [R, L] / [R].
// Packed sequences (common/packed_seqs.h) run along L. With cu_seqlens (batch 1) the states are
// per sequence, [S, R] (index s * R + r): initial_state, last_state, dlast_state,
// dinitial_state. With seq_idx row r belongs to batch row r / rows_per_batch.
// The host side (checks, allocation, the fill of these params) is linear_scan_op.cpp.
#pragma once

#include <cstdint>

#include "common/packed_seqs.h"
#include "common/types.h"
#include "linear_scan/linear_scan_math.h"

namespace ssmk {

template <typename T>
struct LinearScanCommon {
  using acc = acc_t<T>;
  int64_t rows, seqlen;
  bool reverse;                      // direction of the forward recurrence (h_t from h_{t+1})
  View<const T, 2> a;                // [R, L]
  View<const acc, 1> initial_state;  // [R] ([S, R] packed), or data nullptr (zeros)
  PackedSeqs seqs;
  int64_t rows_per_batch;            // R / batch
};

template <typename T>
struct LinearScanFwdParams : LinearScanCommon<T> {
  using acc = acc_t<T>;
  View<const T, 2> b;  // [R, L]
  T* h;                // [R, L] contiguous
  acc* last_state;     // [R] ([S, R] packed)
};

template <typename T>
struct LinearScanBwdParams : LinearScanCommon<T> {
  using acc = acc_t<T>;
  View<const T, 2> h;              // [R, L]: the forward's output
  View<const T, 2> dh;             // [R, L]
  View<const acc, 1> dlast_state;  // [R] ([S, R] packed), or data nullptr
  T* da;                           // [R, L] contiguous
  T* db;                           // [R, L] contiguous
  acc* dinitial_state;             // [R] ([S, R] packed)
};

namespace linear_scan {

// CUDA workspace of a launch, in ints: the chained carries between a row's chunks (see
// linear_scan_kernel.cuh); none for rows of one chunk. Zero-filled by the host.
template <typename T>
int64_t cuda_workspace_ints(int64_t rows, int64_t seqlen) {
  const int64_t chunks = (seqlen + kChunk - 1) / kChunk;
  if (chunks <= 1) return 0;
  const int64_t slots = rows * chunks;
  const int64_t carry_ints = (slots * static_cast<int64_t>(sizeof(acc_t<T>)) + 3) / 4;
  return slots + 1 + carry_ints;
}

}  // namespace linear_scan

template <typename T> void linear_scan_fwd_cpu(const LinearScanFwdParams<T>& p);
template <typename T> void linear_scan_bwd_cpu(const LinearScanBwdParams<T>& p);

#if defined(SSMK_WITH_CUDA)
template <typename T> void linear_scan_fwd_cuda(const LinearScanFwdParams<T>& p, int* workspace, const CudaContext& ctx);
template <typename T> void linear_scan_bwd_cuda(const LinearScanBwdParams<T>& p, int* workspace, const CudaContext& ctx);
#endif

}  // namespace ssmk
