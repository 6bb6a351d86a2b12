// CPU kernels of the selective scan and its decode step.
//
// Same blocking as the CUDA kernels: the sequence is walked in chunks of kChunkSize steps, the
// state before each chunk is saved (checkpoints, [B, D, n_chunks, N]), and the backward recomputes
// the forward inside one chunk at a time (states of that chunk only) before running the reverse
// recurrence. Work is split over (batch, channel) rows with at::parallel_for; the inner loops run
// over the dstate axis on contiguous arrays so they vectorise (fast_exp, AVX2 via
// SSMK_CPU_MULTIVERSION). For that, B/C/A are re-laid out once per call: variable B/C as
// [B, G, L, N] in acc_t (the N values of one step contiguous), complex values as separate real and
// imaginary blocks of N.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu.h"
#include "common/static_switch.h"
#include "selective_scan/selective_scan.h"

namespace ssmk {
namespace {

using selective_scan::delta_transform;
using selective_scan::delta_transform_grad;
using selective_scan::kChunkSize;

// The CPU layout of A, B and C. NW = N (real) or 2N (complex: N real parts, then N imaginary
// parts). The values for channel d, batch b, step t start at base(b, d) + t * step (step = 0 for
// fixed B/C).
struct CpuOperand {
  at::Tensor data;
  bool variable = false;
  int64_t groups = 1, step = 0;

