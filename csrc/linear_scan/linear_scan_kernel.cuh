// CUDA kernels of linear_scan: a chunked single-pass scan.
//
// A block scans one chunk of kChunk = kThreads * kItems steps of one row. Each thread loads
// kItems consecutive elements (16-byte vector loads when the row is contiguous and aligned),
// reduces them to one affine pair, and the block scans the pairs (common/cuda/scan.h). Chunks
// are linked by a chained carry: the block of chunk c waits for the state leaving chunk c-1
// (published by its block), applies its own total to it and publishes the state leaving c. Block
// indices come from an atomic ticket in chunk order, so every block waits only on blocks that
// already run (no deadlock), and each carry is always computed by the same formula from the
// same operands (bitwise reproducible, unlike a decoupled look-back that takes whichever
// predecessor is ready). Rows are never serialised on one block: all chunks load and reduce
// their data in parallel; only the one multiply-add per chunk is chained.
//
// The forward walks a row in time order (descending with reverse); the backward walks it the
// other way with the pairs (conj(a) of the previous walk position, dh), see linear_scan_math.h.
// Threads and lanes take their scan rank in walk order, so the same kernels serve both
// directions without a template parameter.
//
// Packed sequences: a thread finds the sequence of its first item by binary search over the
// offsets (cu_seqlens, read on the device) and walks its items from there. Where a sequence
// starts in walk order the step becomes h -> 0 * h + (a * h0 + b) (the forward; the backward's
// pair likewise restarts from the final-state gradient), which the block scan and the chained
// carry compose like any other step, so the grid is the same as without packing; where a
// sequence ends the thread writes its per-sequence state.
//
// Traffic per element: forward reads a, b and writes h (3 x element size); backward reads a, h,
// dh and writes da, db (5 x element size), plus one neighbouring element of a and of h per
// thread (already in L1/L2, loaded by the next thread) and a few bytes per chunk for the carries. FLOPs: 4 per
// element forward (real: thread reduction + rescan), about 7 backward; complex 4x. Both kernels
// are bandwidth bound: the expected fraction of the copy bandwidth is 80-90% at long rows (the
// chained carry adds about one global-memory round trip per chunk, hidden by other rows).
#pragma once

#include <cstdint>

#include "common/cuda/scan.h"
#include "common/packed_seqs.h"
#include "linear_scan/linear_scan.h"
#include "linear_scan/linear_scan_math.h"

namespace ssmk::linear_scan {

// Carries between the chunks of a row; unused (chunks == 1) for rows of at most one chunk.
template <typename acc_t>
struct ChunkChain {
  int64_t chunks;
  acc_t* carries;         // [R, C]: state leaving chunk c (in walk order) of row r
  int* flags;             // [R, C]: 1 once carries[r, c] is published; zeroed per launch
  unsigned int* ticket;   // block counter; zeroed per launch
};

SSMK_DEVICE float load_cg(const float* p) { return __ldcg(p); }
SSMK_DEVICE double load_cg(const double* p) { return __ldcg(p); }
template <typename T>
SSMK_DEVICE c10::complex<T> load_cg(const c10::complex<T>* p) {
  const T* q = reinterpret_cast<const T*>(p);
  return c10::complex<T>(__ldcg(q), __ldcg(q + 1));
}
SSMK_DEVICE void store_cg(float* p, float v) { __stcg(p, v); }
SSMK_DEVICE void store_cg(double* p, double v) { __stcg(p, v); }
template <typename T>
SSMK_DEVICE void store_cg(c10::complex<T>* p, c10::complex<T> v) {
  T* q = reinterpret_cast<T*>(p);
  __stcg(q, v.real());
  __stcg(q + 1, v.imag());
}

// Loads the elements at physical positions [p0, p0 + kItems) of a row (time stride `stride`),
// `fill` outside [0, L). Vector path: the row is contiguous, its base 16-byte aligned and the
// items all inside the row (p0 is a multiple of kItems, so the items are 16-byte aligned too).
template <typename in_t, typename acc_t>
SSMK_DEVICE void load_items(const in_t* row, int64_t stride, int64_t p0, int64_t L, acc_t fill,
                            acc_t (&out)[kItems]) {
  static_assert(kItems * sizeof(in_t) % 16 == 0, "a thread's items must fill whole 16-byte vectors");
  const bool vec = stride == 1 && p0 + kItems <= L && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  if (vec) {
    constexpr int kVecs = kItems * sizeof(in_t) / 16;
    alignas(16) in_t raw[kItems];
    const uint4* src = reinterpret_cast<const uint4*>(row + p0);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(raw)[i] = src[i];
#pragma unroll
    for (int k = 0; k < kItems; ++k) out[k] = static_cast<acc_t>(raw[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = p0 + k;
      out[k] = (t >= 0 && t < L) ? static_cast<acc_t>(row[t * stride]) : fill;
    }
  }
}

// Stores the items inside [0, L) to a contiguous row.
template <typename in_t, typename acc_t>
SSMK_DEVICE void store_items(in_t* row, int64_t p0, int64_t L, const acc_t (&v)[kItems]) {
  const bool vec = p0 + kItems <= L && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  if (vec) {
    constexpr int kVecs = kItems * sizeof(in_t) / 16;
    alignas(16) in_t raw[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) raw[k] = static_cast<in_t>(v[k]);
    uint4* dst = reinterpret_cast<uint4*>(row + p0);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) dst[i] = reinterpret_cast<const uint4*>(raw)[i];
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (p0 + k < L) row[p0 + k] = static_cast<in_t>(v[k]);
    }
  }
}

