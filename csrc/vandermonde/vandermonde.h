// log_vandermonde / log_vandermonde_transpose: parameters, argument checks and the host-side
// driver shared by the CPU and CUDA implementations (each device supplies two launchers: the
// forward product y = sum_n c_n exp(x_n l) and the transposed product T_n = sum_l u_l exp(x_n l)
// with its l-weighted twin T1_n; every op and gradient is one of these two plus O(B N) algebra).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/output.h"
#include "vandermonde/vandermonde_math.h"

namespace ssmk {

struct VandermondeParams {
  int64_t batch, N, L;
  int64_t num_tiles;  // ceil(L / kTileL)
  bool symmetric;     // forward: write the real 2 Re(y) instead of y
  bool with_t1;       // transpose: also T1

  const void* c;  // forward weights [B, N] complex, any strides
  int64_t c_batch_stride, c_n_stride;
  const void* x;  // nodes [B, N] complex, any strides
  int64_t x_batch_stride, x_n_stride;
  void* out;  // forward: [B, L] real (symmetric) or complex, contiguous

  const void* u;  // transpose: [B, L] complex, any strides
  int64_t u_batch_stride, u_l_stride;
  void* t;   // transpose: [B, N] complex, contiguous
  void* t1;  // transpose: [B, N] complex, contiguous (with_t1)
  // CUDA transpose only: [B, num_tiles, N, 4] double partial sums (T re/im, T1 re/im).
  double* partials;
};

namespace vandermonde {

inline void check_complex(const at::Tensor& t, const char* name) {
  SSMK_CHECK_TYPE(t.scalar_type() == at::kComplexFloat || t.scalar_type() == at::kComplexDouble,
                  name, ": expected dtype complex64 or complex128, got ", t.scalar_type());
}

// Broadcast shape of the leading axes of every tensor in `ts` plus the broadcast N of v and x.
inline std::vector<int64_t> broadcast_batch(const std::vector<const at::Tensor*>& ts,
                                            const std::vector<const char*>& names) {
  int64_t nd = 0;
  for (auto* t : ts) nd = std::max<int64_t>(nd, t->dim() - 1);
  std::vector<int64_t> shape(nd, 1);
  for (size_t j = 0; j < ts.size(); ++j) {
    const at::Tensor& t = *ts[j];
    for (int64_t i = 0; i < t.dim() - 1; ++i) {
      const int64_t s = t.size(i), pos = nd - (t.dim() - 1) + i;
      SSMK_CHECK_VALUE(s == shape[pos] || s == 1 || shape[pos] == 1, names[j], ": shape ",
                       t.sizes(), " does not broadcast against the other arguments");
      if (s != 1) shape[pos] = s;
    }
  }
  return shape;
}

inline int64_t broadcast_n(const at::Tensor& v, const at::Tensor& x) {
  const int64_t a = v.size(-1), b = x.size(-1);
  SSMK_CHECK_VALUE(a == b || a == 1 || b == 1, "x: expected N broadcastable against v's ", a,
                   ", got ", b);
  const int64_t N = a == 1 ? b : a;
  SSMK_CHECK_VALUE(N >= 1, "x: expected N >= 1, got ", N);
  return N;
}

inline void check_vx(const at::Tensor& v, const at::Tensor& x, int64_t L) {
  check_complex(v, "v");
  check_complex(x, "x");
  SSMK_CHECK_TYPE(x.scalar_type() == v.scalar_type(), "x: expected the dtype of v (",
                  v.scalar_type(), "), got ", x.scalar_type());
  SSMK_CHECK_VALUE(v.dim() >= 1, "v: expected at least 1 dim (..., N), got shape ", v.sizes());
  SSMK_CHECK_VALUE(x.dim() >= 1, "x: expected at least 1 dim (..., N), got shape ", x.sizes());
  check_same_device(x, v, "x");
  SSMK_CHECK_VALUE(L >= 1, "L: expected L >= 1, got ", L);
}

inline at::ScalarType real_of(at::ScalarType complex) {
  return complex == at::kComplexDouble ? at::kDouble : at::kFloat;
}

inline int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

inline std::vector<int64_t> with_last(std::vector<int64_t> batch, int64_t last) {
  batch.push_back(last);
  return batch;
}

inline at::Tensor rows(const at::Tensor& t, const std::vector<int64_t>& batch, int64_t last) {
  const auto full = with_last(batch, last);
  return t.expand(full).reshape({numel_of(batch), last});
}

inline void set_nodes(VandermondeParams& p, const at::Tensor& x2, int64_t L) {
  p = VandermondeParams{};
  p.batch = x2.size(0);
  p.N = x2.size(1);
  p.L = L;
  p.num_tiles = (L + kTileL - 1) / kTileL;
  p.x = x2.data_ptr();
  p.x_batch_stride = x2.stride(0);
  p.x_n_stride = x2.stride(1);
}

// y[b, l] = sum_n c[b, n] exp(x[b, n] l): [B, L], real 2 Re(y) if symmetric.
template <typename LaunchFwd>
at::Tensor forward_rows(const at::Tensor& c2, const at::Tensor& x2, int64_t L, bool symmetric,
                        LaunchFwd&& launch) {
  const auto dtype = x2.scalar_type();
  at::Tensor out = new_output({x2.size(0), L}, x2.options().dtype(symmetric ? real_of(dtype) : dtype));
  if (x2.size(0) == 0) return out;
  VandermondeParams p;
  set_nodes(p, x2, L);
  p.symmetric = symmetric;
  p.c = c2.data_ptr();
  p.c_batch_stride = c2.stride(0);
  p.c_n_stride = c2.stride(1);
  p.out = out.data_ptr();
  launch(p, dtype);
  return out;
}

// T[b, n] = sum_l u[b, l] exp(x[b, n] l) and T1[b, n] = sum_l l u[b, l] exp(x[b, n] l).
template <typename LaunchT>
std::tuple<at::Tensor, at::Tensor> transpose_rows(const at::Tensor& u2, const at::Tensor& x2,
                                                  bool with_t1, LaunchT&& launch) {
  const int64_t B = x2.size(0), N = x2.size(1);
  at::Tensor t = new_output({B, N}, x2.options());
  at::Tensor t1 = with_t1 ? new_output({B, N}, x2.options()) : at::Tensor();
  if (B == 0) return {t, t1};
  VandermondeParams p;
  set_nodes(p, x2, u2.size(1));
  p.with_t1 = with_t1;
  p.u = u2.data_ptr();
  p.u_batch_stride = u2.stride(0);
  p.u_l_stride = u2.stride(1);
  p.t = t.data_ptr();
  p.t1 = with_t1 ? t1.data_ptr() : nullptr;
  launch(p, x2.scalar_type());
  return {t, t1};
}

template <typename LaunchFwd>
at::Tensor log_vandermonde_fwd(const at::Tensor& v, const at::Tensor& x, int64_t L, bool symmetric,
                               LaunchFwd&& launch) {
  check_vx(v, x, L);
  const auto batch = broadcast_batch({&v, &x}, {"v", "x"});
  const int64_t N = broadcast_n(v, x);
  const at::Tensor out = forward_rows(rows(v, batch, N), rows(x, batch, N), L, symmetric, launch);
  return out.view(with_last(batch, L));
}

template <typename LaunchT>
std::tuple<at::Tensor, at::Tensor> log_vandermonde_bwd(const at::Tensor& v, const at::Tensor& x,
                                                       int64_t L, const at::Tensor& dout,
                                                       bool symmetric, LaunchT&& launch) {
  check_vx(v, x, L);
  const auto batch = broadcast_batch({&v, &x}, {"v", "x"});
  const int64_t N = broadcast_n(v, x);
  const auto out_shape = with_last(batch, L);
  SSMK_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape), "dout: expected shape ",
                   at::IntArrayRef(out_shape), ", got ", dout.sizes());
  check_same_device(dout, v, "dout");
  // d/dv of sum_l g_l y_l: conj(sum_l conj(g_l) exp(x l)); symmetric: y = 2 Re(.), g real.
  const at::Tensor u = symmetric ? dout.to(v.scalar_type()) : at::conj_physical(dout.to(v.scalar_type()));
  const at::Tensor v2 = rows(v, batch, N), x2 = rows(x, batch, N);
  auto [t, t1] = transpose_rows(u.reshape({numel_of(batch), L}), x2, true, launch);
  const double f = symmetric ? 2.0 : 1.0;
  at::Tensor dv = at::conj_physical(t).mul_(f);
  at::Tensor dx = at::conj_physical(t1.mul_(v2)).mul_(f);
  const auto shape = with_last(batch, N);
  return {dv.view(shape).sum_to_size(v.sizes()), dx.view(shape).sum_to_size(x.sizes())};
}