  template <typename acc_t>
  const acc_t* row(const SelectiveScanParams& p, int64_t b, int64_t d, int64_t nw) const {
    const auto* base = data.data_ptr<acc_t>();
    if (!variable) return base + d * nw;
    const int64_t g = d / (p.dim / groups);
    return base + (b * groups + g) * p.seqlen * nw;
  }
};

struct CpuLayout {
  at::Tensor A;  // [D, NW]
  CpuOperand B, C;
  int64_t nw;
};

// Real/imaginary split of a complex tensor along a new axis just before the last one:
// [..., N] complex -> [..., 2, N] real.
at::Tensor split_complex(const at::Tensor& t) {
  const at::Tensor r = at::view_as_real(t);  // [..., N, 2]
  return r.transpose(-1, -2).contiguous();
}

CpuOperand make_operand(const at::Tensor& t, bool is_complex, at::ScalarType acc, int64_t N) {
  CpuOperand op;
  op.variable = t.dim() == 4;
  const int64_t nw = is_complex ? 2 * N : N;
  if (!op.variable) {
    op.data = is_complex ? split_complex(t) : t.contiguous();  // [D, NW]
    return op;
  }
  op.groups = t.size(1);
  op.step = nw;
  const at::Tensor tl = t.transpose(2, 3);  // [B, G, L, N]
  op.data = is_complex ? split_complex(tl.to(t.scalar_type())) : tl.to(acc).contiguous();
  return op;
}

CpuLayout make_layout(const SelectiveScanParams& p, const selective_scan::Prepared& pr, at::ScalarType acc) {
  CpuLayout lay;
  lay.nw = p.is_complex ? 2 * p.dstate : p.dstate;
  lay.A = p.is_complex ? split_complex(pr.A) : pr.A;
  lay.B = make_operand(pr.B, p.is_complex, acc, p.dstate);
  lay.C = make_operand(pr.C, p.is_complex, acc, p.dstate);
  return lay;
}

template <typename input_t, typename acc_t>
SSMK_CPU_INLINE acc_t load(const void* ptr, int64_t offset) {
  return static_cast<acc_t>(static_cast<const input_t*>(ptr)[offset]);
}

// Reads the initial state (or zeros) of row (b, d) into h ([NW], split layout).
template <typename acc_t>
SSMK_CPU_INLINE void load_initial(const SelectiveScanParams& p, int64_t b, int64_t d, acc_t* h) {
  const int64_t N = p.dstate;
  const auto* init = static_cast<const acc_t*>(p.initial_state);
  const int64_t nw = p.is_complex ? 2 * N : N;
  if (!init) {
    std::fill(h, h + nw, acc_t(0));
    return;
  }
  // Complex strides are in complex elements; the tensor is read as interleaved (re, im) pairs.
  const int64_t off = b * p.init_batch_stride + d * p.init_dim_stride;
  for (int64_t n = 0; n < N; ++n) {
    if (p.is_complex) {
      h[n] = init[2 * (off + n * p.init_n_stride)];
      h[N + n] = init[2 * (off + n * p.init_n_stride) + 1];
    } else {
      h[n] = init[off + n * p.init_n_stride];
    }
  }
}

// Writes h ([NW], split layout) into a contiguous [N] (interleaved if complex) state row.
template <typename acc_t, bool kComplex>
SSMK_CPU_INLINE void store_state(const acc_t* h, int64_t N, acc_t* dst) {
  if constexpr (kComplex) {
    for (int64_t n = 0; n < N; ++n) {
      dst[2 * n] = h[n];
      dst[2 * n + 1] = h[N + n];
    }
  } else {
    std::memcpy(dst, h, N * sizeof(acc_t));
  }
}

template <typename acc_t, bool kComplex>
SSMK_CPU_INLINE void load_state(const acc_t* src, int64_t N, acc_t* h) {
  if constexpr (kComplex) {
    for (int64_t n = 0; n < N; ++n) {
      h[n] = src[2 * n];
      h[N + n] = src[2 * n + 1];
    }
  } else {
    std::memcpy(h, src, N * sizeof(acc_t));
  }
}

// One step of the recurrence for every n, returning y_t (without the factor 2 of complex A).
// With kStore, a_out/h_out receive a_t and h_t (split layout).
template <typename acc_t, bool kComplex, bool kStore>
SSMK_CPU_INLINE acc_t scan_step(int64_t N, acc_t dt, acc_t du, const acc_t* SSMK_RESTRICT A,
                                const acc_t* SSMK_RESTRICT Bt, const acc_t* SSMK_RESTRICT Ct,
                                acc_t* SSMK_RESTRICT h, acc_t* SSMK_RESTRICT a_out,
                                acc_t* SSMK_RESTRICT h_out) {
  acc_t y = 0;
  if constexpr (!kComplex) {
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const acc_t a = selective_scan::discretize(dt, A[n]);
      const acc_t hn = a * h[n] + du * Bt[n];
      h[n] = hn;
      y += Ct[n] * hn;
      if constexpr (kStore) {
        a_out[n] = a;
        h_out[n] = hn;
      }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const c10::complex<acc_t> a = selective_scan::discretize(dt, c10::complex<acc_t>(A[n], A[N + n]));
      const acc_t hr = a.real() * h[n] - a.imag() * h[N + n] + du * Bt[n];
      const acc_t hi = a.real() * h[N + n] + a.imag() * h[n] + du * Bt[N + n];
      h[n] = hr;
      h[N + n] = hi;
      y += Ct[n] * hr - Ct[N + n] * hi;
      if constexpr (kStore) {
        a_out[n] = a.real();
        a_out[N + n] = a.imag();
        h_out[n] = hr;
        h_out[N + n] = hi;
      }
    }
  }
  return y;
}

template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void fwd_rows(const SelectiveScanParams& p, const CpuLayout& lay, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const int64_t N = p.dstate, L = p.seqlen, nw = lay.nw, nc = p.n_chunks;
  constexpr acc_t kScale = kComplex ? acc_t(2) : acc_t(1);
  const auto* Aall = lay.A.data_ptr<acc_t>();
  const auto* Dv = static_cast<const acc_t*>(p.D);
  const auto* bias = static_cast<const acc_t*>(p.delta_bias);
  // Per chunk: dt and the epilogue are computed in passes vectorised over time; only the
  // recurrence itself walks step by step (vectorised over the state).
  std::vector<acc_t> h(nw), ubuf(kChunkSize), dtbuf(kChunkSize), ybuf(kChunkSize), zbuf(kChunkSize);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.dim, d = r % p.dim;
    const acc_t* A = Aall + d * nw;
    const acc_t* Bbase = lay.B.row<acc_t>(p, b, d, nw);
    const acc_t* Cbase = lay.C.row<acc_t>(p, b, d, nw);
    const acc_t Dd = Dv ? Dv[d] : acc_t(0), bias_d = bias ? bias[d] : acc_t(0);
    const int64_t u_off = b * p.u_batch_stride + d * p.u_dim_stride;
    const int64_t dl_off = b * p.delta_batch_stride + d * p.delta_dim_stride;
    const int64_t z_off = b * p.z_batch_stride + d * p.z_dim_stride;
    auto* out = static_cast<input_t*>(p.out) + r * L;
    auto* ckpt = static_cast<acc_t*>(p.checkpoints) + r * nc * (kComplex ? 2 * N : N);
    load_initial(p, b, d, h.data());
    for (int64_t c = 0; c < nc; ++c) {
      store_state<acc_t, kComplex>(h.data(), N, ckpt + c * (kComplex ? 2 * N : N));
      const int64_t t0 = c * kChunkSize;
      const int64_t n = std::min(L, t0 + kChunkSize) - t0;
      acc_t* SSMK_RESTRICT ub = ubuf.data();
      acc_t* SSMK_RESTRICT dtb = dtbuf.data();
      acc_t* SSMK_RESTRICT yb = ybuf.data();
      acc_t* SSMK_RESTRICT zb = zbuf.data();
      for (int64_t i = 0; i < n; ++i) {
        ub[i] = load<input_t, acc_t>(p.u, u_off + (t0 + i) * p.u_l_stride);
        dtb[i] = load<input_t, acc_t>(p.delta, dl_off + (t0 + i) * p.delta_l_stride);
      }
      if (p.softplus) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, true);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dtb[i] = selective_scan::delta_transform(dtb[i], bias_d, false);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = t0 + i;
        yb[i] = kScale * scan_step<acc_t, kComplex, false>(N, dtb[i], dtb[i] * ub[i], A, Bbase + t * lay.B.step,
                                                           Cbase + t * lay.C.step, h.data(), nullptr, nullptr);
      }
      if (p.z) {
        for (int64_t i = 0; i < n; ++i) zb[i] = load<input_t, acc_t>(p.z, z_off + (t0 + i) * p.z_l_stride);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, zb[i], true));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[t0 + i] = static_cast<input_t>(selective_scan::epilogue(yb[i], ub[i], Dd, acc_t(0), false));
      }
    }
    store_state<acc_t, kComplex>(h.data(), N, static_cast<acc_t*>(p.last_state) + r * (kComplex ? 2 * N : N));
  }
}
SSMK_CPU_MULTIVERSION(fwd_rows, (typename input_t, bool kComplex), (input_t, kComplex),
                      (const SelectiveScanParams& p, const CpuLayout& lay, int64_t begin, int64_t end),
                      (p, lay, begin, end))

