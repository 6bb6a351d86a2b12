// Per-element math of the chunked SSD scan (Mamba-2), shared by the CPU and CUDA stage kernels.
//
// Per (batch b, head h), with a_t = dt_t * A[h] and, inside chunk c (positions t0 .. t0+Q-1),
// the cumulative sum Acs_t = a_t0 + ... + a_t, the recurrence H_t = e^{a_t} H_{t-1} + dt_t x_t B_t^T
// splits into (Dao & Gu 2024, "Transformers are SSMs", Sec. 6, the SSD algorithm):
//   intra-chunk   y_t  = sum_{s<=t} (C_t . B_s) e^{Acs_t - Acs_s} dt_s x_s          (masked GL)
//   chunk state   S_c  = sum_s e^{Acs_last - Acs_s} dt_s x_s B_s^T                   (e_s weights)
//   state passing H_c  = e^{Acs_last} H_{c-1} + S_c                                 (kdecay_c)
//   inter-chunk   y_t += e^{Acs_t} H_{c-1} C_t                                      (r_t weights)
// With seq_idx, every factor that carries information from position s to position t is zero
// unless both lie in the same sequence; the state before position 0 (initial_states) belongs to
// the sequence of position 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "common/math.h"

namespace ssmk::ssd {

constexpr int kMinChunk = 16;
constexpr int kMaxChunk = 256;
constexpr int kMaxDstate = 256;
constexpr int kMaxHeaddim = 256;

// dt_limit is applied only when it differs from (0, inf), as in mamba_ssm.
SSMK_HOST_DEVICE bool dt_limit_active(double lo, double hi) {
  return !(lo == 0.0 && hi == std::numeric_limits<double>::infinity());
}

// dt after bias, softplus and clamp.
template <typename T>
SSMK_HOST_DEVICE T dt_process(T raw, T bias, bool use_softplus, bool clamp, T lo, T hi) {
  T v = raw + bias;
  if (use_softplus) v = ssmk::softplus(v);
  if (clamp) v = v < lo ? lo : (v > hi ? hi : v);
  return v;
}

// d dt_process / d raw. The clamp passes the gradient where lo <= v <= hi (torch.clamp's rule).
template <typename T>
SSMK_HOST_DEVICE T dt_process_grad(T raw, T bias, bool use_softplus, bool clamp, T lo, T hi) {
  const T pre = raw + bias;
  T g = use_softplus ? ssmk::softplus_grad(pre) : T(1);
  if (clamp) {
    const T v = use_softplus ? ssmk::softplus(pre) : pre;
    if (v < lo || v > hi) g = T(0);
  }
  return g;
}

SSMK_HOST_DEVICE float ssd_exp(float v) { return ssmk::fast_exp(v); }
SSMK_HOST_DEVICE double ssd_exp(double v) { return ssmk::fast_exp(v); }

// Entry (t, s) of the decay matrix of one chunk: e^{Acs_t - Acs_s} for s <= t in the same
// sequence, else 0. Acs is non-increasing for A < 0, dt >= 0, so the exponent is <= 0.
template <typename T>
SSMK_HOST_DEVICE T segment_decay(const T* acs, const int32_t* seg, int t, int s) {
  if (s > t) return T(0);
  if (seg != nullptr && seg[t] != seg[s]) return T(0);
  return ssd_exp(acs[t] - acs[s]);
}

// The token of the row at position 0 of chunk c, and the chunk's number of tokens (the rest of
// the chunk is padding). Dims is SsdDims (ssd.h): its chunk map for packed sequences on the CPU,
// else chunk c holds tokens c Q .. min(c Q + Q, seqlen) - 1.
template <typename Dims>
SSMK_HOST_DEVICE int64_t chunk_first_token(const Dims& d, int64_t c) {
  return d.chunk_token ? d.chunk_token[c] : c * d.chunk;
}
template <typename Dims>
SSMK_HOST_DEVICE int64_t chunk_tokens(const Dims& d, int64_t c) {
  if (d.chunk_len) return d.chunk_len[c];
  const int64_t left = d.seqlen - c * d.chunk;
  return left < d.chunk ? left : d.chunk;
}

// One (batch, chunk, head) task of the first stage, shared verbatim by the CPU loop and the CUDA
// thread: dt processing (0 on the padding after the chunk's tokens), Acs (the within-chunk cumulative sum of
// dt * A), e_s = e^{Acs_last - Acs_s} (masked to the sequence of the chunk's last position),
// r_t = e^{Acs_t} (masked to the sequence of the previous chunk's last position, position 0 for
// the first chunk) and kdecay = e^{Acs_last} (0 when the chunk's last position belongs to another
// sequence than the previous chunk's last). Params is SsdPrepParams<input_t> (ssd.h).
template <typename input_t, typename acc_t, typename Params>
SSMK_HOST_DEVICE void prep_task(const Params& p, int64_t i) {
  const int64_t Q = p.chunk, H = p.nheads, nc = p.nchunks;
  const int64_t b = i / (nc * H), c = (i / H) % nc, h = i % H;
  const acc_t a = p.A[h];
  const acc_t bias = p.dt_bias ? p.dt_bias[h] : acc_t(0);
  const acc_t lo = static_cast<acc_t>(p.dt_limit[0]), hi = static_cast<acc_t>(p.dt_limit[1]);
  acc_t* dtv = p.dtv + i * Q;
  acc_t* acs = p.acs + i * Q;
  acc_t* e = p.e + i * Q;
  acc_t* r = p.r + i * Q;
  const input_t* dt_row = p.dt.data + b * p.dt.stride[0] + h * p.dt.stride[2];
  const int64_t first = chunk_first_token(p, c);
  const int64_t nvalid = chunk_tokens(p, c);
  const int32_t* sg = p.seg ? p.seg + (b * nc + c) * Q : nullptr;
  acc_t cum = 0;
  for (int64_t t = 0; t < Q; ++t) {
    // Restart at a change of sequence: every use of Acs is a difference within one sequence
    // (or Acs_t itself in the chunk's first sequence), so this changes nothing but rounding,
    // and it keeps one sequence's dt out of another's results and gradients bit for bit.
    if (sg && t > 0 && sg[t] != sg[t - 1]) cum = 0;
    const bool real = t < nvalid && (p.valid == nullptr || p.valid[c * Q + t] != 0);
    const acc_t v = real ? dt_process(static_cast<acc_t>(dt_row[(first + t) * p.dt.stride[1]]), bias,
                                            p.softplus, p.clamp, lo, hi)
                               : acc_t(0);
    dtv[t] = v;
    cum += v * a;
    acs[t] = cum;
  }
  const acc_t last = cum;
  const int32_t seg_last = sg ? sg[Q - 1] : 0;
  const int32_t seg_prev = sg ? (c == 0 ? sg[0] : sg[-1]) : 0;
  for (int64_t t = 0; t < Q; ++t) {
    const bool same_last = !sg || sg[t] == seg_last;
    const bool same_prev = !sg || sg[t] == seg_prev;
    e[t] = same_last ? ssd_exp(last - acs[t]) : acc_t(0);
    r[t] = same_prev ? ssd_exp(acs[t]) : acc_t(0);
  }
  p.kdecay[i] = seg_prev == seg_last ? ssd_exp(last) : acc_t(0);
}

// d a_t = sum of d Acs_t' over t' >= t in the same sequence (the adjoint of prep_task's restarted
// cumulative sum), in place over one chunk.
template <typename acc_t>
SSMK_HOST_DEVICE void reverse_segment_cumsum(acc_t* da, const int32_t* sg, int64_t Q) {
  for (int64_t t = Q - 2; t >= 0; --t) {
    if (!sg || sg[t] == sg[t + 1]) da[t] += da[t + 1];
  }
}

}  // namespace ssmk::ssd