// Physical order <-> walk order of a thread's items (an involution; constant indices only, so
// the arrays stay in registers).
template <typename T>
SSMK_DEVICE void to_walk_order(T (&x)[kItems], bool descending) {
  if (descending) {
#pragma unroll
    for (int k = 0; k < kItems / 2; ++k) {
      const T tmp = x[k];
      x[k] = x[kItems - 1 - k];
      x[kItems - 1 - k] = tmp;
    }
  }
}

// Packed-sequence bounds of a thread's items, in walk order: wstart[k] (a sequence starts there
// in walk order), wend[k] (one ends there), seq[k] (the sequence's index with cu_seqlens, else -1);
// then at(k, bounds of item k) for each item k in walk order.
template <typename Params, typename At>
SSMK_DEVICE void item_bounds(const Params& p, int64_t row, int64_t p0, bool descending, bool (&wstart)[kItems],
                             bool (&wend)[kItems], int64_t (&seq)[kItems], At&& at) {
  for_token_bounds<kItems>(p.seqs, row / p.rows_per_batch, p0, p.seqlen, [&](int k, const TokenBounds& tb) {
    wstart[k] = descending ? tb.end : tb.start;
    wend[k] = descending ? tb.start : tb.end;
    seq[k] = tb.seq;
  });
  to_walk_order(wstart, descending);
  to_walk_order(wend, descending);
  to_walk_order(seq, descending);
#pragma unroll
  for (int k = 0; k < kItems; ++k) at(k, TokenBounds{wstart[k], wend[k], seq[k]});
}

// A per-sequence state [S, R] of row `row`, or zero (no state given, or no per-sequence state).
template <typename acc_t>
SSMK_DEVICE acc_t sequence_state(const View<const acc_t, 1>& v, int64_t seq, int64_t rows, int64_t row) {
  return v.data && seq >= 0 ? v.data[(seq * rows + row) * v.stride[0]] : zero<acc_t>();
}

// A row's state [R] (initial state, or final-state gradient), or zero (none given, or packed
// rows, whose states are per sequence).
template <typename acc_t>
SSMK_DEVICE acc_t row_state(const View<const acc_t, 1>& v, bool packed, int64_t row) {
  return v.data && !packed ? v.data[row * v.stride[0]] : zero<acc_t>();
}

// The thread's items (pairs (coef[k], b[k]), walk order) composed into one affine pair.
template <typename acc_t>
SSMK_DEVICE cuda::AffinePair<acc_t> thread_pair(const acc_t (&coef)[kItems], const acc_t (&b)[kItems]) {
  cuda::AffinePair<acc_t> pair = cuda::affine_identity<acc_t>();
#pragma unroll
  for (int k = 0; k < kItems; ++k) pair = cuda::affine_compose(pair, cuda::AffinePair<acc_t>{coef[k], b[k]});
  return pair;
}