// Backward of one slice of channels for one batch row (see the op's doc page for the
// derivation). With K_t = conj(a_t) G_t the gradient that reaches h_{t-1} through step t, and
// e_t = s g_t conj(C_t) the gradient of y_t w.r.t. h_t (s = 2 for complex A, else 1):
//   G_t = K_{t+1} + e_t,   K_t = conj(a_t) G_t,   K_L = dlast_state,   dinitial_state = K_0
//   dA += dt_t K_t conj(h_{t-1}),  ddt_t = Re(conj(A) K_t conj(h_{t-1})) + u_t Re(conj(B_t) G_t)
//   dB_t = dt_t u_t G_t,  dC_t = s g_t conj(h_t),  du_t = D g_t + dt_t Re(conj(B_t) G_t)
template <typename input_t, bool kComplex>
SSMK_CPU_INLINE void bwd_tasks(const SelectiveScanParams& p, const CpuLayout& lay, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const int64_t N = p.dstate, L = p.seqlen, nw = lay.nw, nc = p.n_chunks;
  const int64_t K = std::min<int64_t>(kChunkSize, L);
  constexpr acc_t kScale = kComplex ? acc_t(2) : acc_t(1);
  const auto* Aall = lay.A.data_ptr<acc_t>();
  const auto* Dv = static_cast<const acc_t*>(p.D);
  const auto* bias = static_cast<const acc_t*>(p.delta_bias);
  const auto* dlast = static_cast<const acc_t*>(p.dlast_state);
  // hs[i] = h after step i of the chunk (hs[-1] = the chunk's checkpoint), as[i] = a of step i.
  std::vector<acc_t> hs_buf((K + 1) * nw), as(K * nw);
  std::vector<acc_t> dts(K), us(K), gs(K), ys(K), dtg(K);
  std::vector<acc_t> Kc(nw), dA(nw), dBf(nw), dCf(nw), hrow(nw);
  acc_t* hs = hs_buf.data() + nw;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.n_slices, s = task % p.n_slices;
    // Variable B/C partial sums of this slice: [L, NW'] rows (interleaved if complex).
    auto* dBp = p.B_variable ? static_cast<acc_t*>(p.dB_partial) + (s * p.batch + b) * L * nw : nullptr;
    auto* dCp = p.C_variable ? static_cast<acc_t*>(p.dC_partial) + (s * p.batch + b) * L * nw : nullptr;
    if (dBp) std::fill(dBp, dBp + L * nw, acc_t(0));
    if (dCp) std::fill(dCp, dCp + L * nw, acc_t(0));
    for (int64_t d = s * p.slice_channels; d < (s + 1) * p.slice_channels; ++d) {
      const int64_t r = b * p.dim + d;
      const acc_t* A = Aall + d * nw;
      const acc_t* Bbase = lay.B.row<acc_t>(p, b, d, nw);
      const acc_t* Cbase = lay.C.row<acc_t>(p, b, d, nw);
      const acc_t Dd = Dv ? Dv[d] : acc_t(0), bias_d = bias ? bias[d] : acc_t(0);
      const int64_t u_off = b * p.u_batch_stride + d * p.u_dim_stride;
      const int64_t dl_off = b * p.delta_batch_stride + d * p.delta_dim_stride;
      const int64_t z_off = b * p.z_batch_stride + d * p.z_dim_stride;
      const int64_t do_off = b * p.dout_batch_stride + d * p.dout_dim_stride;
      const auto* ckpt = static_cast<const acc_t*>(p.checkpoints) + r * nc * (kComplex ? 2 * N : N);
      auto* du_out = static_cast<input_t*>(p.du) + r * L;
      auto* ddelta_out = static_cast<input_t*>(p.ddelta) + r * L;
      auto* dz_out = p.dz ? static_cast<input_t*>(p.dz) + r * L : nullptr;
      if (dlast) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = b * p.dlast_batch_stride + d * p.dlast_dim_stride + n * p.dlast_n_stride;
          if constexpr (kComplex) {
            Kc[n] = dlast[2 * off];
            Kc[N + n] = dlast[2 * off + 1];
          } else {
            Kc[n] = dlast[off];
          }
        }
      } else {
        std::fill(Kc.begin(), Kc.end(), acc_t(0));
      }
      std::fill(dA.begin(), dA.end(), acc_t(0));
      std::fill(dBf.begin(), dBf.end(), acc_t(0));
      std::fill(dCf.begin(), dCf.end(), acc_t(0));
      acc_t dD = 0, ddb = 0;
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunkSize, len = std::min(kChunkSize, L - t0);
        load_state<acc_t, kComplex>(ckpt + c * (kComplex ? 2 * N : N), N, hs - nw);
        std::memcpy(hrow.data(), hs - nw, nw * sizeof(acc_t));
        // Forward recomputation of the chunk.
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = t0 + i;
          const acc_t u = load<input_t, acc_t>(p.u, u_off + t * p.u_l_stride);
          const acc_t delta = load<input_t, acc_t>(p.delta, dl_off + t * p.delta_l_stride);
          const acc_t dt = delta_transform(delta, bias_d, p.softplus);
          const acc_t dout = load<input_t, acc_t>(p.dout, do_off + t * p.dout_l_stride);
          const acc_t zv = p.z ? load<input_t, acc_t>(p.z, z_off + t * p.z_l_stride) : acc_t(0);
          dts[i] = dt;
          us[i] = u;
          dtg[i] = delta_transform_grad(delta, bias_d, p.softplus);
          gs[i] = p.z ? dout * ssmk::silu(zv) : dout;
          ys[i] = kScale * scan_step<acc_t, kComplex, true>(N, dt, dt * u, A, Bbase + t * lay.B.step,
                                                      Cbase + t * lay.C.step, hrow.data(), as.data() + i * nw,
                                                      hs + i * nw);
          if (dz_out) {
            const acc_t o = ys[i] + Dd * u;
            dz_out[t] = static_cast<input_t>(dout * o * ssmk::silu_grad(zv));
          }
        }
        // Reverse recurrence over the chunk.
        for (int64_t i = len - 1; i >= 0; --i) {
          const int64_t t = t0 + i;
          const acc_t dt = dts[i], u = us[i], g = gs[i], cg = kScale * g, dtu = dt * u;
          const acc_t* Bt = Bbase + t * lay.B.step;
          const acc_t* Ct = Cbase + t * lay.C.step;
          const acc_t* a = as.data() + i * nw;
          const acc_t* h = hs + i * nw;
          const acc_t* hp = hs + (i - 1) * nw;
          acc_t* dBt = dBp ? dBp + t * nw : dBf.data();
          acc_t* dCt = dCp ? dCp + t * nw : dCf.data();
          acc_t sA = 0, sB = 0;
          if constexpr (!kComplex) {
            acc_t* SSMK_RESTRICT Kr = Kc.data();
            acc_t* SSMK_RESTRICT dAr = dA.data();
#pragma omp simd reduction(+ : sA, sB)
            for (int64_t n = 0; n < N; ++n) {
              const acc_t G = Kr[n] + cg * Ct[n];
              dCt[n] += cg * h[n];
              sB += G * Bt[n];
              dBt[n] += dtu * G;
              const acc_t Kn = a[n] * G;
              Kr[n] = Kn;
              const acc_t dw = Kn * hp[n];
              dAr[n] += dt * dw;
              sA += A[n] * dw;
            }
          } else {
            for (int64_t n = 0; n < N; ++n) {
              const acc_t Gr = Kc[n] + cg * Ct[n], Gi = Kc[N + n] - cg * Ct[N + n];
              // Partials of variable B/C are interleaved (re, im); fixed ones split.
              const int64_t ir = dCp ? 2 * n : n, ii = dCp ? 2 * n + 1 : N + n;
              dCt[ir] += cg * h[n];
              dCt[ii] -= cg * h[N + n];
              sB += Bt[n] * Gr + Bt[N + n] * Gi;
              const int64_t jr = dBp ? 2 * n : n, ji = dBp ? 2 * n + 1 : N + n;
              dBt[jr] += dtu * Gr;
              dBt[ji] += dtu * Gi;
              const acc_t ar = a[n], ai = a[N + n];
              const acc_t Kr = ar * Gr + ai * Gi, Ki = ar * Gi - ai * Gr;
              Kc[n] = Kr;
              Kc[N + n] = Ki;
              const acc_t dwr = Kr * hp[n] + Ki * hp[N + n], dwi = Ki * hp[n] - Kr * hp[N + n];
              dA[n] += dt * dwr;
              dA[N + n] += dt * dwi;
              sA += A[n] * dwr + A[N + n] * dwi;
            }
          }
          const acc_t ddt = sA + u * sB;
          const acc_t ddelta = ddt * dtg[i];
          du_out[t] = static_cast<input_t>(Dd * g + dt * sB);
          ddelta_out[t] = static_cast<input_t>(ddelta);
          dD += g * u;
          ddb += ddelta;
        }
      }
      auto wr = [&](void* base) { return static_cast<acc_t*>(base) + r * (kComplex ? 2 * N : N); };
      store_state<acc_t, kComplex>(Kc.data(), N, wr(p.dinitial_state));
      store_state<acc_t, kComplex>(dA.data(), N, wr(p.dA_rows));
      if (!p.B_variable) store_state<acc_t, kComplex>(dBf.data(), N, wr(p.dB_rows));
      if (!p.C_variable) store_state<acc_t, kComplex>(dCf.data(), N, wr(p.dC_rows));
      static_cast<acc_t*>(p.dD_rows)[r] = dD;
      static_cast<acc_t*>(p.ddelta_bias_rows)[r] = ddb;
    }
  }
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename input_t, bool kComplex), (input_t, kComplex),
                      (const SelectiveScanParams& p, const CpuLayout& lay, int64_t begin, int64_t end),
                      (p, lay, begin, end))

