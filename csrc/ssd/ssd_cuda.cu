// CUDA implementation of ssd_scan: the shared driver (ssd.h) with CUDA stage kernels
// (ssd_fwd_kernel.cuh, ssd_bwd_kernel.cuh) and the tensor-core batched GEMM of
// common/cuda/batched_gemm.h for every matrix product: float16/bfloat16 inputs multiply in their
// own type, float32 inputs in 3xTF32 (float32 accuracy), all accumulating in float32. float64
// (used by gradcheck) goes to cuBLAS. All launches on the current stream, under a device guard.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda/batched_gemm.h"
#include "common/cuda/launch.h"
#include "ssd/ssd.h"
#include "ssd/ssd_bwd_kernel.cuh"
#include "ssd/ssd_fwd_kernel.cuh"

namespace ssmk {
namespace {

namespace k = ssd::cuda_kernels;
using ssmk::cuda::ceil_div;

#define SSMK_DISPATCH_SSD_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Grid for grid-stride elementwise kernels: enough blocks to fill the device, not one per element.
inline unsigned grid_for(int64_t total, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(total, threads), sms * 16)));
}

static_assert(static_cast<int>(ssd::Tri::kNone) == static_cast<int>(ssmk::cuda::Triangle::kNone) &&
                  static_cast<int>(ssd::Tri::kLowerA) == static_cast<int>(ssmk::cuda::Triangle::kLowerA) &&
                  static_cast<int>(ssd::Tri::kUpperA) == static_cast<int>(ssmk::cuda::Triangle::kUpperA) &&
                  static_cast<int>(ssd::Tri::kLowerOut) == static_cast<int>(ssmk::cuda::Triangle::kLowerOut),
              "ssd::Tri and cuda::Triangle must agree");
static_assert(ssd::kGemmRowBlock == ssmk::cuda::BatchedGemmTraits<ssmk::cuda::MmaPrecision::kTf32x3>::kBM &&
                  ssd::kGemmRowBlock == ssmk::cuda::BatchedGemmTraits<ssmk::cuda::MmaPrecision::kHalf>::kBM,
              "the CPU mirrors the GPU GEMM's row blocking");

ssmk::cuda::BatchedGemmParams gemm_params(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                          ssd::Tri tri, bool accumulate) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1) &&
                  out.is_contiguous() && out.size(0) == a.size(0) && out.size(1) == a.size(1) &&
                  out.size(2) == b.size(2),
              "ssd gemm: inconsistent operands ", a.sizes(), " x ", b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "ssd gemm: expected float32 operands");
  ssmk::cuda::BatchedGemmParams p{};
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
  p.tiles_m = ceil_div(p.M, ssd::kGemmRowBlock);
  p.tiles_n = ceil_div(p.N, ssd::kGemmRowBlock);
  p.accumulate = accumulate;
  p.triangle = static_cast<ssmk::cuda::Triangle>(static_cast<int>(tri));
  return p;
}

// The operand precision follows the op's input dtype.
template <typename ALoad = ssmk::cuda::StridedA>
void launch_gemm(const ssmk::cuda::BatchedGemmParams& p, at::ScalarType in_dtype, const ALoad& a_load = {}) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  using ssmk::cuda::MmaPrecision;
  if (in_dtype == at::kHalf) {
    ssmk::cuda::launch_batched_gemm<MmaPrecision::kHalf>(p, sms, stream, a_load);
  } else if (in_dtype == at::kBFloat16) {
    ssmk::cuda::launch_batched_gemm<MmaPrecision::kBFloat16>(p, sms, stream, a_load);
  } else {
    ssmk::cuda::launch_batched_gemm<MmaPrecision::kTf32x3>(p, sms, stream, a_load);
  }
  SSMK_CUDA_CHECK_LAUNCH();
}

// cuBLAS for what the tensor-core kernel does not take: float64 (gradcheck), and a batch matrix
// past its 32-bit in-matrix offsets. 16-bit inputs' operands are rounded as the kernel rounds them.
void cublas_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype,
                 bool accumulate) {
  const bool half = in_dtype == at::kHalf || in_dtype == at::kBFloat16;
  const at::Tensor r = half ? at::bmm(a.to(in_dtype), b.to(in_dtype)).to(out.scalar_type()) : at::bmm(a, b);
  if (accumulate) {
    out.add_(r);
  } else {
    out.copy_(r);
  }
}

