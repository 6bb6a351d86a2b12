// ssd_scan on CUDA, host side: the GEMMs' operands and fallbacks, and the buffers of the stage
// kernels' launchers (ssd_cuda.cu). Runs inside ssmk::launch (device guard, ctx's stream = the
// current stream, launch errors checked by it), so ATen work here is on the same stream.
#ifdef SSMK_WITH_CUDA

#include "ssd/ssd_host.h"

namespace ssmk {
namespace {


// Checked here because the GEMM kernel trusts its parameters.
cuda::BatchedGemmParams gemm_params(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                    cuda::Triangle tri, bool accumulate) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1) &&
                  out.is_contiguous() && out.size(0) == a.size(0) && out.size(1) == a.size(1) &&
                  out.size(2) == b.size(2),
              "ssd gemm: inconsistent operands ", a.sizes(), " x ", b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "ssd gemm: expected float32 operands");
  cuda::BatchedGemmParams p{};
  p.a = a.data_ptr<float>();
  p.a_batch_stride = a.stride(0);
  p.a_row_stride = a.stride(1);
  p.a_col_stride = a.stride(2);
  p.b = b.data_ptr<float>();
  p.b_batch_stride = b.stride(0);
  p.b_row_stride = b.stride(1);
  p.b_col_stride = b.stride(2);
  p.out = out.data_ptr<float>();
  p.batch = a.size(0);
  p.M = a.size(1);
  p.N = b.size(2);
  p.K = a.size(2);
  p.tiles_m = ceil_div(p.M, cuda::kGemmTileM);
  p.tiles_n = ceil_div(p.N, cuda::kGemmTileN);
  p.accumulate = accumulate;
  p.triangle = tri;
  return p;
}

// cuBLAS (at::bmm) for what the tensor-core kernel does not take: float64 (gradcheck), and a
// batch matrix past its 32-bit in-matrix offsets. 16-bit inputs' operands are rounded as the
// kernel rounds them.
template <typename T>
void cublas_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  constexpr bool kHalf = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
  const auto in_dtype = c10::CppTypeToScalarType<T>::value;
  const at::Tensor r = kHalf ? at::bmm(a.to(in_dtype), b.to(in_dtype)).to(out.scalar_type()) : at::bmm(a, b);
  if (accumulate) {
    out.add_(r);
  } else {
    out.copy_(r);
  }
}

// out[i] (=|+=) a[i] @ b[i] for [batch, M, K] x [batch, K, N] accumulation-dtype views of any strides.
template <typename T>
void tensor_core_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri,
                      bool accumulate, const CudaContext& ctx) {
  if constexpr (std::is_same_v<T, double>) {
    cublas_gemm<T>(out, a, b, accumulate);
  } else {
    if (!ssd_gemm_cuda<T>(gemm_params(out, a, b, tri, accumulate), ctx)) cublas_gemm<T>(out, a, b, accumulate);
  }
}

// kFloat32 multiplies as float32 inputs do (3xTF32); float64 stays on cuBLAS.
template <typename T>
void stage_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri, bool accumulate,
                GemmOperands ops, const CudaContext& ctx) {
  if (ops == GemmOperands::kFloat32 && !std::is_same_v<T, double>) {
    tensor_core_gemm<float>(out, a, b, tri, accumulate, ctx);
  } else {
    tensor_core_gemm<T>(out, a, b, tri, accumulate, ctx);
  }
}

}  // namespace

template <typename T>
at::Tensor SsdCudaStages<T>::gemm(const at::Tensor& a, const at::Tensor& b, cuda::Triangle tri, GemmOperands ops) const {
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  stage_gemm<T>(out, a, b, tri, false, ops, ctx);
  return out;
}

template <typename T>
void SsdCudaStages<T>::gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, GemmOperands ops) const {
  stage_gemm<T>(out, a, b, cuda::Triangle::kNone, true, ops, ctx);
}

template <typename T>
void SsdCudaStages<T>::prep(const SsdPrepParams<T>& p) const {
  ssd_prep_cuda(p, ctx);
}

// GL is computed in the GEMM's operand loads: it never goes through global memory. float64 (and
// a size past the GEMM's 32-bit in-matrix offsets) builds GL in memory instead.
template <typename T>
at::Tensor SsdCudaStages<T>::intra(const SsdGlParams<acc>& p, const at::Tensor& rhs, bool transposed) const {
  const int64_t Q = p.chunk, P = p.headdim;
  const at::Tensor r3 = rhs.view({p.tasks(), Q, P});
  const cuda::Triangle tri = transposed ? cuda::Triangle::kUpperA : cuda::Triangle::kLowerA;
  if constexpr (!std::is_same_v<T, double>) {
    at::Tensor out = at::empty({p.tasks(), Q, P}, rhs.options());
    // A view of one chunk's CB with the strides the walk should follow (k contiguous for GL,
    // m contiguous for GL^T); the loader reads the actual elements.
    const at::Tensor cb_view = at::from_blob(const_cast<float*>(p.cb), {p.tasks(), Q, Q},
                                             {0, transposed ? 1 : Q, transposed ? Q : 1}, rhs.options());
    if (ssd_gl_gemm_cuda<T>(gemm_params(out, cb_view, r3, tri, false), p, transposed, ctx)) return out;
  }
  at::Tensor gl = at::empty({p.tasks(), Q, Q}, rhs.options());
  ssd_build_gl_cuda(p, gl.data_ptr<acc>(), ctx);
  return gemm(transposed ? gl.transpose(1, 2) : gl, r3, tri);
}

template <typename T>
void SsdCudaStages<T>::scan(const SsdScanParams<acc>& p) const {
  ssd_scan_fwd_cuda(p, ctx);
}

template <typename T>
void SsdCudaStages<T>::scan(const SsdScanBwdParams<acc>& p) const {
  ssd_scan_bwd_cuda(p, ctx);
}

template <typename T>
void SsdCudaStages<T>::epilogue(const SsdFwdParams<T>& p) const {
  ssd_epilogue_cuda(p, ctx);
}

// dGL = dY (dt x)^T in global memory, wsum (dGL * decay, and dacs), then the sum over the heads
// of each group.
template <typename T>
at::Tensor SsdCudaStages<T>::intra_dcb(const SsdWsumParams<acc>& p, const at::Tensor& dy, const at::Tensor& xdt) const {
  const int64_t Q = p.chunk, P = p.headdim, Hg = p.nheads / p.ngroups;
  const int64_t groups = p.batch * p.nchunks * p.ngroups;
  at::Tensor dgl = gemm(dy.view({p.tasks(), Q, P}), xdt.view({p.tasks(), Q, P}).transpose(1, 2),
                        cuda::Triangle::kLowerOut, ssd::kBwdOperands);
  ssd_wsum_cuda(p, dgl.data_ptr<acc>(), ctx);
  return Hg == 1 ? dgl.view({groups, Q, Q}) : dgl.view({groups, Hg, Q, Q}).sum(1);
}

template <typename T>
void SsdCudaStages<T>::final(const SsdBwdParams<T>& p) const {
  ssd_final_cuda(p, ctx);
}

template struct SsdCudaStages<float>;
template struct SsdCudaStages<double>;
template struct SsdCudaStages<c10::Half>;
template struct SsdCudaStages<c10::BFloat16>;

}  // namespace ssmk

#endif
