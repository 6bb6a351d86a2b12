// Test hook ssm_kernels_test::ssd_gemm: the batched GEMM of a device's ssd_scan stages on its own,
// out = a @ b (or acc + a @ b) for [batch, M, K] x [batch, K, N] views of any strides in the
// accumulation dtype of in_dtype; in_dtype picks the tensor-core operand precision on CUDA; tri
// is a cuda::Triangle zero structure (0..3). And ssm_kernels_test::ssd_emulate_cuda_rounding:
// the CPU stages round GEMM operands where the CUDA stages do (returns the previous setting).
#include "common/dispatch.h"
#include "common/op_library.h"
#include "ssd/ssd_host.h"

namespace ssmk {
namespace {

#define SSD_GEMM_ARGS(X) X(Tensor, a) X(Tensor, b) X(Dtype, in_dtype) X(Int, tri) X(OptTensor, acc)
SSMK_OP_ARGS(SsdGemmArgs, SSD_GEMM_ARGS)

void check_args(const SsdGemmArgs& in) {
  const at::Tensor &a = in.a, &b = in.b;
  SSMK_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
                   "a, b: expected [batch, M, K] and [batch, K, N], got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1 && a.size(2) >= 1 && b.size(2) >= 1,
                   "a, b: expected non-empty matrices, got ", a.sizes(), " and ", b.sizes());
  SSMK_CHECK_TYPE((a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) && b.scalar_type() == a.scalar_type(),
                  "a, b: expected both float32 or both float64, got ", a.scalar_type(), " and ", b.scalar_type());
  const auto t = in.in_dtype;
  SSMK_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                  "in_dtype: expected float32, float16, bfloat16 or float64, got ", t);
  SSMK_CHECK_TYPE(a.scalar_type() == acc_dtype(in.in_dtype), "a, b: expected the accumulation dtype of in_dtype ",
                  in.in_dtype, ", got ", a.scalar_type());
  check_same_device(b, a, "b");
  SSMK_CHECK_VALUE(in.tri >= 0 && in.tri <= 3, "tri: expected 0..3, got ", in.tri);
  if (in.acc) {
    SSMK_CHECK_VALUE(in.tri == 0, "tri: accumulation supports tri = 0 only, got ", in.tri);
    check_shape(*in.acc, {a.size(0), a.size(1), b.size(2)}, "acc");
    check_dtype(*in.acc, a.scalar_type(), "acc");
    check_same_device(*in.acc, a, "acc");
  }
}

template <typename Stages>
at::Tensor run(const SsdGemmArgs& in, const Stages& st) {
  if (in.acc) {
    at::Tensor out = in.acc->contiguous().clone();
    st.gemm_add(out, in.a, in.b);
    return out;
  }
  return st.gemm(in.a, in.b, static_cast<cuda::Triangle>(in.tri));
}

bool set_emulate_cuda_rounding(bool enable) { return ssd_emulate_cuda_rounding().exchange(enable); }

at::Tensor ssd_gemm(const SsdGemmArgs& in) {
  check_args(in);
  at::Tensor out;
  SSMK_DISPATCH_FLOAT(in.in_dtype, "ssd_gemm", [&] {
    using T = scalar_t;
    launch(in.a, [&] { out = run(in, SsdCpuStages<T>{}); } SSMK_CUDA([&](const CudaContext& ctx) {
             out = run(in, SsdCudaStages<T>{ctx});
           }));
  });
  return out;
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  ssmk::op::define<ssmk::SsdGemmArgs>(m, "ssd_gemm", "Tensor");
  m.def("ssd_emulate_cuda_rounding(bool enable) -> bool", &ssmk::set_emulate_cuda_rounding);
}

TORCH_LIBRARY_IMPL(ssm_kernels_test, CPU, m) {
  m.impl("ssd_gemm", ssmk::op::kernel<ssmk::SsdGemmArgs, &ssmk::ssd_gemm>());
}

#ifdef SSMK_WITH_CUDA
TORCH_LIBRARY_IMPL(ssm_kernels_test, CUDA, m) {
  m.impl("ssd_gemm", ssmk::op::kernel<ssmk::SsdGemmArgs, &ssmk::ssd_gemm>());
}
#endif
