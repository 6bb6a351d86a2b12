// CPU stages of ssd_scan. The matrix products are BLAS GEMMs (CpuStages::gemm, and the products
// with GL and dGL per task in cache-resident buffers); the loops here do the rest, one (batch,
// chunk, head) task at a time (at::parallel_for over tasks; the scans across chunks over (batch,
// head)), with contiguous inner loops that the compiler vectorises (AVX2+FMA variants chosen at
// run time). Every reduction runs in a fixed order, so results are bitwise reproducible for a
// given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "ssd/ssd.h"

namespace ssmk {
namespace {

using ssd::ssd_exp;

struct Task {
  int64_t b, c, h, index;  // index = (b * nc + c) * H + h
};

inline Task task_of(const SsdParams& p, int64_t i) {
  return {i / (p.nchunks * p.nheads), (i / p.nheads) % p.nchunks, i % p.nheads, i};
}

inline const int32_t* chunk_seg(const SsdParams& p, int64_t b, int64_t c) {
  return p.seg ? p.seg + (b * p.nchunks + c) * p.chunk : nullptr;
}

template <typename input_t>
SSMK_CPU_INLINE void prep_tasks(const SsdParams& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) ssd::prep_task<input_t, acc_type<input_t>>(p, i);
}
SSMK_CPU_MULTIVERSION(prep_tasks, (typename input_t), (input_t),
                      (const SsdParams& p, int64_t begin, int64_t end), (p, begin, end))

// gl[t, s] = cb[t, s] * e^{Acs_t - Acs_s} for s <= t in the same sequence, else 0; task i's
// Q x Q matrix goes to out + (i - begin) Q^2.
template <typename acc_t>
SSMK_CPU_INLINE void build_gl_tasks(const SsdParams& p, int64_t begin, int64_t end, acc_t* out) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const int64_t g = k.h / Hg;
    const acc_t* cb = static_cast<const acc_t*>(p.cb) + ((k.b * p.nchunks + k.c) * p.ngroups + g) * Q * Q;
    acc_t* gl = out + (i - begin) * Q * Q;
    const acc_t* acs = static_cast<const acc_t*>(p.acs) + i * Q;
    const int32_t* sg = chunk_seg(p, k.b, k.c);
    for (int64_t t = 0; t < Q; ++t) {
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
                      (const SsdParams& p, int64_t begin, int64_t end, acc_t* out), (p, begin, end, out))

// The scan across chunks, per (batch, head): states[c] <- H_{c-1}; H_c = kdecay_c H_{c-1} + S_c.
// With `backward`, then the reverse scan of the state gradients and d loss / d Acs_last.
template <typename acc_t>
SSMK_CPU_INLINE void scan_rows(const SsdParams& p, bool backward, int64_t begin, int64_t end) {
  const int64_t PN = p.headdim * p.dstate, nc = p.nchunks, H = p.nheads;
  std::vector<acc_t> run(PN);
  const auto* init = static_cast<const acc_t*>(p.init);
  const auto* kdecay = static_cast<const acc_t*>(p.kdecay);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    if (init) {
      std::copy(init + bh * PN, init + (bh + 1) * PN, run.begin());
    } else {
      std::fill(run.begin(), run.end(), acc_t(0));
    }
    for (int64_t c = 0; c < nc; ++c) {
      acc_t* st = static_cast<acc_t*>(p.states) + ((b * nc + c) * H + h) * PN;
      const acc_t kd = kdecay[(b * nc + c) * H + h];
#pragma omp simd
      for (int64_t j = 0; j < PN; ++j) {
        const acc_t s = st[j];
        st[j] = run[j];
        run[j] = kd * run[j] + s;
      }
    }
    std::copy(run.begin(), run.end(), static_cast<acc_t*>(p.final_states) + bh * PN);
    if (!backward) continue;
    const auto* dfinal = static_cast<const acc_t*>(p.dfinal);
    if (dfinal) {
      std::copy(dfinal + bh * PN, dfinal + (bh + 1) * PN, run.begin());
    } else {
      std::fill(run.begin(), run.end(), acc_t(0));
    }
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t idx = (b * nc + c) * H + h;
      acc_t* ds = static_cast<acc_t*>(p.dstates) + idx * PN;
      const acc_t* hp = static_cast<const acc_t*>(p.states) + idx * PN;
      const acc_t kd = kdecay[idx];
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < PN; ++j) {
        const acc_t in = ds[j];
        ds[j] = run[j];
        dot += run[j] * hp[j];
        run[j] = in + kd * run[j];
      }
      static_cast<acc_t*>(p.ddecay)[idx] = kd * dot;
    }
    std::copy(run.begin(), run.end(), static_cast<acc_t*>(p.dinit) + bh * PN);
  }
}
SSMK_CPU_MULTIVERSION(scan_rows, (typename acc_t), (acc_t),
                      (const SsdParams& p, bool backward, int64_t begin, int64_t end),
                      (p, backward, begin, end))

