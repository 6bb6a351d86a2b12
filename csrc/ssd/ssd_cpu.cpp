// CPU stages of ssd_scan (ssd_host.h). The matrix products are BLAS GEMMs (SsdCpuStages::gemm, and the products
// with GL and dGL per task in cache-resident buffers); the loops here do the rest, one (batch,
// chunk, head) task at a time (at::parallel_for over tasks; the scans across chunks over (batch,
// head)), with contiguous inner loops that the compiler vectorises (AVX2+FMA variants chosen at
// run time). Every reduction runs in a fixed order, so results are bitwise reproducible for a
// given thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu.h"
#include "common/dispatch.h"
#include "common/parallel.h"
#include "ssd/ssd_host.h"

namespace ssmk {

std::atomic<bool>& ssd_emulate_cuda_rounding() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {

using ssd::ssd_exp;

// What the CUDA tensor cores read of a float32 operand: with the emulation on and 16-bit inputs,
// the operand rounded to T (kInput); otherwise the operand itself.
template <typename T>
at::Tensor cuda_operand(const at::Tensor& a, GemmOperands ops = GemmOperands::kInput) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (ops == GemmOperands::kInput && ssd_emulate_cuda_rounding().load(std::memory_order_relaxed)) {
      return a.to(c10::CppTypeToScalarType<T>::value).to(a.scalar_type());
    }
  }
  return a;
}

struct Task {
  int64_t b, c, h, index;  // index = (b * nc + c) * H + h
};

inline Task task_of(const SsdDims& p, int64_t i) {
  return {i / (p.nchunks * p.nheads), (i / p.nheads) % p.nchunks, i % p.nheads, i};
}

// The (b, l, h) entry of a [B, L, H, ...] view for task k's batch and head at token l.
template <typename T, int N>
inline const T* token_at(const View<const T, N>& v, const Task& k, int64_t l) {
  return v.data + k.b * v.stride[0] + l * v.stride[1] + k.h * v.stride[2];
}

// Index of task k's (b, l, h) in contiguous [B, L, H] order; times P, its row of a contiguous
// [B, L, H, P] output.
inline int64_t token_index(const SsdDims& p, const Task& k, int64_t l) { return (k.b * p.seqlen + l) * p.nheads + k.h; }

// The chunk's [Q] slice of seq_idx, or nullptr.
inline const int32_t* chunk_seg(const int32_t* seg, const SsdDims& p, int64_t b, int64_t c) {
  return seg ? seg + (b * p.nchunks + c) * p.chunk : nullptr;
}

template <typename input_t>
SSMK_CPU_INLINE void prep_tasks(const SsdPrepParams<input_t>& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) ssd::prep_task<input_t, acc_t<input_t>>(p, i);
}
SSMK_CPU_MULTIVERSION(prep_tasks, (typename input_t), (input_t),
                      (const SsdPrepParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

// gl[t, s] = cb[t, s] * e^{Acs_t - Acs_s} for s <= t in the same sequence, else 0; task i's
// Q x Q matrix goes to out + (i - begin) Q^2, its rows for the chunk's tokens only (the rest of
// GL is zero: C is zero on padding, and entries past the diagonal are).
template <typename acc_t>
SSMK_CPU_INLINE void build_gl_tasks(const SsdGlParams<acc_t>& p, int64_t begin, int64_t end, acc_t* out) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const int64_t g = k.h / Hg;
    const acc_t* cb = p.cb + ((k.b * p.nchunks + k.c) * p.ngroups + g) * Q * Q;
    acc_t* gl = out + (i - begin) * Q * Q;
    const acc_t* acs = p.acs + i * Q;
    const int32_t* sg = chunk_seg(p.seg, p, k.b, k.c);
    const int64_t nvalid = ssd::chunk_tokens(p, k.c);
    for (int64_t t = 0; t < nvalid; ++t) {
      const acc_t at = acs[t];
      const acc_t* cb_row = cb + t * Q;
      acc_t* row = gl + t * Q;
#pragma omp simd
      for (int64_t s = 0; s <= t; ++s) row[s] = cb_row[s] * ssd_exp(at - acs[s]);
      if (sg) {
        for (int64_t s = 0; s <= t; ++s) row[s] = sg[s] == sg[t] ? row[s] : acc_t(0);
      }
      for (int64_t s = t + 1; s < Q; ++s) row[s] = 0;
    }
  }
}
SSMK_CPU_MULTIVERSION(build_gl_tasks, (typename acc_t), (acc_t),
                      (const SsdGlParams<acc_t>& p, int64_t begin, int64_t end, acc_t* out), (p, begin, end, out))