// out[i] (=|+=) a[i] @ b[i] for [batch, M, K] x [batch, K, N] accumulation-dtype views of any strides.
void tensor_core_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype,
                      ssd::Tri tri, bool accumulate) {
  if (a.scalar_type() == at::kDouble) {
    cublas_gemm(out, a, b, in_dtype, accumulate);
    return;
  }
  const ssmk::cuda::BatchedGemmParams p = gemm_params(out, a, b, tri, accumulate);
  if (!ssmk::cuda::batched_gemm_fits_int32(p)) {
    cublas_gemm(out, a, b, in_dtype, accumulate);
    return;
  }
  launch_gemm(p, in_dtype);
}

// GL[t, s] of task bi = (b * nc + c) * H + h, computed where the intra-chunk GEMMs read it:
// C_t . B_s of the head's group times the masked decay (the formula of build_gl_kernel). With
// kTransposed the GEMM's A is GL^T: A[m, k] = GL[k, m].
template <bool kTransposed>
struct GlLoad {
  const float* cb;   // [B, nc, G, Q, Q]
  const float* acs;  // [B, nc, H, Q]
  const int32_t* seg;
  int64_t nheads, heads_per_group, ngroups;
  int chunk;

  struct Matrix {
    const float* cb;     // the task's group's C B^T, [Q, Q]
    const float* acs;    // [Q]
    const int32_t* seg;  // [Q] or nullptr
    int chunk;
    __device__ __forceinline__ float operator()(int m, int k) const {
      const int t = kTransposed ? k : m, s = kTransposed ? m : k;
      const float dec = ssd::segment_decay(acs, seg, t, s);
      return dec == 0.0f ? 0.0f : cb[t * chunk + s] * dec;
    }
  };
  __device__ __forceinline__ Matrix matrix(int64_t bi) const {
    const int64_t bc = bi / nheads, h = bi % nheads;
    return {cb + (bc * ngroups + h / heads_per_group) * chunk * chunk, acs + bi * chunk,
            seg ? seg + bc * chunk : nullptr, chunk};
  }
};