// out = (y_intra + r_t y_inter + D x) * silu(z), for the valid positions of each chunk.
template <typename input_t>
SSMK_CPU_INLINE void epilogue_tasks(const SsdParams& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const int64_t Q = p.chunk, P = p.headdim, H = p.nheads, L = p.seqlen;
  const auto* x = static_cast<const input_t*>(p.x);
  const auto* z = static_cast<const input_t*>(p.z);
  const auto* D = static_cast<const acc_t*>(p.D);
  std::vector<acc_t> y(P);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const acc_t* yi = static_cast<const acc_t*>(p.y_intra) + i * Q * P;
    const acc_t* yT = static_cast<const acc_t*>(p.y_interT) + i * P * Q;
    const acc_t* r = static_cast<const acc_t*>(p.r) + i * Q;
    const int64_t nvalid = std::min(Q, L - k.c * Q);
    for (int64_t t = 0; t < nvalid; ++t) {
      const int64_t l = k.c * Q + t;
      const acc_t rt = r[t];
      for (int64_t q = 0; q < P; ++q) y[q] = yi[t * P + q] + rt * yT[q * Q + t];
      const input_t* xr = x + k.b * p.x_batch_stride + l * p.x_l_stride + k.h * p.x_h_stride;
      if (D) {
        for (int64_t q = 0; q < P; ++q) y[q] += D[k.h * P + q] * static_cast<acc_t>(xr[q * p.x_p_stride]);
      }
      if (z) {
        const input_t* zr = z + k.b * p.z_batch_stride + l * p.z_l_stride + k.h * p.z_h_stride;
        for (int64_t q = 0; q < P; ++q) y[q] *= ssmk::silu(static_cast<acc_t>(zr[q * p.z_p_stride]));
      }
      input_t* o = static_cast<input_t*>(p.out) + ((k.b * L + l) * H + k.h) * P;
      for (int64_t q = 0; q < P; ++q) o[q] = static_cast<input_t>(y[q]);
    }
  }
}
SSMK_CPU_MULTIVERSION(epilogue_tasks, (typename input_t), (input_t),
                      (const SsdParams& p, int64_t begin, int64_t end), (p, begin, end))

// Backward of the masked decay: with W = dGL * GL (dGL = dY (dt x)^T), d Acs_t gets the row sum
// minus the column sum of W (GL_ts depends on Acs_t - Acs_s), and dGL becomes dGL * decay, the
// gradient of C_t . B_s.
// Task i's dGL is at dgl_base + (i - begin) Q^2.
template <typename acc_t>
SSMK_CPU_INLINE void wsum_tasks(const SsdParams& p, int64_t begin, int64_t end, acc_t* dgl_base) {
  const int64_t Q = p.chunk, Hg = p.nheads / p.ngroups;
  std::vector<acc_t> col(Q);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    acc_t* dgl = dgl_base + (i - begin) * Q * Q;
    // GL = CB * decay is rebuilt here rather than read: W = dGL * CB * decay.
    const acc_t* cb = static_cast<const acc_t*>(p.cb) + ((k.b * p.nchunks + k.c) * p.ngroups + k.h / Hg) * Q * Q;
    const acc_t* acs = static_cast<const acc_t*>(p.acs) + i * Q;
    acc_t* dacs = static_cast<acc_t*>(p.dacs) + i * Q;
    const int32_t* sg = chunk_seg(p, k.b, k.c);
    std::fill(col.begin(), col.end(), acc_t(0));
    for (int64_t t = 0; t < Q; ++t) {
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
    for (int64_t t = 0; t < Q; ++t) dacs[t] -= col[t];
  }
}
SSMK_CPU_MULTIVERSION(wsum_tasks, (typename acc_t), (acc_t),
                      (const SsdParams& p, int64_t begin, int64_t end, acc_t* dgl_base), (p, begin, end, dgl_base))