// The scan across chunks, per (batch, head): states[c] <- H_{c-1}; H_c = kdecay_c H_{c-1} + S_c.
// With SsdScanBwdParams, then the reverse scan of the state gradients and d loss / d Acs_last.
template <typename acc_t, typename Params>
SSMK_CPU_INLINE void scan_rows(const Params& p, int64_t begin, int64_t end) {
  constexpr bool kBackward = std::is_same_v<Params, SsdScanBwdParams<acc_t>>;
  const int64_t PN = p.headdim * p.dstate, nc = p.nchunks, H = p.nheads, S = p.num_seqs;
  std::vector<acc_t> run(PN);
  const acc_t* init = p.init;
  const acc_t* kdecay = p.kdecay;
  const int32_t* cs = p.chunk_seq;
  // (sequence, head) slot of a per-sequence state, for packed sequences.
  auto seq_slot = [&](int64_t s, int64_t h) { return (s * H + h) * PN; };
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    if (init && !cs) {
      std::copy(init + bh * PN, init + (bh + 1) * PN, run.begin());
    } else {
      std::fill(run.begin(), run.end(), acc_t(0));
    }
    for (int64_t c = 0; c < nc; ++c) {
      if (cs && ssd::starts_sequence(cs, c)) {
        if (init && cs[c] < S) {
          std::copy(init + seq_slot(cs[c], h), init + seq_slot(cs[c], h) + PN, run.begin());
        } else {
          std::fill(run.begin(), run.end(), acc_t(0));
        }
      }
      acc_t* st = p.states + ((b * nc + c) * H + h) * PN;
      const acc_t kd = kdecay[(b * nc + c) * H + h];
#pragma omp simd
      for (int64_t j = 0; j < PN; ++j) {
        const acc_t s = st[j];
        st[j] = run[j];
        run[j] = kd * run[j] + s;
      }
      if (cs && cs[c] < S && ssd::ends_sequence(cs, c, nc)) {
        std::copy(run.begin(), run.end(), p.final_states + seq_slot(cs[c], h));
      }
    }
    if (!cs) std::copy(run.begin(), run.end(), p.final_states + bh * PN);
    if constexpr (kBackward) {
      const acc_t* dfinal = p.dfinal;
      if (dfinal && !cs) {
        std::copy(dfinal + bh * PN, dfinal + (bh + 1) * PN, run.begin());
      } else {
        std::fill(run.begin(), run.end(), acc_t(0));
      }
      for (int64_t c = nc - 1; c >= 0; --c) {
        if (cs && ssd::ends_sequence(cs, c, nc)) {
          if (dfinal && cs[c] < S) {
            std::copy(dfinal + seq_slot(cs[c], h), dfinal + seq_slot(cs[c], h) + PN, run.begin());
          } else {
            std::fill(run.begin(), run.end(), acc_t(0));
          }
        }
        const int64_t idx = (b * nc + c) * H + h;
        acc_t* ds = p.dstates + idx * PN;
        const acc_t* hp = p.states + idx * PN;
        const acc_t kd = kdecay[idx];
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < PN; ++j) {
          const acc_t in = ds[j];
          ds[j] = run[j];
          dot += run[j] * hp[j];
          run[j] = in + kd * run[j];
        }
        p.ddecay[idx] = kd * dot;
        if (cs && cs[c] < S && ssd::starts_sequence(cs, c)) {
          std::copy(run.begin(), run.end(), p.dinit + seq_slot(cs[c], h));
        }
      }
      if (!cs) std::copy(run.begin(), run.end(), p.dinit + bh * PN);
    }
  }
}
SSMK_CPU_MULTIVERSION(scan_rows, (typename acc_t, typename Params), (acc_t, Params),
                      (const Params& p, int64_t begin, int64_t end), (p, begin, end))

