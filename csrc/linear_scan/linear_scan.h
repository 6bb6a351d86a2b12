// linear_scan: parameters, argument checks and the host-side drivers shared by the CPU and CUDA
// implementations (each device only supplies its kernel launcher).
//
// The leading shape (...) of a, b [..., L] is flattened to R rows; a row's elements need not be
// contiguous (any row and time strides), the outputs are allocated contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/output.h"
#include "linear_scan/linear_scan_math.h"

namespace ssmk {

struct LinearScanParams {
  int64_t rows, seqlen;
  bool reverse;  // direction of the forward recurrence (h_t from h_{t+1})

  const void* a;  // [R, L], input dtype
  int64_t a_row_stride, a_t_stride;
  const void* b;  // [R, L], input dtype (forward only)
  int64_t b_row_stride, b_t_stride;
  const void* initial_state;  // [R], accumulation dtype, or nullptr (zeros)
  int64_t init_stride;

  void* h;           // [R, L] contiguous, input dtype (forward output)
  void* last_state;  // [R] contiguous, accumulation dtype (forward output)

  const void* h_saved;  // [R, L], input dtype: the forward's output (backward input)
  int64_t hs_row_stride, hs_t_stride;
  const void* dh;  // [R, L], input dtype: gradient of h
  int64_t dh_row_stride, dh_t_stride;
  const void* dlast_state;  // [R], accumulation dtype, or nullptr
  int64_t dlast_stride;
  void* da;               // [R, L] contiguous, input dtype
  void* db;               // [R, L] contiguous, input dtype
  void* dinitial_state;   // [R] contiguous, accumulation dtype
};

namespace linear_scan {

inline bool supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble ||
         s == at::kComplexFloat || s == at::kComplexDouble;
}

inline at::ScalarType acc_dtype(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
      return at::kDouble;
    case at::kComplexFloat:
      return at::kComplexFloat;
    case at::kComplexDouble:
      return at::kComplexDouble;
    default:
      return at::kFloat;
  }
}

inline std::vector<int64_t> leading_shape(const at::Tensor& a) {
  return std::vector<int64_t>(a.sizes().begin(), a.sizes().end() - 1);
}

// The checks behind the Python wrapper's messages, repeated here so that a direct torch.ops call
// cannot reach a kernel with inconsistent arguments.
inline void check_args(const at::Tensor& a, const at::Tensor& b,
                       const std::optional<at::Tensor>& initial_state, const char* b_name = "b") {
  SSMK_CHECK_VALUE(a.dim() >= 1, "a: expected at least 1 dim (..., seqlen), got shape ", a.sizes());
  SSMK_CHECK_TYPE(supported_dtype(a.scalar_type()), "a: expected dtype float32, float16, bfloat16, "
                  "float64, complex64 or complex128, got ", a.scalar_type());
  check_dtype(b, a.scalar_type(), b_name);
  check_shape(b, a.sizes(), b_name);
  check_same_device(b, a, b_name);
  SSMK_CHECK_VALUE(a.size(-1) >= 1, "a: expected seqlen >= 1, got ", a.size(-1));
  if (initial_state) {
    check_shape(*initial_state, leading_shape(a), "initial_state");
    check_dtype(*initial_state, acc_dtype(a.scalar_type()), "initial_state");
    check_same_device(*initial_state, a, "initial_state");
  }
}

inline at::Tensor rows_view(const at::Tensor& t, int64_t R, int64_t L) { return t.reshape({R, L}); }

// Forward driver: checks, allocation, parameters; `launch(params, dtype)` runs the device kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& a, const at::Tensor& b,
                                       const std::optional<at::Tensor>& initial_state, bool reverse,
                                       Launch&& launch) {
  check_args(a, b, initial_state);
  const int64_t L = a.size(-1);
  const int64_t R = a.numel() / L;
  const auto lead = leading_shape(a);
  at::Tensor h = new_output(a.sizes(), a.options());
  at::Tensor last = new_output(lead, a.options().dtype(acc_dtype(a.scalar_type())));
  if (R == 0) return {h, last};
  const at::Tensor a2 = rows_view(a, R, L), b2 = rows_view(b, R, L);
  LinearScanParams p{};
  p.rows = R;
  p.seqlen = L;
  p.reverse = reverse;
  p.a = a2.data_ptr();
  p.a_row_stride = a2.stride(0);
  p.a_t_stride = a2.stride(1);
  p.b = b2.data_ptr();
  p.b_row_stride = b2.stride(0);
  p.b_t_stride = b2.stride(1);
  at::Tensor init;
  if (initial_state) {
    init = initial_state->reshape({R});
    p.initial_state = init.data_ptr();
    p.init_stride = init.stride(0);
  }
  p.h = h.data_ptr();
  p.last_state = last.data_ptr();
  launch(p, a.scalar_type());
  return {h, last};
}

// Backward driver. `h` is the forward's output; `dh` and `dlast_state` the incoming gradients.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& a, const at::Tensor& h,
                                                   const std::optional<at::Tensor>& initial_state,
                                                   const at::Tensor& dh,
                                                   const std::optional<at::Tensor>& dlast_state,
                                                   bool reverse, Launch&& launch) {
  check_args(a, h, initial_state, "h");
  check_shape(dh, a.sizes(), "dh");
  check_same_device(dh, a, "dh");
  const auto dtype = a.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto lead = leading_shape(a);
  // Gradients arrive in whatever dtype autograd produced; the kernels read them in a's dtype
  // (dh) and the accumulation dtype (dlast_state).
  const at::Tensor dh_in = dh.scalar_type() == dtype ? dh : dh.to(dtype);
  at::Tensor dlast_in;
  if (dlast_state) {
    check_shape(*dlast_state, lead, "dlast_state");
    check_same_device(*dlast_state, a, "dlast_state");
    dlast_in = dlast_state->scalar_type() == acc ? *dlast_state : dlast_state->to(acc);
  }
  const int64_t L = a.size(-1);
  const int64_t R = a.numel() / L;
  at::Tensor da = new_output(a.sizes(), a.options());
  at::Tensor db = new_output(a.sizes(), a.options());
  at::Tensor dinit = new_output(lead, a.options().dtype(acc));
  if (R == 0) return {da, db, dinit};
  const at::Tensor a2 = rows_view(a, R, L), h2 = rows_view(h, R, L), dh2 = rows_view(dh_in, R, L);
  LinearScanParams p{};
  p.rows = R;
  p.seqlen = L;
  p.reverse = reverse;
  p.a = a2.data_ptr();
  p.a_row_stride = a2.stride(0);
  p.a_t_stride = a2.stride(1);
  at::Tensor init, dlast;
  if (initial_state) {
    init = initial_state->reshape({R});
    p.initial_state = init.data_ptr();
    p.init_stride = init.stride(0);
  }
  p.h_saved = h2.data_ptr();
  p.hs_row_stride = h2.stride(0);
  p.hs_t_stride = h2.stride(1);
  p.dh = dh2.data_ptr();
  p.dh_row_stride = dh2.stride(0);
  p.dh_t_stride = dh2.stride(1);
  if (dlast_in.defined()) {
    dlast = dlast_in.reshape({R});
    p.dlast_state = dlast.data_ptr();
    p.dlast_stride = dlast.stride(0);
  }
  p.da = da.data_ptr();
  p.db = db.data_ptr();
  p.dinitial_state = dinit.data_ptr();
  launch(p, dtype);
  return {da, db, dinit};
}

}  // namespace linear_scan
}  // namespace ssmk
