// CPU kernels of causal_conv1d: one (batch, channel) row at a time, converted once into an
// accumulation-dtype buffer with its W-1 history in front, so the inner loops run over contiguous
// memory and vectorise. Rows are independent (at::parallel_for); the weight and bias gradients are
// reduced per channel over batch and time in a fixed order (deterministic). The host side is
// causal_conv1d_op.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "causal_conv1d/causal_conv1d.h"
#include "common/cpu.h"
#include "common/parallel.h"

namespace ssmk {
namespace {

using causal_conv1d::activation;
using causal_conv1d::activation_backward;
using causal_conv1d::same_sequence;

// One stretch of a row run as a whole sequence: row b's positions [start, start + len), with the
// initial/final states (and their gradients) of slot `state`. A row is one segment; with packed
// sequences (batch 1) each sequence is one.
struct Segment {
  int64_t b, start, len, state;
};

template <typename Params>
int64_t num_segments(const Params& p) {
  return p.offsets ? p.num_seqs : p.batch;
}
template <typename Params>
Segment segment(const Params& p, int64_t i) {
  if (!p.offsets) return {i, 0, p.seqlen, i};
  return {0, p.offsets[i], p.offsets[i + 1] - p.offsets[i], i};
}

// buf[0 .. W-2] = history before the segment (initial states or zeros), buf[W-1 + t] = x[t].
template <typename input_t, typename acc_t>
SSMK_CPU_INLINE void load_row(const CausalConv1dCommon<input_t>& p, const Segment& sg, int64_t d, acc_t* buf) {
  const int64_t W = p.width, L = sg.len;
  const auto* init = p.initial_states.data;
  for (int64_t j = 0; j < W - 1; ++j) {
    buf[j] = init ? static_cast<acc_t>(init[sg.state * p.initial_states.stride[0] + d * p.initial_states.stride[1] +
                                            j * p.initial_states.stride[2]])
                  : acc_t(0);
  }
  const auto* x = p.x.data + sg.b * p.x.stride[0] + d * p.x.stride[1] + sg.start * p.x.stride[2];
  acc_t* row = buf + (W - 1);
  if (p.x.stride[2] == 1) {
    for (int64_t t = 0; t < L; ++t) row[t] = static_cast<acc_t>(x[t]);
  } else {
    for (int64_t t = 0; t < L; ++t) row[t] = static_cast<acc_t>(x[t * p.x.stride[2]]);
  }
}

// pre[t] = bias + sum_k w[k] * buf[t + k]  (the pre-activation output), for t in [0, L).
template <typename input_t, typename acc_t>
SSMK_CPU_INLINE void conv_row(const CausalConv1dCommon<input_t>& p, const Segment& sg, const acc_t* w, acc_t bias,
                              const acc_t* buf, acc_t* pre) {
  const int64_t W = p.width, L = sg.len, b = sg.b;
  if (!p.seq_idx.data) {
    for (int64_t t = 0; t < L; ++t) pre[t] = bias;
    for (int64_t k = 0; k < W; ++k) {
      const acc_t wk = w[k];
      const acc_t* src = buf + k;
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) pre[t] += wk * src[t];
    }
    return;
  }
  const int32_t* seq = p.seq_idx.data + b * p.seq_idx.stride[0];
  for (int64_t t = 0; t < L; ++t) {
    acc_t acc = bias;
    for (int64_t k = 0; k < W; ++k) {
      const int64_t pos = causal_conv1d::tap_position(t, static_cast<int>(k), static_cast<int>(W));
      if (same_sequence(seq, p.seq_idx.stride[1], t, pos)) acc += w[k] * buf[t + k];
    }
    pre[t] = acc;
  }
}

// out[j] = act(bias + sum_k w[k] * buf[j + k]) for j < n, with the width known at compile time.
// `buf` is the staged chunk, or the input row itself when it is contiguous and has no history in
// the chunk (then src_t is the input dtype and the conversion happens in the loop).
template <int kW, typename acc_t, typename src_t, typename input_t>
SSMK_CPU_INLINE void conv_chunk(const src_t* SSMK_RESTRICT buf, const acc_t* w, acc_t bias, bool use_silu,
                                input_t* SSMK_RESTRICT out, int64_t n) {
  acc_t wr[kW];
  for (int k = 0; k < kW; ++k) wr[k] = w[k];
  if (use_silu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = bias;
      for (int k = 0; k < kW; ++k) acc += wr[k] * static_cast<acc_t>(buf[j + k]);
      out[j] = static_cast<input_t>(ssmk::silu(acc));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = bias;
      for (int k = 0; k < kW; ++k) acc += wr[k] * static_cast<acc_t>(buf[j + k]);
      out[j] = static_cast<input_t>(acc);
    }
  }
}