// out = (y_intra + r_t y_inter + D x) * silu(z), for the tokens of each chunk.
template <typename input_t>
SSMK_CPU_INLINE void epilogue_tasks(const SsdFwdParams<input_t>& p, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t Q = p.chunk, P = p.headdim;
  const input_t* z = p.z.data;
  const acc_t* D = p.D;
  std::vector<acc_t> y(P);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const acc_t* yi = p.y_intra + i * Q * P;
    const acc_t* yT = p.y_interT + i * P * Q;
    const acc_t* r = p.r + i * Q;
    const int64_t first = ssd::chunk_first_token(p, k.c), nvalid = ssd::chunk_tokens(p, k.c);
    for (int64_t t = 0; t < nvalid; ++t) {
      const int64_t l = first + t;
      const acc_t rt = r[t];
      for (int64_t q = 0; q < P; ++q) y[q] = yi[t * P + q] + rt * yT[q * Q + t];
      const input_t* xr = token_at(p.x, k, l);
      if (D) {
        for (int64_t q = 0; q < P; ++q) y[q] += D[k.h * P + q] * static_cast<acc_t>(xr[q * p.x.stride[3]]);
      }
      if (z) {
        const input_t* zr = token_at(p.z, k, l);
        for (int64_t q = 0; q < P; ++q) y[q] *= ssmk::silu(static_cast<acc_t>(zr[q * p.z.stride[3]]));
      }
      input_t* o = p.out + token_index(p, k, l) * P;
      for (int64_t q = 0; q < P; ++q) o[q] = static_cast<input_t>(y[q]);
    }
  }
}
SSMK_CPU_MULTIVERSION(epilogue_tasks, (typename input_t), (input_t),
                      (const SsdFwdParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

// Backward of the masked decay: with W = dGL * GL (dGL = dY (dt x)^T), d Acs_t gets the row sum
// minus the column sum of W (GL_ts depends on Acs_t - Acs_s), and dGL becomes dGL * decay, the
// gradient of C_t . B_s.
// Task i's dGL is at dgl_base + (i - begin) Q^2, read in its rows and columns for the chunk's
// tokens only (dGL is zero past them: dY is zero on padding, dt x too) and written in full.
template <typename acc_t>
SSMK_CPU_INLINE void wsum_tasks(const SsdWsumParams<acc_t>& p, int64_t begin, int64_t end, acc_t* dgl_base) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  std::vector<acc_t> col(Q);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    acc_t* dgl = dgl_base + (i - begin) * Q * Q;
    // GL = CB * decay is rebuilt here rather than read: W = dGL * CB * decay.
    const acc_t* cb = p.cb + ((k.b * p.nchunks + k.c) * p.ngroups + k.h / Hg) * Q * Q;
    const acc_t* acs = p.acs + i * Q;
    acc_t* dacs = p.dacs + i * Q;
    const int32_t* sg = chunk_seg(p.seg, p, k.b, k.c);
    const int64_t nvalid = ssd::chunk_tokens(p, k.c);
    std::fill(col.begin(), col.end(), acc_t(0));
    std::fill(dgl + nvalid * Q, dgl + Q * Q, acc_t(0));
    std::fill(dacs + nvalid, dacs + Q, acc_t(0));
    for (int64_t t = 0; t < nvalid; ++t) {
      const acc_t at = acs[t];
      acc_t* drow = dgl + t * Q;
      const acc_t* cbrow = cb + t * Q;
      acc_t rs = 0;
      if (sg) {
        const int32_t st = sg[t];
#pragma omp simd reduction(+ : rs)
        for (int64_t s = 0; s <= t; ++s) {
          const acc_t dd = sg[s] == st ? drow[s] * ssd_exp(at - acs[s]) : acc_t(0);
          const acc_t w = dd * cbrow[s];
          rs += w;
          col[s] += w;
          drow[s] = dd;
        }
      } else {
#pragma omp simd reduction(+ : rs)
        for (int64_t s = 0; s <= t; ++s) {
          const acc_t dd = drow[s] * ssd_exp(at - acs[s]);
          const acc_t w = dd * cbrow[s];
          rs += w;
          col[s] += w;
          drow[s] = dd;
        }
      }
      for (int64_t s = t + 1; s < Q; ++s) drow[s] = 0;
      dacs[t] = rs;
    }
    for (int64_t t = 0; t < nvalid; ++t) dacs[t] -= col[t];
  }
}
SSMK_CPU_MULTIVERSION(wsum_tasks, (typename acc_t), (acc_t),
                      (const SsdWsumParams<acc_t>& p, int64_t begin, int64_t end, acc_t* dgl_base),
                      (p, begin, end, dgl_base))

