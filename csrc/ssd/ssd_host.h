// ssd_scan: the stages each device supplies to the host driver (ssd_op.cpp). Host code only.
//
// Both devices have the same interface, so one driver runs on either: batched GEMMs in the
// accumulation dtype on [batch, M, K] x [batch, K, N] views of any strides (operands rounded to
// T's tensor-core precision on CUDA), the products with GL computed per task, and the stage
// kernels on typed params (ssd.h). T is the op's input element type.
#pragma once

#include <ATen/ATen.h>

#include "common/cuda/batched_gemm_params.h"
#include "ssd/ssd.h"

namespace ssmk {

// CPU: BLAS GEMMs with the GPU GEMM's row blocking, and the stage loops (ssd_cpu.cpp).
template <typename T>
struct SsdCpuStages {
  using acc = acc_t<T>;
  int64_t scan_splits(const SsdDims&) const { return 1; }
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri = cuda::Triangle::kNone) const;
  void gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const;
  void prep(const SsdPrepParams<T>& p) const;
  // GL @ rhs (transposed = false: y_intra = GL (dt x)) or GL^T @ rhs (true: d(dt x) = GL^T dY),
  // rhs [B, nc, H, Q, P] -> [tasks, Q, P].
  at::Tensor intra(const SsdGlParams<acc>& p, const at::Tensor& rhs, bool transposed) const;
  void scan(const SsdScanParams<acc>& p) const;
  void scan(const SsdScanBwdParams<acc>& p) const;
  void epilogue(const SsdFwdParams<T>& p) const;
  // dCB [B * nc * G, Q, Q] (dGL * decay summed over each group's heads), and p.dacs.
  at::Tensor intra_dcb(const SsdWsumParams<acc>& p, const at::Tensor& dy, const at::Tensor& xdt) const;
  void final(const SsdBwdParams<T>& p) const;
};

#ifdef SSMK_WITH_CUDA
// CUDA: the tensor-core GEMM (cuBLAS through ATen for float64 and for sizes past its 32-bit
// offsets) and the stage kernels, on ctx's stream (ssd_cuda_host.cpp).
template <typename T>
struct SsdCudaStages {
  using acc = acc_t<T>;
  CudaContext ctx;
  int64_t scan_splits(const SsdDims& d) const { return ssd::cuda_scan_splits(d); }
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri = cuda::Triangle::kNone) const;
  void gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const;
  void prep(const SsdPrepParams<T>& p) const;
  at::Tensor intra(const SsdGlParams<acc>& p, const at::Tensor& rhs, bool transposed) const;
  void scan(const SsdScanParams<acc>& p) const;
  void scan(const SsdScanBwdParams<acc>& p) const;
  void epilogue(const SsdFwdParams<T>& p) const;
  at::Tensor intra_dcb(const SsdWsumParams<acc>& p, const at::Tensor& dy, const at::Tensor& xdt) const;
  void final(const SsdBwdParams<T>& p) const;
};
#endif

}  // namespace ssmk