// The width as a compile-time constant: the taps unroll and one vectorised pass does the conv,
// the activation and the store.
template <typename acc_t, typename src_t, typename input_t>
SSMK_CPU_INLINE void conv_chunk_any_width(int64_t W, const src_t* buf, const acc_t* w, acc_t bias, bool use_silu,
                                          input_t* out, int64_t n) {
  switch (W) {
    case 2: conv_chunk<2>(buf, w, bias, use_silu, out, n); break;
    case 3: conv_chunk<3>(buf, w, bias, use_silu, out, n); break;
    case 4: conv_chunk<4>(buf, w, bias, use_silu, out, n); break;
    case 5: conv_chunk<5>(buf, w, bias, use_silu, out, n); break;
    case 6: conv_chunk<6>(buf, w, bias, use_silu, out, n); break;
    case 7: conv_chunk<7>(buf, w, bias, use_silu, out, n); break;
    default: conv_chunk<8>(buf, w, bias, use_silu, out, n); break;
  }
}

// The forward walks each row in chunks of kChunkSize outputs (the CUDA kernel's block), so the
// chunk, its W-1 history and the accumulators stay in L1.
template <typename input_t>
SSMK_CPU_INLINE void fwd_rows(const CausalConv1dFwdParams<input_t>& p, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  constexpr int64_t kChunk = causal_conv1d::kChunkSize;
  const int64_t W = p.width;
  const auto* weight = p.weight;
  const auto* bias = p.bias;
  const auto* init_base = p.initial_states.data;
  const int64_t segments = p.offsets ? p.num_seqs : 1;
  {
    acc_t buf[kChunk + causal_conv1d::kMaxWidth - 1];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t d = r % p.dim;
      const acc_t* w = weight + d * W;
      const acc_t bias_d = bias ? bias[d] : acc_t(0);
      for (int64_t si = 0; si < segments; ++si) {
        const Segment sg = p.offsets ? segment(p, si) : segment(p, r / p.dim);
        const int64_t b = sg.b, L = sg.len;
        const auto* x = p.x.data + b * p.x.stride[0] + d * p.x.stride[1] + sg.start * p.x.stride[2];
        const auto* init = init_base ? init_base + sg.state * p.initial_states.stride[0] + d * p.initial_states.stride[1]
                                     : nullptr;
        const int32_t* seq = p.seq_idx.data ? p.seq_idx.data + b * p.seq_idx.stride[0] : nullptr;
        auto* out = p.out + r * p.seqlen + sg.start;
        for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
          const int64_t n = std::min(kChunk, L - t0);
          input_t* o = out + t0;
          if (!seq && p.x.stride[2] == 1 && t0 >= W - 1) {
            // contiguous row, no history in this chunk: read the input in place
            const input_t* src = x + (t0 - (W - 1));
            conv_chunk_any_width(W, src, w, bias_d, p.silu, o, n);
            continue;
          }
          // buf[i] = input at position t0 - (W-1) + i
          const int64_t first = t0 >= W - 1 ? 0 : W - 1 - t0;  // slots before position 0
          if (p.x.stride[2] == 1) {
            const input_t* src = x + (t0 - (W - 1) + first);
#pragma omp simd
            for (int64_t i = first; i < n + W - 1; ++i) buf[i] = static_cast<acc_t>(src[i - first]);
          } else {
            for (int64_t i = first; i < n + W - 1; ++i)
              buf[i] = static_cast<acc_t>(x[(t0 - (W - 1) + i) * p.x.stride[2]]);
          }
          for (int64_t i = 0; i < first; ++i) {  // history: position i - (W-1) < 0
            buf[i] = init ? static_cast<acc_t>(init[i * p.initial_states.stride[2]]) : acc_t(0);
          }
          if (!seq) {
            conv_chunk_any_width(W, buf, w, bias_d, p.silu, o, n);
          } else {
            for (int64_t j = 0; j < n; ++j) {
              acc_t acc = bias_d;
              for (int64_t k = 0; k < W; ++k) {
                const int64_t pos = causal_conv1d::tap_position(t0 + j, static_cast<int>(k), static_cast<int>(W));
                if (same_sequence(seq, p.seq_idx.stride[1], t0 + j, pos)) acc += w[k] * buf[j + k];
              }
              o[j] = static_cast<input_t>(activation(acc, p.silu));
            }
          }
        }
        // final_states[j] = input at position L - (W-1) + j (the initial state before the
        // segment); with seq_idx, entries from another sequence than the last position's are zero.
        auto* fin = p.final_states + (sg.state * p.dim + d) * (W - 1);
        for (int64_t j = 0; j < W - 1; ++j) {
          const int64_t pos = L - (W - 1) + j;
          const bool keep = !seq || same_sequence(seq, p.seq_idx.stride[1], L - 1, pos);
          acc_t v = 0;
          if (keep) {
            v = pos >= 0 ? static_cast<acc_t>(x[pos * p.x.stride[2]])
                : init   ? static_cast<acc_t>(init[(W - 1 + pos) * p.initial_states.stride[2]])
                         : acc_t(0);
          }
          fin[j] = static_cast<input_t>(v);
        }
      }
    }
  }
}
SSMK_CPU_MULTIVERSION(fwd_rows, (typename input_t), (input_t),
                      (const CausalConv1dFwdParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

template <typename input_t>
void fwd_kernel(const CausalConv1dFwdParams<input_t>& p) {
  cpu::parallel_items(p.batch * p.dim, p.seqlen * p.width,
                      [&](int64_t begin, int64_t end) { fwd_rows_dispatch<input_t>(p, begin, end); });
}

// Backward per channel d, looping over the batch inside so that dweight/dbias are summed in a
// fixed order. With g[t] = dout[t] * act'(pre[t]) (zero-padded to the right by W-1):
//   dbuf[i] = sum_k w[k] * g[i - k]        (gradient of buffer slot i = position i - (W-1))
//   dw[k]  += sum_t g[t] * buf[t + k],  dbias += sum_t g[t]
template <typename input_t>
SSMK_CPU_INLINE void bwd_channels(const CausalConv1dBwdParams<input_t>& p, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t W = p.width, L_row = p.seqlen;
  const auto* weight = p.weight;
  const auto* bias = p.bias;
  const auto* dout_base = p.dout.data;
  const auto* dfinal = p.dfinal_states.data;
  {
    // g is stored with W-1 leading zeros so dbuf[i] = sum_k w[k] * gpad[i - k + W - 1].
    std::vector<acc_t> buf(W - 1 + L_row), pre(L_row), gpad(L_row + 2 * (W - 1)), dbuf(W - 1 + L_row);
    acc_t* g = gpad.data() + (W - 1);
    for (int64_t d = begin; d < end; ++d) {
      const acc_t* w = weight + d * W;
      acc_t dw[causal_conv1d::kMaxWidth] = {};
      acc_t db = 0;
      for (int64_t si = 0; si < num_segments(p); ++si) {
        const Segment sg = segment(p, si);
        const int64_t b = sg.b, L = sg.len;
        const int32_t* seq = p.seq_idx.data ? p.seq_idx.data + b * p.seq_idx.stride[0] : nullptr;
        load_row<input_t>(p, sg, d, buf.data());
        conv_row(p, sg, w, bias ? bias[d] : acc_t(0), buf.data(), pre.data());
        const input_t* dout = dout_base + b * p.dout.stride[0] + d * p.dout.stride[1] + sg.start * p.dout.stride[2];
        if (p.dout.stride[2] == 1) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) g[t] = static_cast<acc_t>(dout[t]);
        } else {
          for (int64_t t = 0; t < L; ++t) g[t] = static_cast<acc_t>(dout[t * p.dout.stride[2]]);
        }
        if (p.silu) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) g[t] = activation_backward(pre[t], g[t], true);
        }
        std::fill(gpad.begin(), gpad.begin() + (W - 1), acc_t(0));
        // only this segment's part of the buffers: a packed row has many segments
        std::fill(gpad.begin() + (W - 1) + L, gpad.begin() + 2 * (W - 1) + L, acc_t(0));

        if (!seq) {
          std::fill(dbuf.begin(), dbuf.begin() + (W - 1) + L, acc_t(0));
          for (int64_t k = 0; k < W; ++k) {
            const acc_t wk = w[k];
            const acc_t* src = gpad.data() + (W - 1) - k;
#pragma omp simd
            for (int64_t i = 0; i < W - 1 + L; ++i) dbuf[i] += wk * src[i];
            acc_t s = 0;
            const acc_t* xb = buf.data() + k;
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < L; ++t) s += g[t] * xb[t];
            dw[k] += s;
          }
        } else {
          for (int64_t i = 0; i < W - 1 + L; ++i) {
            const int64_t pos = i - (W - 1);
            acc_t acc = 0;
            for (int64_t k = 0; k < W; ++k) {
              const int64_t t = i - k;  // output fed by this slot through tap k
              if (t >= 0 && t < L && same_sequence(seq, p.seq_idx.stride[1], t, pos)) acc += w[k] * g[t];
            }
            dbuf[i] = acc;
          }
          for (int64_t k = 0; k < W; ++k) {
            acc_t s = 0;
            for (int64_t t = 0; t < L; ++t) {
              const int64_t pos = causal_conv1d::tap_position(t, static_cast<int>(k), static_cast<int>(W));
              if (same_sequence(seq, p.seq_idx.stride[1], t, pos)) s += g[t] * buf[t + k];
            }
            dw[k] += s;
          }
        }
        acc_t sb = 0;
#pragma omp simd reduction(+ : sb)
        for (int64_t t = 0; t < L; ++t) sb += g[t];
        db += sb;

        if (dfinal) {
          for (int64_t j = 0; j < W - 1; ++j) {
            const int64_t pos = L - (W - 1) + j;
            if (seq && !same_sequence(seq, p.seq_idx.stride[1], L - 1, pos)) continue;
            dbuf[L + j] += static_cast<acc_t>(dfinal[sg.state * p.dfinal_states.stride[0] +
                                                     d * p.dfinal_states.stride[1] + j * p.dfinal_states.stride[2]]);
          }
        }
        auto* dinit = p.dinitial_states + (sg.state * p.dim + d) * (W - 1);
        for (int64_t j = 0; j < W - 1; ++j) dinit[j] = static_cast<input_t>(dbuf[j]);
        auto* dx = p.dx + (b * p.dim + d) * L_row + sg.start;
        for (int64_t t = 0; t < L; ++t) dx[t] = static_cast<input_t>(dbuf[W - 1 + t]);
      }
      auto* dweight = p.dweight + d * W;
      for (int64_t k = 0; k < W; ++k) dweight[k] = dw[k];
      p.dbias[d] = db;
    }
  }
}
SSMK_CPU_MULTIVERSION(bwd_channels, (typename input_t), (input_t),
                      (const CausalConv1dBwdParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

template <typename input_t>
void bwd_kernel(const CausalConv1dBwdParams<input_t>& p) {
  cpu::parallel_items(p.dim, p.batch * p.seqlen * p.width,
                      [&](int64_t begin, int64_t end) { bwd_channels_dispatch<input_t>(p, begin, end); });
}

template <typename input_t, typename state_t>
void update_kernel(const CausalConv1dUpdateParams<input_t, state_t>& p) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t W = p.width, L = p.seqlen, S = p.state_len;
  const auto* weight = p.weight;
  const auto* bias = p.bias;
  cpu::parallel_items(p.batch * p.dim, W + L, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(W - 1 + L);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.dim, d = r % p.dim;
      auto* out = p.out + r * L;
      const int64_t sb = p.conv_state_indices.data ? p.conv_state_indices.data[b * p.conv_state_indices.stride[0]] : b;
      if (sb < 0 || sb >= p.state_batch) {
        for (int64_t t = 0; t < L; ++t) out[t] = input_t(0);
        continue;
      }
      auto* state = p.conv_state.data + sb * p.conv_state.stride[0] + d * p.conv_state.stride[1];
      const auto* x = p.x.data + b * p.x.stride[0] + d * p.x.stride[1];
      for (int64_t j = 0; j < W - 1; ++j) buf[j] = static_cast<acc_t>(state[(S - (W - 1) + j) * p.conv_state.stride[2]]);
      for (int64_t t = 0; t < L; ++t) buf[W - 1 + t] = static_cast<acc_t>(x[t * p.x.stride[2]]);
      const acc_t* w = weight + d * W;
      for (int64_t t = 0; t < L; ++t) {
        acc_t acc = bias ? bias[d] : acc_t(0);
        for (int64_t k = 0; k < W; ++k) acc += w[k] * buf[t + k];
        out[t] = static_cast<input_t>(activation(acc, p.silu));
      }
      // Shift the state left by L and append the new inputs (ascending j reads ahead of writes).
      for (int64_t j = 0; j < S; ++j) {
        const int64_t src = j + L;
        state[j * p.conv_state.stride[2]] = src < S ? state[src * p.conv_state.stride[2]]
                                              : static_cast<state_t>(x[(src - S) * p.x.stride[2]]);
      }
    }
  });
}

}  // namespace

template <typename T>
void causal_conv1d_fwd_cpu(const CausalConv1dFwdParams<T>& p) {
  fwd_kernel<T>(p);
}
template <typename T>
void causal_conv1d_bwd_cpu(const CausalConv1dBwdParams<T>& p) {
  bwd_kernel<T>(p);
}
template <typename T, typename S>
void causal_conv1d_update_cpu(const CausalConv1dUpdateParams<T, S>& p) {
  update_kernel<T, S>(p);
}

#define SSMK_INSTANTIATE_UPDATE(T, S) \
  template void causal_conv1d_update_cpu<T, S>(const CausalConv1dUpdateParams<T, S>&);
#define SSMK_INSTANTIATE(T)                                                    \
  template void causal_conv1d_fwd_cpu<T>(const CausalConv1dFwdParams<T>&);     \
  template void causal_conv1d_bwd_cpu<T>(const CausalConv1dBwdParams<T>&);     \
  SSMK_FLOAT_TYPES_WITH(SSMK_INSTANTIATE_UPDATE, T)
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE
#undef SSMK_INSTANTIATE_UPDATE

}  // namespace ssmk
