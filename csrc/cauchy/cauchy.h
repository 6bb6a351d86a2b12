// cauchy: parameters, argument checks and the host-side driver shared by the CPU and CUDA
// implementations (each device only supplies its kernel launcher).
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <tuple>
#include <vector>

#include "cauchy/cauchy_math.h"
#include "common/checks.h"
#include "common/output.h"

namespace ssmk {

struct CauchyParams {
  int64_t batch, N, L;
  bool symmetric;
  int64_t num_chunks;  // backward: ceil(L / kChunkL)

  const void* v;  // [B, N] complex, any strides (broadcast rows have stride 0)
  int64_t v_batch_stride, v_n_stride;
  const void* w;  // [B, N] complex, any strides
  int64_t w_batch_stride, w_n_stride;
  const void* z;  // [L] complex
  int64_t z_stride;

  void* out;  // [B, L] complex, contiguous

  const void* dout;  // [B, L] complex, any strides
  int64_t dout_batch_stride, dout_l_stride;
  void* dv;  // [B, N] complex, contiguous
  void* dw;  // [B, N] complex, contiguous
  // CUDA backward only: [B, num_chunks, N, 8] double partial sums (see cauchy_math.h).
  double* partials;
};

namespace cauchy {

inline void check_complex(const at::Tensor& t, const char* name) {
  SSMK_CHECK_TYPE(t.is_complex() && (t.scalar_type() == at::kComplexFloat ||
                                     t.scalar_type() == at::kComplexDouble),
                  name, ": expected dtype complex64 or complex128, got ", t.scalar_type());
}

// The checks behind the Python wrapper's messages, repeated so that a direct torch.ops call
// cannot reach a kernel with inconsistent arguments. Returns the broadcast shape [..., N].
inline std::vector<int64_t> check_args(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w) {
  check_complex(v, "v");
  check_complex(w, "w");
  check_complex(z, "z");
  SSMK_CHECK_TYPE(w.scalar_type() == v.scalar_type(), "w: expected the dtype of v (",
                  v.scalar_type(), "), got ", w.scalar_type());
  SSMK_CHECK_TYPE(z.scalar_type() == v.scalar_type(), "z: expected the dtype of v (",
                  v.scalar_type(), "), got ", z.scalar_type());
  SSMK_CHECK_VALUE(v.dim() >= 1, "v: expected at least 1 dim (..., N), got shape ", v.sizes());
  SSMK_CHECK_VALUE(w.dim() >= 1, "w: expected at least 1 dim (..., N), got shape ", w.sizes());
  SSMK_CHECK_VALUE(z.dim() == 1, "z: expected 1 dim (L,), got shape ", z.sizes());
  SSMK_CHECK_VALUE(z.size(0) >= 1, "z: expected L >= 1, got ", z.size(0));
  check_same_device(w, v, "w");
  check_same_device(z, v, "z");
  const auto shape = at::infer_size_dimvector(v.sizes(), w.sizes());  // throws on mismatch
  SSMK_CHECK_VALUE(shape.back() >= 1, "w: expected N >= 1, got shapes v ", v.sizes(), " and w ",
                   w.sizes());
  return std::vector<int64_t>(shape.begin(), shape.end());
}

inline std::vector<int64_t> checked_shape(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w) {
  const auto vs = v.sizes(), ws = w.sizes();
  // A readable message for the common mistake before infer_size's generic one.
  const int64_t nd = std::max<int64_t>(v.dim(), w.dim());
  for (int64_t i = 1; i <= nd; ++i) {
    const int64_t a = i <= v.dim() ? vs[v.dim() - i] : 1;
    const int64_t b = i <= w.dim() ? ws[w.dim() - i] : 1;
    SSMK_CHECK_VALUE(a == b || a == 1 || b == 1, "w: shape ", ws, " does not broadcast against v ",
                     vs);
  }
  return check_args(v, z, w);
}

inline void set_inputs(CauchyParams& p, const at::Tensor& v2, const at::Tensor& z,
                       const at::Tensor& w2, bool symmetric) {
  p = CauchyParams{};
  p.batch = v2.size(0);
  p.N = v2.size(1);
  p.L = z.size(0);
  p.symmetric = symmetric;
  p.num_chunks = (p.L + kChunkL - 1) / kChunkL;
  p.v = v2.data_ptr();
  p.v_batch_stride = v2.stride(0);
  p.v_n_stride = v2.stride(1);
  p.w = w2.data_ptr();
  p.w_batch_stride = w2.stride(0);
  p.w_n_stride = w2.stride(1);
  p.z = z.data_ptr();
  p.z_stride = z.stride(0);
}

// [..., N] broadcast views as [B, N] (a copy only when the broadcast cannot be viewed flat).
inline at::Tensor as_rows(const at::Tensor& t, at::IntArrayRef shape, int64_t B, int64_t N) {
  return t.expand(shape).reshape({B, N});
}

// Forward driver: `launch(params, dtype)` runs the device kernel.
template <typename Launch>
at::Tensor fwd(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w, bool symmetric,
               Launch&& launch) {
  const auto shape = checked_shape(v, z, w);
  const int64_t N = shape.back(), L = z.size(0);
  int64_t B = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) B *= shape[i];
  std::vector<int64_t> out_shape(shape.begin(), shape.end() - 1);
  out_shape.push_back(L);
  at::Tensor out = new_output({B, L}, v.options());
  if (B > 0) {
    const at::Tensor v2 = as_rows(v, shape, B, N), w2 = as_rows(w, shape, B, N);
    CauchyParams p;
    set_inputs(p, v2, z, w2, symmetric);
    p.out = out.data_ptr();
    launch(p, v.scalar_type());
  }
  return out.view(out_shape);
}

// Backward driver: gradients for v and w, reduced over broadcast axes to their shapes.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w,
                                       const at::Tensor& dout, bool symmetric, Launch&& launch) {
  const auto shape = checked_shape(v, z, w);
  const int64_t N = shape.back(), L = z.size(0);
  int64_t B = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) B *= shape[i];
  std::vector<int64_t> out_shape(shape.begin(), shape.end() - 1);
  out_shape.push_back(L);
  SSMK_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape), "dout: expected shape ",
                   at::IntArrayRef(out_shape), ", got ", dout.sizes());
  check_same_device(dout, v, "dout");
  const at::Tensor dout_c = dout.scalar_type() == v.scalar_type() ? dout : dout.to(v.scalar_type());
  at::Tensor dv = new_output({B, N}, v.options());
  at::Tensor dw = new_output({B, N}, v.options());
  if (B > 0) {
    const at::Tensor v2 = as_rows(v, shape, B, N), w2 = as_rows(w, shape, B, N);
    const at::Tensor g2 = dout_c.reshape({B, L});
    CauchyParams p;
    set_inputs(p, v2, z, w2, symmetric);
    p.dout = g2.data_ptr();
    p.dout_batch_stride = g2.stride(0);
    p.dout_l_stride = g2.stride(1);
    p.dv = dv.data_ptr();
    p.dw = dw.data_ptr();
    launch(p, v.scalar_type());
  }
  return {dv.view(shape).sum_to_size(v.sizes()), dw.view(shape).sum_to_size(w.sizes())};
}

}  // namespace cauchy
}  // namespace ssmk
