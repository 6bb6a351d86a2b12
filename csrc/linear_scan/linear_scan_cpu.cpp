// CPU kernels of linear_scan.
//
// Many rows (the common case: batch * dim rows): rows are independent, so at::parallel_for splits
// them over threads and each thread walks kGroup rows side by side. The recurrence is one
// dependent multiply-add per step; interleaving kGroup rows keeps kGroup independent chains in
// flight (hiding the FMA latency, which alone would make one row at a time 2.5x slower) while
// every row is still read and written contiguously.
//
// Few long rows (fewer than kFewRows rows of at least two chunks): the CUDA kernel's chunks of
// kChunk steps. Pass 1 reduces every chunk but the last to its affine pair (product of a, scan
// from zero); pass 2 carries the state across the chunks of each row (the CUDA kernel's chained
// carry, same formula); pass 3 rescans every chunk from its carry and writes the outputs. The
// choice of mode depends only on the shape, so results are bitwise reproducible.
//
// The backward is the same walk in the opposite direction (linear_scan_math.h).
//
// Packed sequences: with cu_seqlens, the work items are (sequence, unit of kGroup rows), each a
// walk of one sequence from its own initial state (gradient: from its final state's gradient);
// with seq_idx, each row is walked one sequence at a time, restarting from zero where the index
// changes. No item reads another sequence's tokens.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/cpu.h"
#include "common/parallel.h"
#include "linear_scan/linear_scan.h"