// Assembles d loss / d Acs (intra + inter + state terms), its reverse cumulative sum d a_t, and
// from it the gradients of dt, A, x, D and z (see docs/ssd.md for the derivation).
template <typename input_t>
SSMK_CPU_INLINE void final_tasks(const SsdBwdParams<input_t>& p, int64_t begin, int64_t end) {
  using acc_t = ssmk::acc_t<input_t>;
  const int64_t Q = p.chunk, P = p.headdim;
  const input_t* z = p.z.data;
  const acc_t* D = p.D;
  const acc_t* A = p.A;
  const acc_t* bias = p.dt_bias;
  const acc_t lo = static_cast<acc_t>(p.dt_limit[0]), hi = static_cast<acc_t>(p.dt_limit[1]);
  std::vector<acc_t> da(Q), dD(P), zrow(P);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const auto [xdt, dxdt, dy, zT, dyrT, yT, e, r, dtv, dacs] = p.task_slices(i);
    // d Acs_t: intra (dacs), inter (dy_t . y_inter_t), state (-de_t e_t, and +sum at the end).
    acc_t sum_de = 0;
    for (int64_t t = 0; t < Q; ++t) {
      acc_t de = 0, inter = 0;
      for (int64_t q = 0; q < P; ++q) {
        de += xdt[t * P + q] * zT[q * Q + t];
        inter += dyrT[q * Q + t] * yT[q * Q + t];
      }
      da[t] = dacs[t] + inter - de * e[t];
      sum_de += de * e[t];
    }
    acc_t ddecay = 0;
    for (int64_t s = 0; s < p.nsplit; ++s) ddecay += p.ddecay[i * p.nsplit + s];
    da[Q - 1] += sum_de + ddecay;
    ssd::reverse_segment_cumsum(da.data(), chunk_seg(p.seg, p, k.b, k.c), Q);

    const acc_t a = A[k.h], bias_h = bias ? bias[k.h] : acc_t(0);
    const acc_t* yi = p.y_intra + (z ? i * Q * P : 0);
    std::fill(dD.begin(), dD.end(), acc_t(0));
    acc_t dA = 0;
    const int64_t first = ssd::chunk_first_token(p, k.c), nvalid = ssd::chunk_tokens(p, k.c);
    for (int64_t t = 0; t < nvalid; ++t) {
      const int64_t l = first + t;
      const input_t* xr = token_at(p.x, k, l);
      input_t* dxr = p.dx + token_index(p, k, l) * P;
      const acc_t et = e[t], dtt = dtv[t];
      acc_t xdx = 0;
      for (int64_t q = 0; q < P; ++q) {
        const acc_t dxd = dxdt[t * P + q] + et * zT[q * Q + t];
        const acc_t xv = static_cast<acc_t>(xr[q * p.x.stride[3]]);
        xdx += xv * dxd;
        acc_t dxv = dtt * dxd;
        if (D) {
          dxv += D[k.h * P + q] * dy[t * P + q];
          dD[q] += xv * dy[t * P + q];
        }
        dxr[q] = static_cast<input_t>(dxv);
        zrow[q] = xv;
      }
      if (z) {
        const input_t* zr = token_at(p.z, k, l);
        const input_t* gr = token_at(p.dout, k, l);
        input_t* dzr = p.dz + token_index(p, k, l) * P;
        for (int64_t q = 0; q < P; ++q) {
          acc_t y = yi[t * P + q] + r[t] * yT[q * Q + t];
          if (D) y += D[k.h * P + q] * zrow[q];
          const acc_t zv = static_cast<acc_t>(zr[q * p.z.stride[3]]);
          dzr[q] = static_cast<input_t>(static_cast<acc_t>(gr[q * p.dout.stride[3]]) * y * ssmk::silu_grad(zv));
        }
      }
      dA += dtt * da[t];
      const acc_t raw = static_cast<acc_t>(*token_at(p.dt, k, l));
      p.ddt[token_index(p, k, l)] =
          (xdx + a * da[t]) * ssd::dt_process_grad(raw, bias_h, p.softplus, p.clamp, lo, hi);
    }
    p.dA_part[i] = dA;
    if (D) std::copy(dD.begin(), dD.end(), p.dD_part + i * P);
  }
}
SSMK_CPU_MULTIVERSION(final_tasks, (typename input_t), (input_t),
                      (const SsdBwdParams<input_t>& p, int64_t begin, int64_t end), (p, begin, end))

