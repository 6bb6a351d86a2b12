// log_vandermonde / log_vandermonde_transpose ops: argument lists, checks, and the O(B N)
// algebra that builds every op and gradient from the two device products of vandermonde.h.
#include "common/dispatch.h"
#include "common/op.h"
#include "common/output.h"
#include "vandermonde/vandermonde.h"

namespace ssmk {
namespace {

#define LOG_VANDERMONDE_FWD_ARGS(X) X(Tensor, v) X(Tensor, x) X(Int, L) X(Bool, symmetric)
#define LOG_VANDERMONDE_BWD_ARGS(X) X(Tensor, v) X(Tensor, x) X(Int, L) X(Tensor, dout) X(Bool, symmetric)
#define LOG_VANDERMONDE_TRANSPOSE_FWD_ARGS(X) X(Tensor, u) X(Tensor, v) X(Tensor, x) X(Int, L)
#define LOG_VANDERMONDE_TRANSPOSE_BWD_ARGS(X) X(Tensor, u) X(Tensor, v) X(Tensor, x) X(Int, L) X(Tensor, dout)
SSMK_OP_ARGS(LogVandermondeFwdArgs, LOG_VANDERMONDE_FWD_ARGS)
SSMK_OP_ARGS(LogVandermondeBwdArgs, LOG_VANDERMONDE_BWD_ARGS)
SSMK_OP_ARGS(LogVandermondeTransposeFwdArgs, LOG_VANDERMONDE_TRANSPOSE_FWD_ARGS)
SSMK_OP_ARGS(LogVandermondeTransposeBwdArgs, LOG_VANDERMONDE_TRANSPOSE_BWD_ARGS)

void check_complex(const at::Tensor& t, const char* name) {
  SSMK_CHECK_TYPE(t.scalar_type() == at::kComplexFloat || t.scalar_type() == at::kComplexDouble, name,
                  ": expected dtype complex64 or complex128, got ", t.scalar_type());
}

// Broadcast shape of the leading axes of every tensor in `ts`.
std::vector<int64_t> broadcast_batch(const std::vector<const at::Tensor*>& ts,
                                     const std::vector<const char*>& names) {
  int64_t nd = 0;
  for (auto* t : ts) nd = std::max<int64_t>(nd, t->dim() - 1);
  std::vector<int64_t> shape(nd, 1);
  for (size_t j = 0; j < ts.size(); ++j) {
    const at::Tensor& t = *ts[j];
    for (int64_t i = 0; i < t.dim() - 1; ++i) {
      const int64_t s = t.size(i), pos = nd - (t.dim() - 1) + i;
      SSMK_CHECK_VALUE(s == shape[pos] || s == 1 || shape[pos] == 1, names[j], ": shape ", t.sizes(),
                       " does not broadcast against the other arguments");
      if (s != 1) shape[pos] = s;
    }
  }
  return shape;
}

// The broadcast N of v and x.
int64_t broadcast_n(const at::Tensor& v, const at::Tensor& x) {
  const int64_t a = v.size(-1), b = x.size(-1);
  SSMK_CHECK_VALUE(a == b || a == 1 || b == 1, "x: expected N broadcastable against v's ", a, ", got ", b);
  const int64_t N = a == 1 ? b : a;
  SSMK_CHECK_VALUE(N >= 1, "x: expected N >= 1, got ", N);
  return N;
}

void check_vx(const at::Tensor& v, const at::Tensor& x, int64_t L) {
  check_complex(v, "v");
  check_complex(x, "x");
  SSMK_CHECK_TYPE(x.scalar_type() == v.scalar_type(), "x: expected the dtype of v (", v.scalar_type(),
                  "), got ", x.scalar_type());
  SSMK_CHECK_VALUE(v.dim() >= 1, "v: expected at least 1 dim (..., N), got shape ", v.sizes());
  SSMK_CHECK_VALUE(x.dim() >= 1, "x: expected at least 1 dim (..., N), got shape ", x.sizes());
  check_same_device(x, v, "x");
  SSMK_CHECK_VALUE(L >= 1, "L: expected L >= 1, got ", L);
}

void check_u(const at::Tensor& u, const at::Tensor& v, int64_t L) {
  const auto want_real = at::toRealValueType(v.scalar_type());
  SSMK_CHECK_TYPE(u.scalar_type() == v.scalar_type() || u.scalar_type() == want_real, "u: expected dtype ",
                  v.scalar_type(), " or ", want_real, " (the precision of v), got ", u.scalar_type());
  SSMK_CHECK_VALUE(u.dim() >= 1 && u.size(-1) == L, "u: expected shape (..., L=", L, "), got ", u.sizes());
  check_same_device(u, v, "u");
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

std::vector<int64_t> with_last(std::vector<int64_t> batch, int64_t last) {
  batch.push_back(last);
  return batch;
}

at::Tensor rows(const at::Tensor& t, const std::vector<int64_t>& batch, int64_t last) {
  return t.expand(with_last(batch, last)).reshape({numel_of(batch), last});
}

template <typename T>
void fill_nodes(VandermondeNodes<T>& p, const at::Tensor& x2, int64_t L) {
  p.batch = x2.size(0);
  p.N = x2.size(1);
  p.L = L;
  p.num_tiles = (L + vandermonde::kTileL - 1) / vandermonde::kTileL;
  p.x = view<const c10::complex<T>, 2>(x2);
}

// y[b, l] = sum_n c[b, n] exp(x[b, n] l): [B, L], the real 2 Re(y) if symmetric.
at::Tensor forward_rows(const at::Tensor& c2, const at::Tensor& x2, int64_t L, bool symmetric) {
  const auto dtype = x2.scalar_type();
  at::Tensor out = new_output({x2.size(0), L}, x2.options().dtype(symmetric ? at::toRealValueType(dtype) : dtype));
  if (x2.size(0) == 0) return out;
  SSMK_DISPATCH_COMPLEX(dtype, "log_vandermonde", [&] {
    using T = typename scalar_t::value_type;
    VandermondeFwdParams<T> p{};
    fill_nodes(p, x2, L);
    p.symmetric = symmetric;
    p.c = view<const scalar_t, 2>(c2);
    if (symmetric) {
      p.out_real = ptr<T>(out);
    } else {
      p.out = ptr<scalar_t>(out);
    }
    launch(x2, [&] { vandermonde_fwd_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             check_cuda_grid(p.num_tiles * p.batch, "x");
             vandermonde_fwd_cuda(p, ctx);
           }));
  });
  return out;
}

// T[b, n] = sum_l u[b, l] exp(x[b, n] l) and T1[b, n] = sum_l l u[b, l] exp(x[b, n] l).
std::tuple<at::Tensor, at::Tensor> transpose_rows(const at::Tensor& u2, const at::Tensor& x2, bool with_t1) {
  const int64_t B = x2.size(0), N = x2.size(1);
  at::Tensor t = new_output({B, N}, x2.options());
  at::Tensor t1 = with_t1 ? new_output({B, N}, x2.options()) : at::Tensor();
  if (B == 0) return {t, t1};
  SSMK_DISPATCH_COMPLEX(x2.scalar_type(), "log_vandermonde_transpose", [&] {
    using T = typename scalar_t::value_type;
    VandermondeTransposeParams<T> p{};
    fill_nodes(p, x2, u2.size(1));
    p.with_t1 = with_t1;
    p.u = view<const scalar_t, 2>(u2);
    p.t = ptr<scalar_t>(t);
    p.t1 = with_t1 ? ptr<scalar_t>(t1) : nullptr;
    launch(x2, [&] { vandermonde_transpose_cpu(p); } SSMK_CUDA([&](const CudaContext& ctx) {
             const int64_t groups = (N + vandermonde::kCudaTransposeGroup - 1) / vandermonde::kCudaTransposeGroup;
             check_cuda_grid(p.num_tiles * groups * B, "x");
             const at::Tensor partials = at::empty({B, p.num_tiles, N, 4}, x2.options().dtype(at::kDouble));
             vandermonde_transpose_cuda(p, ptr<double>(partials), ctx);
           }));
  });
  return {t, t1};
}

at::Tensor log_vandermonde_fwd(const LogVandermondeFwdArgs& in) {
  check_vx(in.v, in.x, in.L);
  const auto batch = broadcast_batch({&in.v, &in.x}, {"v", "x"});
  const int64_t N = broadcast_n(in.v, in.x);
  const at::Tensor out = forward_rows(rows(in.v, batch, N), rows(in.x, batch, N), in.L, in.symmetric);
  return out.view(with_last(batch, in.L));
}

std::tuple<at::Tensor, at::Tensor> log_vandermonde_bwd(const LogVandermondeBwdArgs& in) {
  const at::Tensor &v = in.v, &x = in.x;
  check_vx(v, x, in.L);
  const auto batch = broadcast_batch({&v, &x}, {"v", "x"});
  const int64_t N = broadcast_n(v, x);
  check_shape(in.dout, with_last(batch, in.L), "dout");
  check_same_device(in.dout, v, "dout");
  // d/dv of sum_l g_l y_l: conj(sum_l conj(g_l) exp(x l)); symmetric: y = 2 Re(.), g real.
  const at::Tensor g = in.dout.to(v.scalar_type());
  const at::Tensor u = in.symmetric ? g : at::conj_physical(g);
  const at::Tensor v2 = rows(v, batch, N), x2 = rows(x, batch, N);
  auto [t, t1] = transpose_rows(u.reshape({numel_of(batch), in.L}), x2, true);
  const double f = in.symmetric ? 2.0 : 1.0;
  at::Tensor dv = at::conj_physical(t).mul_(f);
  at::Tensor dx = at::conj_physical(t1.mul_(v2)).mul_(f);
  const auto shape = with_last(batch, N);
  return {dv.view(shape).sum_to_size(v.sizes()), dx.view(shape).sum_to_size(x.sizes())};
}

at::Tensor log_vandermonde_transpose_fwd(const LogVandermondeTransposeFwdArgs& in) {
  check_vx(in.v, in.x, in.L);
  check_u(in.u, in.v, in.L);
  const auto batch = broadcast_batch({&in.u, &in.v, &in.x}, {"u", "v", "x"});
  const int64_t N = broadcast_n(in.v, in.x);
  const at::Tensor u2 = rows(in.u.to(in.v.scalar_type()), batch, in.L);
  auto [t, t1] = transpose_rows(u2, rows(in.x, batch, N), false);
  return t.mul_(rows(in.v, batch, N)).view(with_last(batch, N));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_vandermonde_transpose_bwd(
    const LogVandermondeTransposeBwdArgs& in) {
  const at::Tensor &u = in.u, &v = in.v, &x = in.x;
  const int64_t L = in.L;
  check_vx(v, x, L);
  check_u(u, v, L);
  const auto batch = broadcast_batch({&u, &v, &x}, {"u", "v", "x"});
  const int64_t N = broadcast_n(v, x);
  const auto shape = with_last(batch, N);
  check_shape(in.dout, shape, "dout");
  check_same_device(in.dout, v, "dout");
  const at::Tensor g2 = in.dout.to(v.scalar_type()).reshape({numel_of(batch), N});
  const at::Tensor v2 = rows(v, batch, N), x2 = rows(x, batch, N);
  // du_l = conj(sum_n conj(g_n) v_n exp(x_n l)) = sum_n g_n conj(v_n) exp(conj(x_n) l)
  const at::Tensor c = g2 * at::conj_physical(v2);
  at::Tensor du = forward_rows(c, at::conj_physical(x2), L, false);
  if (!u.is_complex()) du = at::real(du);
  du = du.reshape(with_last(batch, L)).sum_to_size(u.sizes());
  const at::Tensor u2 = rows(u.to(v.scalar_type()), batch, L);
  auto [t, t1] = transpose_rows(u2, x2, true);
  // dv_n = g_n conj(T_n), dx_n = g_n conj(v_n T1_n)
  at::Tensor dv = at::conj_physical(t).mul_(g2);
  at::Tensor dx = at::conj_physical(t1.mul_(v2)).mul_(g2);
  return {du.contiguous(), dv.view(shape).sum_to_size(v.sizes()), dx.view(shape).sum_to_size(x.sizes())};
}

}  // namespace
}  // namespace ssmk

SSMK_OP(log_vandermonde_fwd, LogVandermondeFwdArgs, "Tensor out")
SSMK_OP(log_vandermonde_bwd, LogVandermondeBwdArgs, "(Tensor dv, Tensor dx)")
SSMK_OP(log_vandermonde_transpose_fwd, LogVandermondeTransposeFwdArgs, "Tensor out")
SSMK_OP(log_vandermonde_transpose_bwd, LogVandermondeTransposeBwdArgs, "(Tensor du, Tensor dv, Tensor dx)")