namespace ssmk {
namespace {

using linear_scan::Affine;
using linear_scan::kChunk;
using linear_scan::kFewRows;
using linear_scan::scan_acc_t;

constexpr int kGroup = 4;

// A row is walked in scan order: walk position u of row r sits at at(r, u), u * step elements past
// the walk's start. The forward walks time ascending (descending with reverse); the backward the
// other way.
struct Walk {
  bool descending;
  int64_t L;
  // Elements between walk positions, for a time stride t_stride.
  SSMK_CPU_INLINE int64_t step(int64_t t_stride) const { return descending ? -t_stride : t_stride; }
  // Walk position u of row r of a [R, L] buffer with strides (row_stride, t_stride).
  template <typename E>
  SSMK_CPU_INLINE E* at(E* data, int64_t row_stride, int64_t t_stride, int64_t r, int64_t u) const {
    return data + r * row_stride + (descending ? (L - 1) * t_stride : 0) + u * step(t_stride);
  }
  template <typename E>
  SSMK_CPU_INLINE E* at(const View<E, 2>& v, int64_t r, int64_t u) const {
    return at(v.data, v.stride[0], v.stride[1], r, u);
  }
};

// One operand of G rows walked side by side: each row's pointer at the segment's first walk
// position, and the elements between walk positions.
template <typename E, int G>
struct WalkRows {
  E* row[G];
  int64_t step;
  // Rows r0 .. r0+G-1 of a [R, L] buffer with strides (row_stride, t_stride), from walk position u0.
  SSMK_CPU_INLINE void start(const Walk& w, E* data, int64_t row_stride, int64_t t_stride, int64_t r0, int64_t u0) {
    step = w.step(t_stride);
    for (int g = 0; g < G; ++g) row[g] = w.at(data, row_stride, t_stride, r0 + g, u0);
  }
  SSMK_CPU_INLINE void start(const Walk& w, const View<E, 2>& v, int64_t r0, int64_t u0) {
    start(w, v.data, v.stride[0], v.stride[1], r0, u0);
  }
  // Row g at walk position j of the segment.
  SSMK_CPU_INLINE E& operator()(int g, int64_t j) const { return row[g][j * step]; }
};

template <typename acc_t>
SSMK_CPU_INLINE acc_t load_state(const View<const acc_t, 1>& v, int64_t r) {
  return v.data ? v.data[r * v.stride[0]] : acc_t(0);
}

template <typename in_t, bool kBwd>
using ParamsOf = std::conditional_t<kBwd, LinearScanBwdParams<in_t>, LinearScanFwdParams<in_t>>;

// Row g of a group runs kSkew * g steps behind row 0. Rows of power-of-two length are a
// power-of-two apart in memory, and G rows read in lockstep would all map to the same L1 set
// and evict each other (measured 4x slower than the skewed walk at L = 4096); a skew of one
// cache line per row spreads them over G sets.
template <typename in_t>
constexpr int64_t skew() {
  return sizeof(in_t) >= 16 ? 4 : 64 / static_cast<int64_t>(sizeof(in_t));
}

// Calls rows.at(g, j) for every row g < G and step j < n, each row in ascending j.
template <int G, int64_t kSkew, typename Rows>
SSMK_CPU_INLINE void skewed_walk(Rows& rows, int64_t n) {
  constexpr int64_t lag = kSkew * (G - 1);
  int64_t i = 0;
  for (; i < std::min(lag, n + lag); ++i) {
    for (int g = 0; g < G; ++g) {
      const int64_t j = i - kSkew * g;
      if (j >= 0 && j < n) rows.at(g, j);
    }
  }
  for (; i < n; ++i) {  // all rows inside the segment
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) rows.at(g, i - kSkew * g);
  }
  for (; i < n + lag; ++i) {
    for (int g = 0; g < G; ++g) {
      const int64_t j = i - kSkew * g;
      if (j >= 0 && j < n) rows.at(g, j);
    }
  }
}

template <typename in_t, int G>
struct FwdRows {
  using acc_t = scan_acc_t<in_t>;
  WalkRows<const in_t, G> a, b;
  WalkRows<in_t, G> h;
  acc_t s[G];
  SSMK_CPU_INLINE void at(int g, int64_t j) {
    s[g] = linear_scan::step(static_cast<acc_t>(a(g, j)), s[g], static_cast<acc_t>(b(g, j)));
    h(g, j) = static_cast<in_t>(s[g]);
  }
};

// Forward over walk positions [u0, u1) of rows r0 .. r0+G-1, from and into state[G]; writes h.
template <typename in_t, int G>
SSMK_CPU_INLINE void fwd_segment(const LinearScanFwdParams<in_t>& p, int64_t r0, int64_t u0, int64_t u1,
                                 scan_acc_t<in_t>* state) {
  const Walk w{p.reverse, p.seqlen};
  FwdRows<in_t, G> rows;
  rows.a.start(w, p.a, r0, u0);
  rows.b.start(w, p.b, r0, u0);
  rows.h.start(w, p.h, p.seqlen, 1, r0, u0);
  for (int g = 0; g < G; ++g) rows.s[g] = state[g];
  skewed_walk<G, skew<in_t>()>(rows, u1 - u0);
  for (int g = 0; g < G; ++g) state[g] = rows.s[g];
}

template <typename in_t, int G>
struct BwdRows {
  using acc_t = scan_acc_t<in_t>;
  WalkRows<const in_t, G> a, g_in, h;
  WalkRows<in_t, G> da, db;
  acc_t s[G], coef[G];
  // One step whose forward predecessor state is h at walk position j + 1.
  SSMK_CPU_INLINE void at(int g, int64_t j) {
    s[g] = linear_scan::step(coef[g], s[g], static_cast<acc_t>(g_in(g, j)));
    db(g, j) = static_cast<in_t>(s[g]);
    da(g, j) = static_cast<in_t>(s[g] * conj_of(static_cast<acc_t>(h(g, j + 1))));
    coef[g] = conj_of(static_cast<acc_t>(a(g, j)));
  }
};

// Backward over walk positions [u0, u1) (walk position u is forward position L-1-u) of rows
// r0 .. r0+G-1: dh_u = coef_u * dh_{u-1} + g_u with coef_u = conj(a at walk position u-1) (1 where
// a sequence starts in walk order: `fresh`); db = dh, da = dh * conj(h at walk position u+1, the
// forward's previous state). With h0 (the segment ends where its sequence starts in forward
// order), the last position reads the sequence's initial state h0[g] instead, and state[g]
// leaves as the initial state's gradient conj(a there) * dh.
template <typename in_t, int G>
SSMK_CPU_INLINE void bwd_segment(const LinearScanBwdParams<in_t>& p, int64_t r0, int64_t u0, int64_t u1,
                                 scan_acc_t<in_t>* state, bool fresh, const scan_acc_t<in_t>* h0) {
  using acc_t = scan_acc_t<in_t>;
  const Walk w{!p.reverse, p.seqlen};
  BwdRows<in_t, G> rows;
  rows.a.start(w, p.a, r0, u0);
  rows.g_in.start(w, p.dh, r0, u0);
  rows.h.start(w, p.h, r0, u0);
  rows.da.start(w, p.da, p.seqlen, 1, r0, u0);
  rows.db.start(w, p.db, p.seqlen, 1, r0, u0);
  for (int g = 0; g < G; ++g) {
    rows.s[g] = state[g];
    rows.coef[g] = fresh ? acc_t(1) : conj_of(static_cast<acc_t>(rows.a(g, -1)));
  }
  // The sequence's first position reads the initial state instead of h: peel it off the walk.
  const int64_t n = u1 - u0;
  skewed_walk<G, skew<in_t>()>(rows, h0 ? n - 1 : n);
  for (int g = 0; g < G; ++g) state[g] = rows.s[g];
  if (h0) {
    const int64_t j = n - 1;
    for (int g = 0; g < G; ++g) {
      acc_t& s = state[g];
      s = linear_scan::step(rows.coef[g], s, static_cast<acc_t>(rows.g_in(g, j)));
      rows.db(g, j) = static_cast<in_t>(s);
      rows.da(g, j) = static_cast<in_t>(s * conj_of(h0[g]));
      s = conj_of(static_cast<acc_t>(rows.a(g, j))) * s;
    }
  }
}

// The affine pair of walk positions [u0, u1) of row r (chunk mode, pass 1).
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE Affine<scan_acc_t<in_t>> chunk_pair(const ParamsOf<in_t, kBwd>& p, int64_t r, int64_t u0,
                                                   int64_t u1) {
  using acc_t = scan_acc_t<in_t>;
  const Walk w{kBwd ? !p.reverse : p.reverse, p.seqlen};
  const int64_t as = w.step(p.a.stride[1]);
  const in_t* a = w.at(p.a, r, u0);
  acc_t A(1), B(0);
  if constexpr (!kBwd) {
    const int64_t bs = w.step(p.b.stride[1]);
    const in_t* b = w.at(p.b, r, u0);
    for (int64_t i = 0; i < u1 - u0; ++i) {
      const acc_t ai = static_cast<acc_t>(a[i * as]);
      B = linear_scan::step(ai, B, static_cast<acc_t>(b[i * bs]));
      A = ai * A;
    }
  } else {
    const int64_t gs = w.step(p.dh.stride[1]);
    const in_t* g = w.at(p.dh, r, u0);
    acc_t coef = u0 == 0 ? acc_t(1) : conj_of(static_cast<acc_t>(a[-as]));
    for (int64_t i = 0; i < u1 - u0; ++i) {
      B = linear_scan::step(coef, B, static_cast<acc_t>(g[i * gs]));
      A = coef * A;
      coef = conj_of(static_cast<acc_t>(a[i * as]));
    }
  }
  return Affine<acc_t>{A, B};
}

// One walk of walk positions [u0, u1); `fresh` and h0 as for bwd_segment (the forward ignores
// them). On return state[g] is what leaves the segment: the forward's state, or the gradient of
// the state before it.
template <typename in_t, bool kBwd, int G>
SSMK_CPU_INLINE void segment(const ParamsOf<in_t, kBwd>& p, int64_t r0, int64_t u0, int64_t u1,
                             scan_acc_t<in_t>* state, bool fresh, const scan_acc_t<in_t>* h0) {
  if constexpr (kBwd) {
    bwd_segment<in_t, G>(p, r0, u0, u1, state, fresh, h0);
  } else {
    fwd_segment<in_t, G>(p, r0, u0, u1, state);
  }
}

// Where the state leaving a whole row (or sequence) goes: last_state or dinitial_state.
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE scan_acc_t<in_t>* end_state(const ParamsOf<in_t, kBwd>& p) {
  if constexpr (kBwd) {
    return p.dinitial_state;
  } else {
    return p.last_state;
  }
}

template <typename in_t, bool kBwd>
SSMK_CPU_INLINE scan_acc_t<in_t> start_state(const ParamsOf<in_t, kBwd>& p, int64_t r) {
  if constexpr (kBwd) {
    return load_state(p.dlast_state, r);
  } else {
    return load_state(p.initial_state, r);
  }
}

// Walks rows r0 .. r0+G-1 over walk positions [u0, u1), one whole sequence whose states sit at
// state_base + r (initial state or final-state gradient in, final state or initial-state
// gradient out; state_base < 0: from zero, dropped); `last` (backward): u1 - 1 is the sequence's
// forward start (its initial state, or zero, is the forward's previous state there).
template <typename in_t, bool kBwd, int G>
SSMK_CPU_INLINE void sequence_walk(const ParamsOf<in_t, kBwd>& p, int64_t r0, int64_t u0, int64_t u1,
                                   int64_t state_base, bool last) {
  using acc_t = scan_acc_t<in_t>;
  acc_t state[G], h0[G];
  for (int g = 0; g < G; ++g) {
    state[g] = state_base < 0 ? acc_t(0) : start_state<in_t, kBwd>(p, state_base + r0 + g);
    h0[g] = state_base < 0 ? acc_t(0) : load_state(p.initial_state, state_base + r0 + g);
  }
  segment<in_t, kBwd, G>(p, r0, u0, u1, state, true, last ? h0 : nullptr);
  if (state_base >= 0) {
    for (int g = 0; g < G; ++g) end_state<in_t, kBwd>(p)[state_base + r0 + g] = state[g];
  }
}

// Walks units [begin, end) of kGroup rows (the last unit may be short) over one sequence.
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void unit_walks(const ParamsOf<in_t, kBwd>& p, int64_t unit, int64_t u0, int64_t u1,
                                int64_t state_base) {
  const int64_t r0 = unit * kGroup;
  if (r0 + kGroup <= p.rows) {
    sequence_walk<in_t, kBwd, kGroup>(p, r0, u0, u1, state_base, true);
  } else {
    for (int64_t r = r0; r < p.rows; ++r) sequence_walk<in_t, kBwd, 1>(p, r, u0, u1, state_base, true);
  }
}

// Row mode: units of kGroup rows, each walked over its whole length.
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void row_units(const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end) {
  for (int64_t unit = begin; unit < end; ++unit) unit_walks<in_t, kBwd>(p, unit, 0, p.seqlen, 0);
}
SSMK_CPU_MULTIVERSION(row_units, (typename in_t, bool kBwd), (in_t, kBwd),
                      (const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end), (p, begin, end))

// Chunk mode, pass 1: pairs[r * C + c] for chunks c < C - 1 (items r * (C - 1) + c).
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void chunk_pairs(const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end,
                                 Affine<scan_acc_t<in_t>>* pairs) {
  const int64_t C = (p.seqlen + kChunk - 1) / kChunk;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / (C - 1), c = item % (C - 1);
    pairs[r * C + c] = chunk_pair<in_t, kBwd>(p, r, c * kChunk, (c + 1) * kChunk);
  }
}
SSMK_CPU_MULTIVERSION(chunk_pairs, (typename in_t, bool kBwd), (in_t, kBwd),
                      (const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end,
                       Affine<scan_acc_t<in_t>>* pairs),
                      (p, begin, end, pairs))