// out = a @ b for one [M, K] x [K, N] matrix pair with the GPU GEMM's row blocking for the zero
// structures: per block of kGemmTileM rows, the same K range (kLowerA, kUpperA) and the same
// columns (kLowerOut: columns past the block's last row are set to zero), so the CPU tests check
// that what the GPU skips is indeed zero or unused. Operands must not require grad.
void mm_tri(at::Tensor out, const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri) {
  using cuda::Triangle;
  constexpr int64_t kRows = cuda::kGemmTileM;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (tri == Triangle::kNone) {
    at::mm_out(out, a, b);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    int64_t k_begin = 0, k_end = K, n_end = N;
    if (tri == Triangle::kLowerA) k_end = std::min(K, m0 + kRows);
    if (tri == Triangle::kUpperA) k_begin = std::min(K, m0);
    if (tri == Triangle::kLowerOut) n_end = std::min(N, m0 + kRows);
    at::Tensor block = out.narrow(0, m0, rows);
    at::Tensor used = block.narrow(1, 0, n_end);
    if (k_begin < k_end) {
      at::mm_out(used, a.narrow(0, m0, rows).narrow(1, k_begin, k_end - k_begin),
                 b.narrow(0, k_begin, k_end - k_begin).narrow(1, 0, n_end));
    } else {
      used.zero_();
    }
    if (n_end < N) block.narrow(1, n_end, N - n_end).zero_();
  }
}

// Batched GEMM in the accumulation dtype: the batch is split over threads with one
// single-threaded BLAS call (or row-block set) per matrix; these are many small Q x Q x P
// products, where a threaded BLAS per matrix mostly waits at barriers. `accumulate` adds to out.
void cpu_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri, bool accumulate) {
  // Detached: the op's inputs may require grad (autograd is handled outside), and out= calls
  // refuse such arguments.
  const at::Tensor ad = a.detach(), bd = b.detach();
  cpu::parallel_items(a.size(0), a.size(1) * a.size(2) * b.size(2), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::Tensor o = out.select(0, i);
      if (accumulate) {
        at::addmm_out(o, o, ad.select(0, i), bd.select(0, i));
      } else {
        mm_tri(o, ad.select(0, i), bd.select(0, i), tri);
      }
    }
  });
}

}  // namespace

namespace {

// Chunk c of each row holds tokens chunk_first_token .. + chunk_tokens - 1 (d's chunk map for
// packed sequences, else c Q .. min(c Q + Q, L) - 1): one pass per direction, converting on the
// way, so neither a converted copy of the row nor a padded one exists.
template <typename Src, typename Acc>
void gather_chunk_rows(const at::Tensor& t, const SsdDims& d, const Acc* scale, Acc* out) {
  const int64_t K1 = t.size(2), K2 = t.size(3), Q = d.chunk, nc = d.nchunks;
  const Src* in = t.const_data_ptr<Src>();
  const int64_t s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2), s3 = t.stride(3);
  cpu::parallel_items(t.size(0) * nc * K1, Q * K2, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (nc * K1), c = (i / K1) % nc, k1 = i % K1;
      const int64_t first = ssd::chunk_first_token(d, c), n = ssd::chunk_tokens(d, c);
      Acc* dst = out + i * Q * K2;
      for (int64_t q = 0; q < n; ++q) {
        const Src* row = in + b * s0 + (first + q) * s1 + k1 * s2;
        Acc* drow = dst + q * K2;
        const Acc f = scale ? scale[i * Q + q] : Acc(1);
        if (s3 == 1) {
          for (int64_t k = 0; k < K2; ++k) drow[k] = static_cast<Acc>(row[k]) * f;
        } else {
          for (int64_t k = 0; k < K2; ++k) drow[k] = static_cast<Acc>(row[k * s3]) * f;
        }
      }
      std::fill(dst + n * K2, dst + Q * K2, Acc(0));
    }
  });
}