// Assembles d loss / d Acs (intra + inter + state terms), its reverse cumulative sum d a_t, and
// from it the gradients of dt, A, x, D and z (see docs/ssd.md for the derivation).
template <typename input_t>
SSMK_CPU_INLINE void final_tasks(const SsdParams& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const int64_t Q = p.chunk, P = p.headdim, H = p.nheads, L = p.seqlen;
  const auto* x = static_cast<const input_t*>(p.x);
  const auto* z = static_cast<const input_t*>(p.z);
  const auto* dout = static_cast<const input_t*>(p.dout);
  const auto* dt = static_cast<const input_t*>(p.dt);
  const auto* D = static_cast<const acc_t*>(p.D);
  const auto* A = static_cast<const acc_t*>(p.A);
  const auto* bias = static_cast<const acc_t*>(p.dt_bias);
  const acc_t lo = static_cast<acc_t>(p.dt_lo), hi = static_cast<acc_t>(p.dt_hi);
  std::vector<acc_t> da(Q), dD(P), zrow(P);
  for (int64_t i = begin; i < end; ++i) {
    const Task k = task_of(p, i);
    const acc_t* xdt = static_cast<const acc_t*>(p.xdt) + i * Q * P;
    const acc_t* zT = static_cast<const acc_t*>(p.zT) + i * P * Q;
    const acc_t* dyrT = static_cast<const acc_t*>(p.dyrT) + i * P * Q;
    const acc_t* yT = static_cast<const acc_t*>(p.y_interT) + i * P * Q;
    const acc_t* e = static_cast<const acc_t*>(p.e) + i * Q;
    const acc_t* r = static_cast<const acc_t*>(p.r) + i * Q;
    const acc_t* dtv = static_cast<const acc_t*>(p.dtv) + i * Q;
    const acc_t* dacs = static_cast<const acc_t*>(p.dacs) + i * Q;
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
    for (int64_t s = 0; s < p.nsplit; ++s) ddecay += static_cast<const acc_t*>(p.ddecay)[i * p.nsplit + s];
    da[Q - 1] += sum_de + ddecay;
    ssd::reverse_segment_cumsum(da.data(), chunk_seg(p, k.b, k.c), Q);

    const acc_t a = A[k.h], bias_h = bias ? bias[k.h] : acc_t(0);
    const acc_t* dxdt = static_cast<const acc_t*>(p.dxdt) + i * Q * P;
    const acc_t* dy = static_cast<const acc_t*>(p.dy) + i * Q * P;
    const acc_t* yi = static_cast<const acc_t*>(p.y_intra) + (z ? i * Q * P : 0);
    std::fill(dD.begin(), dD.end(), acc_t(0));
    acc_t dA = 0;
    const int64_t nvalid = std::min(Q, L - k.c * Q);
    for (int64_t t = 0; t < nvalid; ++t) {
      const int64_t l = k.c * Q + t;
      const input_t* xr = x + k.b * p.x_batch_stride + l * p.x_l_stride + k.h * p.x_h_stride;
      input_t* dxr = static_cast<input_t*>(p.dx) + ((k.b * L + l) * H + k.h) * P;
      const acc_t et = e[t], dtt = dtv[t];
      acc_t xdx = 0;
      for (int64_t q = 0; q < P; ++q) {
        const acc_t dxd = dxdt[t * P + q] + et * zT[q * Q + t];
        const acc_t xv = static_cast<acc_t>(xr[q * p.x_p_stride]);
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
        const input_t* zr = z + k.b * p.z_batch_stride + l * p.z_l_stride + k.h * p.z_h_stride;
        const input_t* gr = dout + k.b * p.dout_batch_stride + l * p.dout_l_stride + k.h * p.dout_h_stride;
        input_t* dzr = static_cast<input_t*>(p.dz) + ((k.b * L + l) * H + k.h) * P;
        for (int64_t q = 0; q < P; ++q) {
          acc_t y = yi[t * P + q] + r[t] * yT[q * Q + t];
          if (D) y += D[k.h * P + q] * zrow[q];
          const acc_t zv = static_cast<acc_t>(zr[q * p.z_p_stride]);
          dzr[q] = static_cast<input_t>(static_cast<acc_t>(gr[q * p.dout_p_stride]) * y * ssmk::silu_grad(zv));
        }
      }
      dA += dtt * da[t];
      const acc_t raw = static_cast<acc_t>(dt[k.b * p.dt_batch_stride + l * p.dt_l_stride + k.h * p.dt_h_stride]);
      static_cast<acc_t*>(p.ddt)[(k.b * L + l) * H + k.h] =
          (xdx + a * da[t]) * ssd::dt_process_grad(raw, bias_h, p.softplus, p.clamp, lo, hi);
    }
    static_cast<acc_t*>(p.dA_part)[i] = dA;
    if (D) std::copy(dD.begin(), dD.end(), static_cast<acc_t*>(p.dD_part) + i * P);
  }
}
SSMK_CPU_MULTIVERSION(final_tasks, (typename input_t), (input_t),
                      (const SsdParams& p, int64_t begin, int64_t end), (p, begin, end))