#define SSMK_DISPATCH_SCAN_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state) {
  return selective_scan::fwd(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
      [&](const SelectiveScanParams& p, const selective_scan::Prepared& pr, at::ScalarType dtype) {
        const CpuLayout lay = make_layout(p, pr, selective_scan::acc_dtype(u));
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_scan_fwd_cpu", [&] {
          SSMK_BOOL_SWITCH(p.is_complex, kComplex, [&] {
            at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
              fwd_rows_dispatch<scalar_t, kComplex>(p, lay, begin, end);
            });
          });
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                       bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                       const at::Tensor& checkpoints, const at::Tensor& dout,
                       const std::optional<at::Tensor>& dlast_state) {
  // 64 tasks keep two to a few dozen cores busy while the variable-B/C partials stay small.
  const SelectiveScanDeviceConfig config{64, true};
  return selective_scan::bwd(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints, dout, dlast_state,
      config, [&](const SelectiveScanParams& p, const selective_scan::Prepared& pr, at::ScalarType dtype) {
        const CpuLayout lay = make_layout(p, pr, selective_scan::acc_dtype(u));
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_scan_bwd_cpu", [&] {
          SSMK_BOOL_SWITCH(p.is_complex, kComplex, [&] {
            at::parallel_for(0, p.batch * p.n_slices, 1, [&](int64_t begin, int64_t end) {
              bwd_tasks_dispatch<scalar_t, kComplex>(p, lay, begin, end);
            });
          });
        });
      });
}