inline void check_u(const at::Tensor& u, const at::Tensor& v, int64_t L) {
  const auto want_real = real_of(v.scalar_type());
  SSMK_CHECK_TYPE(u.scalar_type() == v.scalar_type() || u.scalar_type() == want_real,
                  "u: expected dtype ", v.scalar_type(), " or ", want_real, " (the precision of v), got ",
                  u.scalar_type());
  SSMK_CHECK_VALUE(u.dim() >= 1 && u.size(-1) == L, "u: expected shape (..., L=", L, "), got ",
                   u.sizes());
  check_same_device(u, v, "u");
}

template <typename LaunchT>
at::Tensor log_vandermonde_transpose_fwd(const at::Tensor& u, const at::Tensor& v, const at::Tensor& x,
                                         int64_t L, LaunchT&& launch) {
  check_vx(v, x, L);
  check_u(u, v, L);
  const auto batch = broadcast_batch({&u, &v, &x}, {"u", "v", "x"});
  const int64_t N = broadcast_n(v, x);
  const at::Tensor u2 = rows(u.to(v.scalar_type()), batch, L);
  auto [t, t1] = transpose_rows(u2, rows(x, batch, N), false, launch);
  return t.mul_(rows(v, batch, N)).view(with_last(batch, N));
}

template <typename LaunchFwd, typename LaunchT>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_vandermonde_transpose_bwd(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& x, int64_t L, const at::Tensor& dout,
    LaunchFwd&& launch_fwd, LaunchT&& launch_t) {
  check_vx(v, x, L);
  check_u(u, v, L);
  const auto batch = broadcast_batch({&u, &v, &x}, {"u", "v", "x"});
  const int64_t N = broadcast_n(v, x);
  const auto shape = with_last(batch, N);
  SSMK_CHECK_VALUE(dout.sizes() == at::IntArrayRef(shape), "dout: expected shape ",
                   at::IntArrayRef(shape), ", got ", dout.sizes());
  check_same_device(dout, v, "dout");
  const int64_t B = numel_of(batch);
  const at::Tensor g2 = dout.to(v.scalar_type()).reshape({B, N});
  const at::Tensor v2 = rows(v, batch, N), x2 = rows(x, batch, N);
  // du_l = conj(sum_n conj(g_n) v_n exp(x_n l)) = sum_n g_n conj(v_n) exp(conj(x_n) l)
  const at::Tensor c = g2 * at::conj_physical(v2);
  at::Tensor du = forward_rows(c, at::conj_physical(x2), L, false, launch_fwd);
  if (!u.is_complex()) du = at::real(du);
  du = du.reshape(with_last(batch, L)).sum_to_size(u.sizes());
  const at::Tensor u2 = rows(u.to(v.scalar_type()), batch, L);
  auto [t, t1] = transpose_rows(u2, x2, true, launch_t);
  // dv_n = g_n conj(T_n), dx_n = g_n conj(v_n T1_n)
  at::Tensor dv = at::conj_physical(t).mul_(g2);
  at::Tensor dx = at::conj_physical(t1.mul_(v2)).mul_(g2);
  return {du.contiguous(), dv.view(shape).sum_to_size(v.sizes()), dx.view(shape).sum_to_size(x.sizes())};
}

}  // namespace vandermonde
}  // namespace ssmk