// Block-wide part shared by both kernels: scans the threads' pairs, links the chunk to its
// predecessor and returns the state entering this thread's first item (walk order).
template <typename acc_t>
SSMK_DEVICE acc_t chunk_carry_in(const cuda::AffinePair<acc_t>& thread_pair, const ChunkChain<acc_t>& chain,
                                 int64_t row, int64_t cw, acc_t row_start, bool descending) {
  using Pair = cuda::AffinePair<acc_t>;
  // Raw shared storage: c10::complex has a constructor, which __shared__ variables may not.
  __shared__ alignas(16) unsigned char scratch_raw[sizeof(Pair) * (kThreads / 32)];
  __shared__ alignas(16) unsigned char carry_raw[sizeof(acc_t)];
  Pair* scratch = reinterpret_cast<Pair*>(scratch_raw);
  acc_t* carry = reinterpret_cast<acc_t*>(carry_raw);
  Pair total;
  const Pair prefix = descending ? cuda::block_exclusive_scan<kThreads, true>(thread_pair, scratch, total)
                                 : cuda::block_exclusive_scan<kThreads, false>(thread_pair, scratch, total);
  if (threadIdx.x == 0) {
    acc_t cin = row_start;
    const int64_t slot = row * chain.chunks + cw;
    if (cw > 0) {
      const volatile int* flag = chain.flags + slot - 1;
      while (*flag == 0) __nanosleep(64);
      __threadfence();
      cin = load_cg(chain.carries + slot - 1);
    }
    if (cw + 1 < chain.chunks) {
      store_cg(chain.carries + slot, cuda::affine_apply(total, cin));
      __threadfence();
      atomicExch(chain.flags + slot, 1);
    }
    *carry = cin;
  }
  __syncthreads();
  return cuda::affine_apply(prefix, *carry);
}

// (row, chunk in walk order) of this block, and the physical position p0 of this thread's first
// item (the walk runs descending when `descending`).
template <typename acc_t>
SSMK_DEVICE void block_chunk(const ChunkChain<acc_t>& chain, bool descending, int64_t& row, int64_t& cw,
                             int64_t& p0) {
  __shared__ int64_t id_shared;
  int64_t id = blockIdx.x;
  if (chain.chunks > 1) {
    if (threadIdx.x == 0) id_shared = atomicAdd(chain.ticket, 1u);
    __syncthreads();
    id = id_shared;
  }
  row = id / chain.chunks;
  cw = id % chain.chunks;
  const int64_t C = chain.chunks;
  const int64_t pc = descending ? C - 1 - cw : cw;
  p0 = pc * kChunk + static_cast<int64_t>(threadIdx.x) * kItems;
}

template <typename in_t>
__global__ void __launch_bounds__(kThreads) linear_scan_fwd_kernel(LinearScanFwdParams<in_t> p,
                                                                   ChunkChain<scan_acc_t<in_t>> chain) {
  using acc_t = scan_acc_t<in_t>;
  const bool desc = p.reverse;
  int64_t row, cw, p0;
  block_chunk(chain, desc, row, cw, p0);
  const int64_t L = p.seqlen;
  acc_t a[kItems], b[kItems];
  load_items(p.a.data + row * p.a.stride[0], p.a.stride[1], p0, L, one<acc_t>(), a);
  load_items(p.b.data + row * p.b.stride[0], p.b.stride[1], p0, L, zero<acc_t>(), b);
  to_walk_order(a, desc);
  to_walk_order(b, desc);
  const bool packed = p.seqs.packed(), bounded = p.seqs.any();
  bool wstart[kItems], wend[kItems];
  int64_t seq[kItems];
  if (bounded) {
    item_bounds(p, row, p0, desc, wstart, wend, seq, [&](int k, TokenBounds tb) {
      if (tb.start) {
        b[k] = step(a[k], sequence_state(p.initial_state, tb.seq, p.rows, row), b[k]);
        a[k] = zero<acc_t>();
      }
    });
  }
  const cuda::AffinePair<acc_t> pair = thread_pair(a, b);
  acc_t s = chunk_carry_in(pair, chain, row, cw, row_state(p.initial_state, packed, row), desc);
  const int64_t t_last = desc ? 0 : L - 1;
  acc_t h[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    s = step(a[k], s, b[k]);
    h[k] = s;
    const int64_t t = desc ? p0 + kItems - 1 - k : p0 + k;
    if (!packed && t == t_last) p.last_state[row] = s;
    if (bounded && wend[k] && seq[k] >= 0) p.last_state[seq[k] * p.rows + row] = s;
  }
  to_walk_order(h, desc);
  store_items(p.h + row * L, p0, L, h);
}