#define SSMK_DISPATCH_SSD_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// out = a @ b for one [M, K] x [K, N] matrix pair with the GPU GEMM's row blocking for the zero
// structures: per block of kGemmRowBlock rows, the same K range (kLowerA, kUpperA) and the same
// columns (kLowerOut: columns past the block's last row are set to zero), so the CPU tests check
// that what the GPU skips is indeed zero or unused. Operands must not require grad.
void mm_tri(at::Tensor out, const at::Tensor& a, const at::Tensor& b, ssd::Tri tri) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (tri == ssd::Tri::kNone) {
    at::mm_out(out, a, b);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += ssd::kGemmRowBlock) {
    const int64_t rows = std::min(ssd::kGemmRowBlock, M - m0);
    int64_t k_begin = 0, k_end = K, n_end = N;
    if (tri == ssd::Tri::kLowerA) k_end = std::min(K, m0 + ssd::kGemmRowBlock);
    if (tri == ssd::Tri::kUpperA) k_begin = std::min(K, m0);
    if (tri == ssd::Tri::kLowerOut) n_end = std::min(N, m0 + ssd::kGemmRowBlock);
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
void cpu_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, ssd::Tri tri, bool accumulate) {
  // Detached: the op's inputs may require grad (autograd is handled outside), and out= calls
  // refuse such arguments.
  const at::Tensor ad = a.detach(), bd = b.detach();
  at::parallel_for(0, a.size(0), 1, [&](int64_t begin, int64_t end) {
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

struct CpuStages {
  int64_t tasks(const SsdParams& p) const { return p.batch * p.nchunks * p.nheads; }
  int64_t scan_splits(const SsdParams&) const { return 1; }

  // The CPU multiplies in the accumulation dtype (mm_tri: the GPU's row blocking).
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType,
                  ssd::Tri tri = ssd::Tri::kNone) const {
    at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
    cpu_gemm(out, a, b, tri, false);
    return out;
  }
  void gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::ScalarType) const {
    cpu_gemm(out, a, b, ssd::Tri::kNone, true);
  }

  void prep(const SsdParams& p, at::ScalarType dtype) const {
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_prep_cpu", [&] {
      at::parallel_for(0, tasks(p), 1, [&](int64_t b, int64_t e) { prep_tasks_dispatch<scalar_t>(p, b, e); });
    });
  }
  // The products with GL, per task with GL built into a per-thread Q x Q buffer that stays in
  // cache instead of a [B, nc, H, Q, Q] tensor written and read back through memory; the same
  // 64-row blocks as gemm(..., kLowerA / kUpperA).
  //   transpose = false: out = GL @ rhs      (y_intra = GL (dt x))
  //   transpose = true:  out = GL^T @ rhs    (d(dt x) = GL^T dY)
  at::Tensor intra_product(const SsdParams& p, const at::Tensor& rhs, at::ScalarType dtype, bool transpose) const {
    const int64_t Q = p.chunk, P = p.headdim;
    at::Tensor out = at::empty({tasks(p), Q, P}, rhs.options());
    const at::Tensor r3 = rhs.detach().view({tasks(p), Q, P});
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_intra_product_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      at::parallel_for(0, tasks(p), 1, [&](int64_t begin, int64_t end) {
        at::Tensor gl = at::empty({Q, Q}, rhs.options());
        for (int64_t i = begin; i < end; ++i) {
          build_gl_tasks_dispatch<acc_t>(p, i, i + 1, gl.data_ptr<acc_t>());
          // GL is lower triangular: GL^T upper.
          mm_tri(out.select(0, i), transpose ? gl.t() : gl, r3.select(0, i),
                 transpose ? ssd::Tri::kUpperA : ssd::Tri::kLowerA);
        }
      });
    });
    return out;
  }
  at::Tensor intra_fwd(const SsdParams& p, const at::Tensor& xdt, at::ScalarType dtype) const {
    return intra_product(p, xdt, dtype, false);
  }
  at::Tensor intra_bwd(const SsdParams& p, const at::Tensor& dy, at::ScalarType dtype) const {
    return intra_product(p, dy, dtype, true);
  }
  void scan(const SsdParams& p, at::ScalarType dtype, bool backward) const {
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_scan_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      at::parallel_for(0, p.batch * p.nheads, 1,
                       [&](int64_t b, int64_t e) { scan_rows_dispatch<acc_t>(p, backward, b, e); });
    });
  }
  void scan_fwd(const SsdParams& p, at::ScalarType dtype) const { scan(p, dtype, false); }
  void scan_bwd(const SsdParams& p, at::ScalarType dtype) const { scan(p, dtype, true); }
  void epilogue_fwd(const SsdParams& p, at::ScalarType dtype) const {
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_epilogue_cpu", [&] {
      at::parallel_for(0, tasks(p), 1, [&](int64_t b, int64_t e) { epilogue_tasks_dispatch<scalar_t>(p, b, e); });
    });
  }
  // dCB per (batch, chunk, group) and dacs per task: each head's dGL = dY (dt x)^T (the
  // kLowerOut row blocks) goes to a per-thread Q x Q buffer, wsum turns it into dGL * decay (and
  // dacs), and it is added into the group's dCB in head order: no [B, nc, H, Q, Q] tensor.
  at::Tensor intra_dcb(const SsdParams& p, const at::Tensor& dy, const at::Tensor& xdt, at::ScalarType dtype) const {
    const int64_t Q = p.chunk, P = p.headdim, G = p.ngroups, Hg = p.nheads / G;
    const int64_t groups = p.batch * p.nchunks * G;
    at::Tensor dcb = at::empty({groups, Q, Q}, dy.options());
    const at::Tensor dy3 = dy.detach().view({tasks(p), Q, P});
    const at::Tensor x3 = xdt.detach().view({tasks(p), Q, P});
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_intra_dcb_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        at::Tensor dgl = at::empty({Q, Q}, dy.options());
        for (int64_t bg = begin; bg < end; ++bg) {
          at::Tensor out = dcb.select(0, bg);
          for (int64_t j = 0; j < Hg; ++j) {
            const int64_t i = (bg / G) * p.nheads + (bg % G) * Hg + j;  // task (b, c, h)
            mm_tri(dgl, dy3.select(0, i), x3.select(0, i).t(), ssd::Tri::kLowerOut);
            wsum_tasks_dispatch<acc_t>(p, i, i + 1, dgl.data_ptr<acc_t>());
            if (j == 0) {
              out.copy_(dgl);
            } else {
              out.add_(dgl);
            }
          }
        }
      });
    });
    return dcb;
  }
  void final_bwd(const SsdParams& p, at::ScalarType dtype) const {
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_final_bwd_cpu", [&] {
      at::parallel_for(0, tasks(p), 1, [&](int64_t b, int64_t e) { final_tasks_dispatch<scalar_t>(p, b, e); });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd_cpu(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    double dt_min, double dt_max, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx) {
  return ssd::fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, CpuStages{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
ssd_scan_bwd_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                 bool dt_softplus, double dt_min, double dt_max,
                 const std::optional<at::Tensor>& initial_states,
                 const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,
                 const std::optional<at::Tensor>& dfinal_states) {
  return ssd::bwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, dout, dfinal_states, CpuStages{});
}

at::Tensor ssd_test_gemm_cpu(const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype, int64_t tri,
                           const std::optional<at::Tensor>& acc) {
  return ssd::test_gemm(a, b, in_dtype, tri, acc, CpuStages{});
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CPU, m) {
  m.impl("ssd_scan_fwd", &ssmk::ssd_scan_fwd_cpu);
  m.impl("ssd_scan_bwd", &ssmk::ssd_scan_bwd_cpu);
  }

TORCH_LIBRARY_FRAGMENT(ssm_kernels, m) {
  // ssd: final_states is always returned (the wrapper drops it if unwanted); dt_min/dt_max clamp
  // dt only when they differ from (0, inf). Gradients of absent optional inputs are empty tensors.
  m.def(
      "ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor? initial_states, Tensor? seq_idx) -> (Tensor out, Tensor final_states)");
  m.def(
      "ssd_scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor? initial_states, Tensor? seq_idx, Tensor dout, Tensor? dfinal_states) "
      "-> (Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddt_bias, Tensor dinitial_states)");
}

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  // ssd test hook: the device's batched GEMM of the SSD driver, out = a @ b (or acc + a @ b) for
  // [batch, M, K] x [batch, K, N] float32/float64 views of any strides; in_dtype picks the
  // tensor-core operand precision on CUDA; tri is an ssd::Tri zero structure (0..3).
  m.def("ssd_gemm(Tensor a, Tensor b, ScalarType in_dtype, int tri, Tensor? acc) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssm_kernels_test, CPU, m) { m.impl("ssd_gemm", &ssmk::ssd_test_gemm_cpu); }