// Chunk mode, pass 3: chunk c of row r (item r * C + c) rescanned from its carry-in.
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void chunk_scans(const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end,
                                 const scan_acc_t<in_t>* carries) {
  const int64_t C = (p.seqlen + kChunk - 1) / kChunk;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / C, c = item % C;
    scan_acc_t<in_t> state = carries[item];
    const bool last = c == C - 1;
    const scan_acc_t<in_t> h0 = load_state(p.initial_state, r);
    segment<in_t, kBwd, 1>(p, r, c * kChunk, std::min(p.seqlen, (c + 1) * kChunk), &state, c == 0,
                           last ? &h0 : nullptr);
    if (last) end_state<in_t, kBwd>(p)[r] = state;
  }
}
SSMK_CPU_MULTIVERSION(chunk_scans, (typename in_t, bool kBwd), (in_t, kBwd),
                      (const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end,
                       const scan_acc_t<in_t>* carries),
                      (p, begin, end, carries))

// cu_seqlens: item = unit * num_seqs + sequence (a thread's items walk a unit's rows on from one
// sequence to the next, the memory order of the unpacked walk); sequence s covers forward
// positions [offsets[s], offsets[s + 1]) and keeps its states at s * rows + r. Empty sequences
// are skipped (the host set their final state).
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void packed_items(const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end) {
  const int64_t S = p.seqs.num_seqs, L = p.seqlen;
  const bool desc = kBwd ? !p.reverse : p.reverse;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t unit = item / S, s = desc ? S - 1 - item % S : item % S;
    const int64_t t0 = p.seqs.offsets[s], t1 = p.seqs.offsets[s + 1];
    if (t1 == t0) continue;
    unit_walks<in_t, kBwd>(p, unit, desc ? L - t1 : t0, desc ? L - t0 : t1, s * p.rows);
  }
}
SSMK_CPU_MULTIVERSION(packed_items, (typename in_t, bool kBwd), (in_t, kBwd),
                      (const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end), (p, begin, end))

