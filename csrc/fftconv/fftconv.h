// fftconv: typed kernel parameters and the launchers of both devices.
//
// u, pregate, postgate, dout: [B, D, L] with any strides; outputs are contiguous [B, D, L]. The
// parameters k, k_rev, D arrive in the accumulation dtype, contiguous. The host side (checks,
// allocation, the fill of these params) is fftconv_op.cpp; on CUDA the FFT length, the path, the
// workspaces and the cuFFT transforms are chosen and run by fftconv_cuda_host.cpp.
//
// The combined kernel h (causal taps at the front, anti-causal taps wrapped to the back, see
// fftconv_math.h) is transformed once per channel and shared by every batch row. In the backward,
// dH[d] = sum_b G_b * conj(V_b) is reduced over the batch in a fixed order and dh = irfft(dH, n)
// is mapped back onto the taps of k and k_rev.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/packed_seqs.h"
#include "common/types.h"
#include "fftconv/fftconv_math.h"

namespace ssmk {

template <typename T>
struct FftconvCommon {
  using acc = acc_t<T>;
  int64_t batch, dim, seqlen;
  int64_t fft_size, nfreq;  // n and n / 2 + 1, set by the device's plan
  int activation;           // kActNone, kActGelu or kActSilu
  View<const T, 3> u;         // [B, D, L]
  View<const T, 3> pregate;   // [B, D, L], or data nullptr
  View<const T, 3> postgate;  // [B, D, L], or data nullptr
  const acc* D;               // [D], or nullptr
  const acc* k;               // [D, klen]
  const acc* k_rev;           // [D, klen_rev], or nullptr
  int64_t klen, klen_rev, kc, kr;  // kc / kr: the taps that reach the output (<= L)
  // [D, F] complex as (re, im) pairs: H = rfft(h, n), for the CUDA multi-pass path (set by its
  // host driver); the other paths build the spectra themselves from k and k_rev.
  const acc* kf;
  // CPU, cu_seqlens (batch 1): the offsets (host memory); each sequence is then its own
  // convolution (fftconv_cpu.cpp). CUDA runs packed rows as one plain row with gaps (the op).
  PackedSeqs seqs;
  // Set by fftconv_cpu.cpp only, for the sequences of one FFT length run as the batch rows of the
  // plain kernels: batch row b is tokens [seq_start[b], seq_start[b] + seq_len[b]) of row 0
  // (seqlen stays the row's length); nullptr otherwise.
  const int64_t* seq_start;
  const int64_t* seq_len;
};

template <typename T>
struct FftconvFwdParams : FftconvCommon<T> {
  T* out;  // [B, D, L] contiguous
};

template <typename T>
struct FftconvBwdParams : FftconvCommon<T> {
  using acc = acc_t<T>;
  View<const T, 3> dout;  // [B, D, L]
  T* du;                  // [B, D, L] contiguous
  T* dpregate;            // [B, D, L] contiguous, or nullptr
  T* dpostgate;           // [B, D, L] contiguous, or nullptr
  acc* dD;                // [D], or nullptr
  acc* dk;                // [D, klen]
  acc* dk_rev;            // [D, klen_rev], or nullptr
  // [D, F] complex (re, im): sum over b of G_b * conj(V_b), for the CUDA multi-pass path (set by
  // its host driver, which maps it onto dk / dk_rev); the other paths write dk / dk_rev directly.
  acc* dkf;
};

namespace fftconv {

// Taps that reach the output: a kernel longer than the sequence uses its first L taps.
inline int64_t taps(int64_t klen, int64_t L) { return std::min(klen, L); }

// Shortest circular length without aliasing into [0, L): L + max(Kc, Kr) - 1 (klen_rev 0: none).
inline int64_t min_fft_size(int64_t L, int64_t klen, int64_t klen_rev) {
  return L + std::max(taps(klen, L), taps(klen_rev, L)) - 1;
}

// The CPU's FFT length for a minimum length, and whether the hand-written FFT runs
// (fftconv_cpu.cpp).
struct CpuPlan {
  int64_t n;
  bool hand;
};
CpuPlan cpu_plan(int64_t min_size);

// The hand-written real FFT of rows, for the test hooks: x [R, n] real -> out [R, n/2 + 1]
// complex as (re, im) pairs (inverse: [R, n/2 + 1] -> [R, n], scaled by 1 / n like irfft);
// `strided` runs the CUDA fused kernels' per-index drivers serially instead of the CPU's loops.
// n must satisfy hand_fft_size_ok(n).
bool hand_fft_size_ok(int64_t n);
int64_t hand_fft_min_size();
int64_t hand_fft_max_size();
template <typename T>
void hand_fft_rows(const T* x, int64_t rows, int64_t n, bool inverse, bool strided, T* out);

}  // namespace fftconv

// p.fft_size from fftconv::cpu_plan.
template <typename T> void fftconv_fwd_cpu(const FftconvFwdParams<T>& p);
template <typename T> void fftconv_bwd_cpu(const FftconvBwdParams<T>& p);

#if defined(SSMK_WITH_CUDA)
// Host drivers of the CUDA paths (fftconv_cuda_host.cpp): they pick the FFT length and the path
// (fused single kernel or multi-pass around cuFFT), allocate the workspaces and run the launchers
// below on ctx.stream. p.fft_size / nfreq / kf / dkf are theirs to set.
template <typename T> void fftconv_fwd_cuda(const FftconvFwdParams<T>& p, const CudaContext& ctx);
template <typename T> void fftconv_bwd_cuda(const FftconvBwdParams<T>& p, const CudaContext& ctx);

// Kernel launchers (fftconv_cuda.cu); they never throw, errors are checked by the host.
// Multi-pass path: one launch per stage over the rows of channels [d0, d0 + nch) (channel-major:
// row q is (b = q % B, d = d0 + q / B)); buffers are [rows, n] real or [rows, F] complex (re, im).
namespace fftconv::cuda_launch {

int64_t fused_smem_bytes(int64_t n);      // the fused forward's dynamic shared memory
int64_t fused_bwd_smem_bytes(int64_t n);  // the fused backward's
int64_t min_fused_size();                 // the smallest fused length (a power of two)
int64_t max_fused_bwd_size();             // the longest length the fused backward holds
int64_t grad_pre_chunks(int64_t n);       // partial dD sums per row of grad_pre

template <typename T>
void load_v(const FftconvCommon<T>& p, int64_t d0, int64_t rows, acc_t<T>* vbuf, const CudaContext& ctx);
template <typename T>
void mul_spectrum(const FftconvCommon<T>& p, int64_t d0, int64_t rows, bool conj, const acc_t<T>* src,
                  acc_t<T>* dst, const CudaContext& ctx);
template <typename T>
void epilogue(const FftconvFwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* c, const CudaContext& ctx);
// partial: [nch, B * grad_pre_chunks(n)]
template <typename T>
void grad_pre(const FftconvBwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* c, acc_t<T>* gbuf,
              acc_t<T>* partial, const CudaContext& ctx);
template <typename T>
void dkf(const FftconvBwdParams<T>& p, int64_t d0, int64_t nch, const acc_t<T>* G, const acc_t<T>* V,
         const CudaContext& ctx);
template <typename T>
void grad_input(const FftconvBwdParams<T>& p, int64_t d0, int64_t rows, const acc_t<T>* conv,
                const acc_t<T>* gbuf, const CudaContext& ctx);

// Fused path (float arithmetic; not for float64): the twiddle table tw [2 * table_size(n / 2)],
// the kernel spectra hs [D, 2, n / 2 + 1], then the fused forward or backward.
template <typename T>
void fused_tables(const FftconvCommon<T>& p, float* tw, float* hs, const CudaContext& ctx);
int64_t fused_table_size(int64_t n);
template <typename T>
void fused_fwd(const FftconvFwdParams<T>& p, const float* tw, const float* hs, const CudaContext& ctx);
template <typename T>
void fused_bwd(const FftconvBwdParams<T>& p, const float* tw, const float* hs, const CudaContext& ctx);

}  // namespace fftconv::cuda_launch
#endif

// Test switch (ssm_kernels_test.set_fftconv_packed_gapped_row): packed sequences on the CPU run
// through the CUDA path's one row with gaps instead of one convolution per sequence.
std::atomic<bool>& fftconv_gapped_row_on_cpu();

}  // namespace ssmk