template <typename in_t>
__global__ void __launch_bounds__(kThreads) linear_scan_bwd_kernel(LinearScanBwdParams<in_t> p,
                                                                   ChunkChain<scan_acc_t<in_t>> chain) {
  using acc_t = scan_acc_t<in_t>;
  const bool desc = !p.reverse;
  int64_t row, cw, p0;
  block_chunk(chain, desc, row, cw, p0);
  const int64_t L = p.seqlen;
  const in_t* a_row = p.a.data + row * p.a.stride[0];
  const in_t* h_row = p.h.data + row * p.h.stride[0];
  const bool packed = p.seqs.packed(), bounded = p.seqs.any();
  const acc_t h_start = row_state(p.initial_state, packed, row);
  // Outside the row: a = 1 (the identity step) and h = the forward's initial state, which is what
  // the walk's first and last positions see; padding positions after L never reach an output.
  acc_t a[kItems], g[kItems], h[kItems];
  load_items(a_row, p.a.stride[1], p0, L, one<acc_t>(), a);
  load_items(p.dh.data + row * p.dh.stride[0], p.dh.stride[1], p0, L, zero<acc_t>(), g);
  load_items(h_row, p.h.stride[1], p0, L, h_start, h);
  // The neighbours across the thread's edges: a at the walk position before the first item,
  // h at the walk position after the last one.
  const int64_t t_prev = desc ? p0 + kItems : p0 - 1;
  const int64_t t_next = desc ? p0 - 1 : p0 + kItems;
  const acc_t a_prev = (t_prev >= 0 && t_prev < L) ? static_cast<acc_t>(a_row[t_prev * p.a.stride[1]]) : one<acc_t>();
  const acc_t h_next = (t_next >= 0 && t_next < L) ? static_cast<acc_t>(h_row[t_next * p.h.stride[1]]) : h_start;
  to_walk_order(a, desc);
  to_walk_order(g, desc);
  to_walk_order(h, desc);
  acc_t coef[kItems];
  coef[0] = conj_of(a_prev);
#pragma unroll
  for (int k = 1; k < kItems; ++k) coef[k] = conj_of(a[k - 1]);
  // hp[k]: the forward's state before item k (the sequence's initial state where it starts).
  acc_t hp[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) hp[k] = k + 1 < kItems ? h[k + 1] : h_next;
  bool wstart[kItems], wend[kItems];
  int64_t seq[kItems];
  if (bounded) {
    item_bounds(p, row, p0, desc, wstart, wend, seq, [&](int k, TokenBounds tb) {
      if (tb.start) {
        g[k] += sequence_state(p.dlast_state, tb.seq, p.rows, row);
        coef[k] = zero<acc_t>();
      }
      if (tb.end) hp[k] = sequence_state(p.initial_state, tb.seq, p.rows, row);
    });
  }
  const cuda::AffinePair<acc_t> pair = thread_pair(coef, g);
  acc_t s = chunk_carry_in(pair, chain, row, cw, row_state(p.dlast_state, packed, row), desc);
  const int64_t t_last = desc ? 0 : L - 1;
  acc_t da[kItems], db[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    s = step(coef[k], s, g[k]);
    db[k] = s;
    da[k] = s * conj_of(hp[k]);
    const int64_t t = desc ? p0 + kItems - 1 - k : p0 + k;
    if (!packed && t == t_last) p.dinitial_state[row] = conj_of(a[k]) * s;
    if (bounded && wend[k] && seq[k] >= 0) p.dinitial_state[seq[k] * p.rows + row] = conj_of(a[k]) * s;
  }
  to_walk_order(da, desc);
  to_walk_order(db, desc);
  store_items(p.da + row * L, p0, L, da);
  store_items(p.db + row * L, p0, L, db);
}

// Workspace (zeroed by the host, linear_scan::cuda_workspace_ints): the chain's carries first
// (the allocation's alignment serves every acc_t), then its flags and ticket.
template <typename acc_t>
ChunkChain<acc_t> chunk_chain(int64_t rows, int64_t seqlen, int* workspace) {
  const int64_t C = (seqlen + kChunk - 1) / kChunk;
  ChunkChain<acc_t> chain{C, nullptr, nullptr, nullptr};
  if (C > 1) {
    const int64_t blocks = rows * C;
    const int64_t carry_ints = (blocks * static_cast<int64_t>(sizeof(acc_t)) + 3) / 4;
    chain.carries = reinterpret_cast<acc_t*>(workspace);
    chain.flags = workspace + carry_ints;
    chain.ticket = reinterpret_cast<unsigned int*>(chain.flags + blocks);
  }
  return chain;
}

}  // namespace ssmk::linear_scan