// seq_idx: row r (of batch row r / rows_per_batch) walked one run of equal indices at a time; the
// row's first run in walk order starts from the row's state, the last one ends in it, the
// others start from zero and their final state is dropped.
template <typename in_t, bool kBwd>
SSMK_CPU_INLINE void seq_idx_rows(const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end) {
  using acc_t = scan_acc_t<in_t>;
  const int64_t L = p.seqlen;
  const bool desc = kBwd ? !p.reverse : p.reverse;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.rows_per_batch;
    const int32_t* idx = p.seqs.seq_idx.data + b * p.seqs.seq_idx.stride[0];
    const int64_t st = p.seqs.seq_idx.stride[1];
    const auto index_at = [&](int64_t u) { return idx[(desc ? L - 1 - u : u) * st]; };
    acc_t state = start_state<in_t, kBwd>(p, r);
    for (int64_t u0 = 0; u0 < L;) {
      int64_t u1 = u0 + 1;
      while (u1 < L && index_at(u1) == index_at(u0)) ++u1;
      const acc_t h0 = u1 == L ? load_state(p.initial_state, r) : acc_t(0);
      segment<in_t, kBwd, 1>(p, r, u0, u1, &state, true, &h0);
      if (u1 == L) end_state<in_t, kBwd>(p)[r] = state;
      state = acc_t(0);
      u0 = u1;
    }
  }
}
SSMK_CPU_MULTIVERSION(seq_idx_rows, (typename in_t, bool kBwd), (in_t, kBwd),
                      (const ParamsOf<in_t, kBwd>& p, int64_t begin, int64_t end), (p, begin, end))

