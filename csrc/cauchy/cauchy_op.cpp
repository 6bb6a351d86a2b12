// cauchy ops: the argument lists, checks, allocation and params fill shared by both devices.
#include <ATen/ExpandUtils.h>

#include "cauchy/cauchy.h"
#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"

namespace ssmk {
namespace {

#define CAUCHY_FWD_ARGS(X) X(Tensor, v) X(Tensor, z) X(Tensor, w) X(Bool, symmetric)
#define CAUCHY_BWD_ARGS(X) X(Tensor, v) X(Tensor, z) X(Tensor, w) X(Tensor, dout) X(Bool, symmetric)
SSMK_OP_ARGS(CauchyFwdArgs, CAUCHY_FWD_ARGS)
SSMK_OP_ARGS(CauchyBwdArgs, CAUCHY_BWD_ARGS)

void check_complex(const at::Tensor& t, const char* name) {
  SSMK_CHECK_TYPE(t.scalar_type() == at::kComplexFloat || t.scalar_type() == at::kComplexDouble, name,
                  ": expected dtype complex64 or complex128, got ", t.scalar_type());
}

// The broadcast shape [..., N] of v and w.
std::vector<int64_t> check_inputs(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w) {
  check_complex(v, "v");
  check_complex(w, "w");
  check_complex(z, "z");
  SSMK_CHECK_TYPE(w.scalar_type() == v.scalar_type(), "w: expected the dtype of v (", v.scalar_type(),
                  "), got ", w.scalar_type());
  SSMK_CHECK_TYPE(z.scalar_type() == v.scalar_type(), "z: expected the dtype of v (", v.scalar_type(),
                  "), got ", z.scalar_type());
  SSMK_CHECK_VALUE(v.dim() >= 1, "v: expected at least 1 dim (..., N), got shape ", v.sizes());
  SSMK_CHECK_VALUE(w.dim() >= 1, "w: expected at least 1 dim (..., N), got shape ", w.sizes());
  SSMK_CHECK_VALUE(z.dim() == 1, "z: expected 1 dim (L,), got shape ", z.sizes());
  SSMK_CHECK_VALUE(z.size(0) >= 1, "z: expected L >= 1, got ", z.size(0));
  check_same_device(w, v, "w");
  check_same_device(z, v, "z");
  const auto vs = v.sizes(), ws = w.sizes();
  const int64_t nd = std::max<int64_t>(v.dim(), w.dim());
  for (int64_t i = 1; i <= nd; ++i) {
    const int64_t a = i <= v.dim() ? vs[v.dim() - i] : 1;
    const int64_t b = i <= w.dim() ? ws[w.dim() - i] : 1;
    SSMK_CHECK_VALUE(a == b || a == 1 || b == 1, "w: shape ", ws, " does not broadcast against v ", vs);
  }
  const auto shape = at::infer_size_dimvector(vs, ws);
  SSMK_CHECK_VALUE(shape.back() >= 1, "w: expected N >= 1, got shapes v ", vs, " and w ", ws);
  return std::vector<int64_t>(shape.begin(), shape.end());
}

// The rows B and the output shape [..., L] of a broadcast shape [..., N].
struct Rows {
  int64_t B = 1, N, L;
  std::vector<int64_t> out_shape;
  Rows(const std::vector<int64_t>& shape, int64_t L_) : N(shape.back()), L(L_) {
    for (size_t i = 0; i + 1 < shape.size(); ++i) B *= shape[i];
    out_shape.assign(shape.begin(), shape.end() - 1);
    out_shape.push_back(L);
  }
};

// [..., N] broadcast views as [B, N] (a copy only when the broadcast cannot be viewed flat).
at::Tensor as_rows(const at::Tensor& t, const std::vector<int64_t>& shape, const Rows& r) {
  return t.expand(shape).reshape({r.B, r.N});
}

template <typename T>
void fill_common(CauchyCommon<T>& p, const at::Tensor& v2, const at::Tensor& z, const at::Tensor& w2,
                 const Rows& r, bool symmetric) {
  using C = c10::complex<T>;
  p.batch = r.B;
  p.N = r.N;
  p.L = r.L;
  p.symmetric = symmetric;
  p.v = view<const C, 2>(v2);
  p.w = view<const C, 2>(w2);
  p.z = view<const C, 1>(z);
}

at::Tensor cauchy_fwd(const CauchyFwdArgs& in) {
  const auto shape = check_inputs(in.v, in.z, in.w);
  const Rows r(shape, in.z.size(0));
  at::Tensor out = new_output({r.B, r.L}, in.v.options());
  if (r.B == 0) return out.view(r.out_shape);
  const at::Tensor v2 = as_rows(in.v, shape, r), w2 = as_rows(in.w, shape, r);
  SSMK_DISPATCH_COMPLEX(in.v.scalar_type(), "cauchy_fwd", [&] {
    using T = typename scalar_t::value_type;
    CauchyFwdParams<T> p{};
    fill_common(p, v2, in.z, w2, r, in.symmetric);
    p.out = ptr<c10::complex<T>>(out);
    launch(in.v, [&] { cauchy_fwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             check_cuda_grid((r.L + cauchy::kTileL - 1) / cauchy::kTileL * r.B, "v");
             cauchy_fwd_cuda(p, ctx);
           }));
  });
  return out.view(r.out_shape);
}

std::tuple<at::Tensor, at::Tensor> cauchy_bwd(const CauchyBwdArgs& in) {
  const auto shape = check_inputs(in.v, in.z, in.w);
  const Rows r(shape, in.z.size(0));
  check_shape(in.dout, r.out_shape, "dout");
  check_same_device(in.dout, in.v, "dout");
  const at::Tensor dout = in.dout.to(in.v.scalar_type()).reshape({r.B, r.L});
  at::Tensor dv = new_output({r.B, r.N}, in.v.options());
  at::Tensor dw = new_output({r.B, r.N}, in.v.options());
  if (r.B > 0) {
    const at::Tensor v2 = as_rows(in.v, shape, r), w2 = as_rows(in.w, shape, r);
    SSMK_DISPATCH_COMPLEX(in.v.scalar_type(), "cauchy_bwd", [&] {
      using T = typename scalar_t::value_type;
      CauchyBwdParams<T> p{};
      fill_common(p, v2, in.z, w2, r, in.symmetric);
      p.num_chunks = (r.L + cauchy::kChunkL - 1) / cauchy::kChunkL;
      p.dout = view<const c10::complex<T>, 2>(dout);
      p.dv = ptr<c10::complex<T>>(dv);
      p.dw = ptr<c10::complex<T>>(dw);
      launch(in.v, [&] { cauchy_bwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
               const int64_t groups = (r.N + cauchy::kCudaThreads - 1) / cauchy::kCudaThreads;
               check_cuda_grid(p.num_chunks * groups * r.B, "v");
               const at::Tensor partials =
                   at::empty({r.B, p.num_chunks, r.N, 8}, in.v.options().dtype(at::kDouble));
               cauchy_bwd_cuda(p, ptr<double>(partials), ctx);
             }));
    });
  }
  // Gradients of broadcast inputs are summed back to their shapes.
  return {dv.view(shape).sum_to_size(in.v.sizes()), dw.view(shape).sum_to_size(in.w.sizes())};
}

}  // namespace
}  // namespace ssmk

SSMK_OP(cauchy_fwd, CauchyFwdArgs, "Tensor out")
SSMK_OP(cauchy_bwd, CauchyBwdArgs, "(Tensor dv, Tensor dw)")