template <typename Acc, typename Dst>
void scatter_chunk_rows(const Acc* in, const SsdDims& d, int64_t K1, int64_t K2, Dst* out) {
  const int64_t Q = d.chunk, nc = d.nchunks, L = d.seqlen;
  cpu::parallel_items(d.batch * nc * K1, Q * K2, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (nc * K1), c = (i / K1) % nc, k1 = i % K1;
      const int64_t first = ssd::chunk_first_token(d, c), n = ssd::chunk_tokens(d, c);
      for (int64_t q = 0; q < n; ++q) {
        const Acc* row = in + (i * Q + q) * K2;
        Dst* drow = out + ((b * L + first + q) * K1 + k1) * K2;
        for (int64_t k = 0; k < K2; ++k) drow[k] = static_cast<Dst>(row[k]);
      }
    }
  });
}

}  // namespace

template <typename Acc>
at::Tensor ssd_cpu_gather_chunks(const at::Tensor& t, const SsdDims& d, const at::Tensor& scale) {
  at::Tensor out = at::empty({t.size(0), d.nchunks, t.size(2), d.chunk, t.size(3)},
                             t.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const Acc* sc = scale.defined() ? scale.const_data_ptr<Acc>() : nullptr;
  SSMK_DISPATCH_FLOAT(t.scalar_type(), "ssd_cpu_gather_chunks",
                      [&] { gather_chunk_rows<scalar_t, Acc>(t, d, sc, out.mutable_data_ptr<Acc>()); });
  return out;
}

template <typename Acc>
at::Tensor ssd_cpu_scatter_chunks(const at::Tensor& t, const SsdDims& d, at::ScalarType dtype) {
  const int64_t K1 = t.size(2), K2 = t.size(4);
  const at::Tensor src = t.contiguous();
  at::Tensor out = at::empty({d.batch, d.seqlen, K1, K2}, src.options().dtype(dtype));
  SSMK_DISPATCH_FLOAT(dtype, "ssd_cpu_scatter_chunks", [&] {
    scatter_chunk_rows<Acc, scalar_t>(src.const_data_ptr<Acc>(), d, K1, K2, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

template at::Tensor ssd_cpu_gather_chunks<float>(const at::Tensor&, const SsdDims&, const at::Tensor&);
template at::Tensor ssd_cpu_gather_chunks<double>(const at::Tensor&, const SsdDims&, const at::Tensor&);
template at::Tensor ssd_cpu_scatter_chunks<float>(const at::Tensor&, const SsdDims&, at::ScalarType);
template at::Tensor ssd_cpu_scatter_chunks<double>(const at::Tensor&, const SsdDims&, at::ScalarType);

// The CPU multiplies in the accumulation dtype (mm_tri: the GPU's row blocking).
template <typename T>
at::Tensor SsdCpuStages<T>::gemm(const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri, GemmOperands ops) const {
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  cpu_gemm(out, cuda_operand<T>(a, ops), cuda_operand<T>(b, ops), tri, false);
  return out;
}

template <typename T>
void SsdCpuStages<T>::gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, GemmOperands ops) const {
  cpu_gemm(out, cuda_operand<T>(a, ops), cuda_operand<T>(b, ops), cuda::Triangle::kNone, true);
}

template <typename T>
void SsdCpuStages<T>::prep(const SsdPrepParams<T>& p) const {
  cpu::parallel_items(p.tasks(), p.chunk * p.headdim, [&](int64_t b, int64_t e) { prep_tasks_dispatch<T>(p, b, e); });
}

// Per task, GL is built into a per-thread Q x Q buffer that stays in cache instead of a
// [B, nc, H, Q, Q] tensor written and read back through memory; the same 64-row blocks as
// gemm(..., kLowerA / kUpperA) (GL is lower triangular: GL^T upper). A partly filled chunk (n
// tokens) multiplies GL's n x n corner with the rhs's n rows: GL and the rhs (dt x, dY) are
// zero past them, and so are the output's last Q - n rows.
template <typename T>
at::Tensor SsdCpuStages<T>::intra(const SsdGlParams<acc>& p, const at::Tensor& rhs, bool transposed) const {
  const int64_t Q = p.chunk, P = p.headdim;
  at::Tensor out = at::empty({p.tasks(), Q, P}, rhs.options());
  const at::Tensor r3 = cuda_operand<T>(rhs.detach().view({p.tasks(), Q, P}));
  cpu::parallel_items(p.tasks(), Q * Q * P, [&](int64_t begin, int64_t end) {
    at::Tensor gl = at::empty({Q, Q}, rhs.options());
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = ssd::chunk_tokens(p, task_of(p, i).c);
      build_gl_tasks_dispatch<acc>(p, i, i + 1, gl.data_ptr<acc>());
      const at::Tensor glr = cuda_operand<T>(gl.narrow(0, 0, n).narrow(1, 0, n));
      at::Tensor o = out.select(0, i);
      mm_tri(o.narrow(0, 0, n), transposed ? glr.t() : glr, r3.select(0, i).narrow(0, 0, n),
             transposed ? cuda::Triangle::kUpperA : cuda::Triangle::kLowerA);
      if (n < Q) o.narrow(0, n, Q - n).zero_();
    }
  });
  return out;
}

template <typename T>
void SsdCpuStages<T>::scan(const SsdScanParams<acc>& p) const {
  cpu::parallel_items(p.batch * p.nheads, p.nchunks * p.headdim * p.dstate,
                      [&](int64_t b, int64_t e) { scan_rows_dispatch<acc>(p, b, e); });
}

template <typename T>
void SsdCpuStages<T>::scan(const SsdScanBwdParams<acc>& p) const {
  cpu::parallel_items(p.batch * p.nheads, p.nchunks * p.headdim * p.dstate,
                      [&](int64_t b, int64_t e) { scan_rows_dispatch<acc>(p, b, e); });
}

template <typename T>
void SsdCpuStages<T>::epilogue(const SsdFwdParams<T>& p) const {
  cpu::parallel_items(p.tasks(), p.chunk * p.headdim,
                      [&](int64_t b, int64_t e) { epilogue_tasks_dispatch<T>(p, b, e); });
}

// Each head's dGL = dY (dt x)^T (the kLowerOut row blocks) goes to a per-thread Q x Q buffer,
// wsum turns it into dGL * decay (and dacs), and it is added into the group's dCB in head order:
// no [B, nc, H, Q, Q] tensor. A partly filled chunk (n tokens) multiplies the n rows of dY and
// dt x only (wsum zeroes the rest of dGL).
template <typename T>
at::Tensor SsdCpuStages<T>::intra_dcb(const SsdWsumParams<acc>& p, const at::Tensor& dy, const at::Tensor& xdt) const {
  const int64_t Q = p.chunk, P = p.headdim, G = p.ngroups, Hg = p.nheads / G;
  const int64_t groups = p.batch * p.nchunks * G;
  at::Tensor dcb = at::empty({groups, Q, Q}, dy.options());
  const at::Tensor dy3 = cuda_operand<T>(dy.detach().view({p.tasks(), Q, P}), ssd::kBwdOperands);
  const at::Tensor x3 = cuda_operand<T>(xdt.detach().view({p.tasks(), Q, P}), ssd::kBwdOperands);
  cpu::parallel_items(groups, Hg * Q * Q * P, [&](int64_t begin, int64_t end) {
    at::Tensor dgl = at::empty({Q, Q}, dy.options());
    for (int64_t bg = begin; bg < end; ++bg) {
      at::Tensor out = dcb.select(0, bg);
      for (int64_t j = 0; j < Hg; ++j) {
        const int64_t i = (bg / G) * p.nheads + (bg % G) * Hg + j;  // task (b, c, h)
        const int64_t n = ssd::chunk_tokens(p, task_of(p, i).c);
        mm_tri(dgl.narrow(0, 0, n).narrow(1, 0, n), dy3.select(0, i).narrow(0, 0, n),
               x3.select(0, i).narrow(0, 0, n).t(), cuda::Triangle::kLowerOut);
        wsum_tasks_dispatch<acc>(p, i, i + 1, dgl.data_ptr<acc>());
        if (j == 0) {
          out.copy_(dgl);
        } else {
          out.add_(dgl);
        }
      }
    }
  });
  return dcb;
}

template <typename T>
void SsdCpuStages<T>::final(const SsdBwdParams<T>& p) const {
  cpu::parallel_items(p.tasks(), p.chunk * p.headdim,
                      [&](int64_t b, int64_t e) { final_tasks_dispatch<T>(p, b, e); });
}

template struct SsdCpuStages<float>;
template struct SsdCpuStages<double>;
template struct SsdCpuStages<c10::Half>;
template struct SsdCpuStages<c10::BFloat16>;

}  // namespace ssmk
