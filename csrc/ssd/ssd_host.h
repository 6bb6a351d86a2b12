// ssd_scan: the stages each device supplies to the host driver (ssd_op.cpp). Host code only.
//
// Both devices have the same interface, so one driver runs on either: batched GEMMs in the
// accumulation dtype on [batch, M, K] x [batch, K, N] views of any strides (operands rounded to
// T's tensor-core precision on CUDA), the products with GL computed per task, and the stage
// kernels on typed params (ssd.h). T is the op's input element type.
#pragma once

#include "common/aten.h"

#include <atomic>

#include "common/cuda/batched_gemm_params.h"
#include "ssd/ssd.h"

namespace ssmk {

// The operands of a stage GEMM: kInput rounds them to the input dtype's tensor-core precision on
// CUDA (16-bit inputs: bf16/fp16 operands, float32 accumulation); kFloat32 keeps float32 operands
// (3xTF32) for the products whose rounding a gradient cannot absorb (docs/ssd.md, precision).
enum class GemmOperands { kInput, kFloat32 };

// Test switch: the CPU stages round GEMM operands where the CUDA stages do (16-bit inputs only),
// so that CPU tests see the GPU's rounding points. Off by default; set by the test hook
// ssm_kernels_test::ssd_emulate_cuda_rounding.
std::atomic<bool>& ssd_emulate_cuda_rounding();

namespace ssd {
// The backward's products that d A depends on (states, y_inter, d states, zT and dGL) enter sums
// whose terms largely cancel. Rounded to bf16, their operands alone gave d A relative errors of
// 2e-3 to 1.6e-2 (the CUDA run, and the CPU emulation of its rounding in tests/test_ssd.py);
// with float32 operands the error is that of float32. The forward keeps the input precision.
inline constexpr GemmOperands kBwdOperands = GemmOperands::kFloat32;
}  // namespace ssd

// The CPU's chunk-major buffers, one pass each way through d's chunks (the chunk map of packed
// sequences, or the plain layout, ssd.h): [B, L, K1, K2] of any dtype and strides -> [B, nc, K1,
// Q, K2] in Acc, contiguous, zero on padding, each row times `scale` [B, nc, K1, Q] when defined
// (gather), and [B, nc, K1, Q, K2] Acc -> [B, L, K1, K2] in `dtype`, contiguous (scatter,
// padding dropped).
template <typename Acc>
at::Tensor ssd_cpu_gather_chunks(const at::Tensor& t, const SsdDims& d, const at::Tensor& scale = {});
template <typename Acc>
at::Tensor ssd_cpu_scatter_chunks(const at::Tensor& t, const SsdDims& d, at::ScalarType dtype);

// The stages, declared once for both devices.
#define SSMK_SSD_STAGES(T)                                                                                   \
  using acc = acc_t<T>;                                                                                      \
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri = cuda::Triangle::kNone,        \
                  GemmOperands ops = GemmOperands::kInput) const;                                            \
  void gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,                                   \
                GemmOperands ops = GemmOperands::kInput) const;                                              \
  void prep(const SsdPrepParams<T>& p) const;                                                                \
  /* GL @ rhs (transposed = false: y_intra = GL (dt x)) or GL^T @ rhs (true: d(dt x) = GL^T dY), */          \
  /* rhs [B, nc, H, Q, P] -> [tasks, Q, P]. */                                                               \
  at::Tensor intra(const SsdGlParams<acc>& p, const at::Tensor& rhs, bool transposed) const;                 \
  void scan(const SsdScanParams<acc>& p) const;                                                              \
  void scan(const SsdScanBwdParams<acc>& p) const;                                                           \
  void epilogue(const SsdFwdParams<T>& p) const;                                                             \
  /* dCB [B * nc * G, Q, Q] (dGL * decay summed over each group's heads), and p.dacs. */                     \
  at::Tensor intra_dcb(const SsdWsumParams<acc>& p, const at::Tensor& dy, const at::Tensor& xdt) const;      \
  void final(const SsdBwdParams<T>& p) const;

// CPU: BLAS GEMMs with the GPU GEMM's row blocking, and the stage loops (ssd_cpu.cpp).
template <typename T>
struct SsdCpuStages {
  SSMK_SSD_STAGES(T)
  int64_t scan_splits(const SsdDims&) const { return 1; }
};

#ifdef SSMK_WITH_CUDA
// CUDA: the tensor-core GEMM (cuBLAS through ATen for float64 and for sizes past its 32-bit
// offsets) and the stage kernels, on ctx's stream (ssd_cuda_host.cpp).
template <typename T>
struct SsdCudaStages {
  SSMK_SSD_STAGES(T)
  CudaContext ctx;
  int64_t scan_splits(const SsdDims& d) const { return ssd::cuda_scan_splits(d); }
};
#endif

#undef SSMK_SSD_STAGES

}  // namespace ssmk