// One decode step per (batch, head, headdim) row, in runs of up to kUpdateRun rows of one
// (batch, head): the per-row scalar work (dt's softplus, the z gate) runs as loops over the run
// that vectorise, and each row's state update and C reduction as contiguous loops over dstate.
constexpr int64_t kUpdateRun = 64;

// sum_n c[n] h[n] with 8 independent partial sums (a fixed order the compiler keeps in one vector
// register; a plain `y +=` chain would stay scalar).
template <typename acc_t>
SSMK_CPU_INLINE acc_t dot_rows(const acc_t* SSMK_RESTRICT c, const acc_t* SSMK_RESTRICT h, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += c[i + j] * h[i + j];
  }
  for (; i < n; ++i) part[0] += c[i] * h[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

template <typename input_t>
SSMK_CPU_INLINE void update_rows(const SelectiveStateUpdateParams& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  const int64_t heads_per_group = H / p.groups;
  acc_t xv[kUpdateRun], dtv[kUpdateRun], yv[kUpdateRun];
  for (int64_t r = begin; r < end;) {
    // Row r = (b * H + hd) * P + pd.
    const int64_t b = r / (H * P), hd = (r / P) % H, pd0 = r % P;
    const int64_t len = std::min({kUpdateRun, P - pd0, end - r});
    auto* out = static_cast<input_t*>(p.out) + r;
    const int64_t sb = p.state_indices ? p.state_indices[b] : b;
    if (sb < 0 || sb >= p.state_batch) {
      for (int64_t i = 0; i < len; ++i) out[i] = input_t(0);
      r += len;
      continue;
    }
    const int64_t hp0 = hd * P + pd0;
    const input_t* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + hd * p.x_head_stride + pd0 * p.x_dim_stride;
    const input_t* dt = static_cast<const input_t*>(p.dt) + b * p.dt_batch_stride + hd * p.dt_head_stride + pd0 * p.dt_dim_stride;
    const acc_t* bias = p.dt_bias ? static_cast<const acc_t*>(p.dt_bias) + hp0 : nullptr;
    for (int64_t i = 0; i < len; ++i) {
      xv[i] = static_cast<acc_t>(x[i * p.x_dim_stride]);
      dtv[i] = static_cast<acc_t>(dt[i * p.dt_dim_stride]) + (bias ? bias[i] : acc_t(0));
    }
    if (p.softplus) {
      for (int64_t i = 0; i < len; ++i) dtv[i] = ssmk::softplus(dtv[i]);
    }

    const int64_t g = hd / heads_per_group;
    const acc_t* Bv = static_cast<const acc_t*>(p.B) + (b * p.groups + g) * N;
    const acc_t* Cv = static_cast<const acc_t*>(p.C) + (b * p.groups + g) * N;
    const int64_t sn = p.state_n_stride;
    for (int64_t i = 0; i < len; ++i) {
      const acc_t* A = static_cast<const acc_t*>(p.A) + (hp0 + i) * N;
      auto* state = static_cast<acc_t*>(p.state) + sb * p.state_batch_stride + hd * p.state_head_stride +
                    (pd0 + i) * p.state_dim_stride;
      const acc_t dti = dtv[i], dtx = dtv[i] * xv[i];
      if (sn == 1) {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) state[n] = selective_scan::discretize(dti, A[n]) * state[n] + dtx * Bv[n];
        yv[i] = dot_rows(Cv, state, N);
      } else {
        acc_t y = 0;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t h = selective_scan::discretize(dti, A[n]) * state[n * sn] + dtx * Bv[n];
          state[n * sn] = h;
          y += Cv[n] * h;
        }
        yv[i] = y;
      }
    }

    if (p.D) {
      const acc_t* D = static_cast<const acc_t*>(p.D) + hp0;
      for (int64_t i = 0; i < len; ++i) yv[i] += D[i] * xv[i];
    }
    if (p.z) {
      const input_t* z = static_cast<const input_t*>(p.z) + b * p.z_batch_stride + hd * p.z_head_stride + pd0 * p.z_dim_stride;
      for (int64_t i = 0; i < len; ++i) yv[i] *= ssmk::silu(static_cast<acc_t>(z[i * p.z_dim_stride]));
    }
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<input_t>(yv[i]);
    r += len;
  }
}
SSMK_CPU_MULTIVERSION(update_rows, (typename input_t), (input_t),
                      (const SelectiveStateUpdateParams& p, int64_t begin, int64_t end), (p, begin, end))