// Outputs of many megabytes are written once, front to back; with 4 KB pages their first-touch
// page faults cost as much as the scan itself (measured: 250 ms against 50 ms with huge pages for
// 128 MB). Ask for transparent huge pages on the 2 MB-aligned interior before the first write;
// a no-op where the kernel does not offer them.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

template <typename in_t, bool kBwd>
void run(const ParamsOf<in_t, kBwd>& p) {
  using acc_t = scan_acc_t<in_t>;
  const int64_t R = p.rows, L = p.seqlen;
  const int64_t out_bytes = R * L * static_cast<int64_t>(sizeof(in_t));
  if constexpr (kBwd) {
    advise_huge_pages(p.da, out_bytes);
    advise_huge_pages(p.db, out_bytes);
  } else {
    advise_huge_pages(p.h, out_bytes);
  }
  if (p.seqs.packed()) {
    const int64_t units = (R + kGroup - 1) / kGroup;
    cpu::parallel_items(p.seqs.num_seqs * units, kGroup * L / std::max<int64_t>(1, p.seqs.num_seqs),
                        [&](int64_t begin, int64_t end) { packed_items_dispatch<in_t, kBwd>(p, begin, end); });
    return;
  }
  if (p.seqs.seq_idx.data) {
    cpu::parallel_items(R, L, [&](int64_t begin, int64_t end) { seq_idx_rows_dispatch<in_t, kBwd>(p, begin, end); });
    return;
  }
  const int64_t C = (L + kChunk - 1) / kChunk;
  if (R >= kFewRows || C < 2) {
    cpu::parallel_items((R + kGroup - 1) / kGroup, kGroup * L,
                        [&](int64_t begin, int64_t end) { row_units_dispatch<in_t, kBwd>(p, begin, end); });
    return;
  }
  std::vector<Affine<acc_t>> pairs(R * C);
  cpu::parallel_items(R * (C - 1), kChunk, [&](int64_t begin, int64_t end) {
    chunk_pairs_dispatch<in_t, kBwd>(p, begin, end, pairs.data());
  });
  // Pass 2: carries[r * C + c] is the state entering chunk c.
  std::vector<acc_t> carries(R * C);
  for (int64_t r = 0; r < R; ++r) {
    acc_t carry = start_state<in_t, kBwd>(p, r);
    carries[r * C] = carry;
    for (int64_t c = 1; c < C; ++c) {
      carry = pairs[r * C + c - 1].apply(carry);
      carries[r * C + c] = carry;
    }
  }
  cpu::parallel_items(R * C, kChunk, [&](int64_t begin, int64_t end) {
    chunk_scans_dispatch<in_t, kBwd>(p, begin, end, carries.data());
  });
}

}  // namespace

template <typename T>
void linear_scan_fwd_cpu(const LinearScanFwdParams<T>& p) {
  run<T, false>(p);
}
template <typename T>
void linear_scan_bwd_cpu(const LinearScanBwdParams<T>& p) {
  run<T, true>(p);
}

#define SSMK_INSTANTIATE(T)                                                  \
  template void linear_scan_fwd_cpu<T>(const LinearScanFwdParams<T>&); \
  template void linear_scan_bwd_cpu<T>(const LinearScanBwdParams<T>&);
SSMK_FLOAT_AND_COMPLEX_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