struct CudaStages {
  int64_t tasks(const SsdParams& p) const { return p.batch * p.nchunks * p.nheads; }
  int64_t scan_splits(const SsdParams& p) const { return ceil_div(p.headdim * p.dstate, k::kThreads); }

  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype,
                  ssd::Tri tri = ssd::Tri::kNone) const {
    at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
    tensor_core_gemm(out, a, b, in_dtype, tri, false);
    return out;
  }
  void gemm_add(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype) const {
    tensor_core_gemm(out, a, b, in_dtype, ssd::Tri::kNone, true);
  }

  void prep(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_prep_cuda", [&] {
      k::prep_kernel<scalar_t><<<ceil_div(tasks(p), 128), 128, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void build_gl(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_build_gl_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      const int64_t total = tasks(p) * p.chunk * p.chunk;
      k::build_gl_kernel<acc_t><<<grid_for(total, k::kThreads), k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  // out = GL @ rhs (y_intra = GL (dt x)) or, transposed, GL^T @ rhs (d(dt x) = GL^T dY), with
  // GL computed in the GEMM's operand loads (GlLoad): GL never goes through global memory.
  // float64 (and a size past the GEMM's 32-bit in-matrix offsets) builds GL in memory instead.
  template <bool kTransposed>
  at::Tensor intra_product(const SsdParams& p, const at::Tensor& rhs, at::ScalarType dtype) const {
    const int64_t Q = p.chunk, P = p.headdim;
    const at::Tensor r3 = rhs.view({tasks(p), Q, P});
    const ssd::Tri tri = kTransposed ? ssd::Tri::kUpperA : ssd::Tri::kLowerA;
    if (dtype != at::kDouble) {
      at::Tensor out = at::empty({tasks(p), Q, P}, rhs.options());
      // A view of one chunk's CB with the strides the walk should follow (k contiguous for GL,
      // m contiguous for GL^T); the loader reads the actual elements.
      const at::Tensor cb_view = at::from_blob(const_cast<void*>(p.cb), {tasks(p), Q, Q},
                                               {0, kTransposed ? 1 : Q, kTransposed ? Q : 1}, rhs.options());
      const ssmk::cuda::BatchedGemmParams g = gemm_params(out, cb_view, r3, tri, false);
      if (ssmk::cuda::batched_gemm_fits_int32(g)) {
        const GlLoad<kTransposed> load{static_cast<const float*>(p.cb), static_cast<const float*>(p.acs), p.seg,
                                       p.nheads, p.nheads / p.ngroups, p.ngroups, static_cast<int>(Q)};
        launch_gemm(g, dtype, load);
        return out;
      }
    }
    at::Tensor gl = at::empty({tasks(p), Q, Q}, rhs.options());
    SsdParams q = p;
    q.gl = gl.data_ptr();
    build_gl(q, dtype);
    return gemm(kTransposed ? gl.transpose(1, 2) : gl, r3, dtype, tri);
  }
  at::Tensor intra_fwd(const SsdParams& p, const at::Tensor& xdt, at::ScalarType dtype) const {
    return intra_product<false>(p, xdt, dtype);
  }
  at::Tensor intra_bwd(const SsdParams& p, const at::Tensor& dy, at::ScalarType dtype) const {
    return intra_product<true>(p, dy, dtype);
  }
  template <bool kBackward>
  void scan(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(p.batch * p.nheads), static_cast<unsigned>(scan_splits(p)));
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_scan_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      k::scan_kernel<acc_t, kBackward><<<grid, k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void scan_fwd(const SsdParams& p, at::ScalarType dtype) const { scan<false>(p, dtype); }
  void scan_bwd(const SsdParams& p, at::ScalarType dtype) const { scan<true>(p, dtype); }
  void epilogue_fwd(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_epilogue_cuda", [&] {
      const int64_t total = p.batch * p.seqlen * p.nheads * p.headdim;
      k::epilogue_kernel<scalar_t><<<grid_for(total, k::kThreads), k::kThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  void wsum(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_wsum_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      k::wsum_kernel<acc_t><<<static_cast<unsigned>(tasks(p)), k::kBwdThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
  // dGL = dY (dt x)^T in global memory, wsum (dGL * decay, and dacs), then the sum over the heads
  // of each group.
  at::Tensor intra_dcb(const SsdParams& p, const at::Tensor& dy, const at::Tensor& xdt, at::ScalarType dtype) const {
    const int64_t Q = p.chunk, P = p.headdim, Hg = p.nheads / p.ngroups;
    const int64_t groups = p.batch * p.nchunks * p.ngroups;
    at::Tensor dgl = gemm(dy.view({tasks(p), Q, P}), xdt.view({tasks(p), Q, P}).transpose(1, 2), dtype,
                          ssd::Tri::kLowerOut);
    SsdParams q = p;
    q.dgl = dgl.data_ptr();
    wsum(q, dtype);
    return Hg == 1 ? dgl.view({groups, Q, Q}) : dgl.view({groups, Hg, Q, Q}).sum(1);
  }
  void final_bwd(const SsdParams& p, at::ScalarType dtype) const {
    auto stream = at::cuda::getCurrentCUDAStream();
    SSMK_DISPATCH_SSD_TYPES(dtype, "ssd_final_bwd_cuda", [&] {
      k::final_kernel<scalar_t><<<static_cast<unsigned>(tasks(p)), k::kBwdThreads, 0, stream>>>(p);
      SSMK_CUDA_CHECK_LAUNCH();
    });
  }
};

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd_cuda(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    double dt_min, double dt_max, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ssd::fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, CudaStages{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
ssd_scan_bwd_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                  bool dt_softplus, double dt_min, double dt_max,
                  const std::optional<at::Tensor>& initial_states,
                  const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,
                  const std::optional<at::Tensor>& dfinal_states) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ssd::bwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                  initial_states, seq_idx, dout, dfinal_states, CudaStages{});
}

at::Tensor ssd_test_gemm_cuda(const at::Tensor& a, const at::Tensor& b, at::ScalarType in_dtype, int64_t tri,
                           const std::optional<at::Tensor>& acc) {
  const c10::cuda::CUDAGuard guard(a.device());
  return ssd::test_gemm(a, b, in_dtype, tri, acc, CudaStages{});
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_IMPL(ssm_kernels, CUDA, m) {
  m.impl("ssd_scan_fwd", &ssmk::ssd_scan_fwd_cuda);
  m.impl("ssd_scan_bwd", &ssmk::ssd_scan_bwd_cuda);
}

TORCH_LIBRARY_IMPL(ssm_kernels_test, CUDA, m) { m.impl("ssd_gemm", &ssmk::ssd_test_gemm_cuda); }