at::Tensor selective_state_update_cpu(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                      const std::optional<at::Tensor>& state_batch_indices) {
  if (state_batch_indices && state_batch_indices->numel() > 0) {
    // On the CPU an index past the state's batch is checked (no sync cost), not skipped.
    const int64_t hi = state_batch_indices->max().item<int64_t>();
    SSMK_CHECK_VALUE(hi < state.size(0), "state_batch_indices: expected values < state batch ",
                     state.size(0), ", got ", hi);
  }
  return selective_scan::update(
      state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
      [](const SelectiveStateUpdateParams& p, at::ScalarType dtype) {
        SSMK_DISPATCH_SCAN_TYPES(dtype, "selective_state_update_cpu", [&] {
          at::parallel_for(0, p.batch * p.nheads * p.headdim, 64, [&](int64_t begin, int64_t end) {
            update_rows_dispatch<scalar_t>(p, begin, end);
          });
        });
      });
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CPU, m) {
  m.impl("selective_scan_fwd", &ssmk::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &ssmk::selective_scan_bwd_cpu);
  m.impl("selective_state_update", &ssmk::selective_state_update_cpu);
}

TORCH_LIBRARY_FRAGMENT(ssm_kernels, m) {
  // selective_scan: the forward also returns the state before every chunk of kChunkSize steps
  // (checkpoints, [B, D, n_chunks, N]), from which the backward recomputes each chunk.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state) "
      "-> (Tensor out, Tensor last_state, Tensor checkpoints)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, "
      "Tensor checkpoints, Tensor dout, Tensor? dlast_state) -> (Tensor du, Tensor ddelta, "
      "Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, "
      "Tensor dinitial_state)");
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, "
      "Tensor? state_batch_indices) -> Tensor");
}
