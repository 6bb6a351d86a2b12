// The one TORCH_LIBRARY of the project: every op schema lives here. Device implementations are
// registered next to their kernels (TORCH_LIBRARY_IMPL in <op>_cpu.cpp / <op>_cuda.cu); fake
// implementations and autograd are registered from Python (python/ssm_kernels/ops/).
#include <torch/library.h>

#include <atomic>
#include <string>

#include "common/output.h"

#ifdef SSMK_PYTHON_MODULE
#include <Python.h>
#endif

#ifndef SSMK_CUDA_ARCHS
#define SSMK_CUDA_ARCHS ""
#endif

namespace ssmk {

std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {

bool set_poison_outputs(bool enable) { return poison_outputs_flag().exchange(enable); }

std::string build_info() {
  std::string info = "cuda=";
#ifdef SSMK_WITH_CUDA
  info += "1;cuda_archs=" SSMK_CUDA_ARCHS;
#else
  info += "0;cuda_archs=";
#endif
#if defined(__AVX512F__)
  info += ";cpu_isa=avx512";
#elif defined(__AVX2__)
  info += ";cpu_isa=avx2";
#elif defined(__SSE2__)
  info += ";cpu_isa=sse2";
#else
  info += ";cpu_isa=generic";
#endif
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

}  // namespace
}  // namespace ssmk

TORCH_LIBRARY(ssm_kernels, m) {
  // Test and introspection helpers (no tensors, no kernels).
  m.def("_set_poison_outputs(bool enable) -> bool", &ssmk::set_poison_outputs);
  m.def("build_info() -> str", &ssmk::build_info);

  // causal_conv1d: final_states is always returned (it is tiny); the wrapper drops it if unwanted.
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, "
      "Tensor? seq_idx, bool silu) -> (Tensor out, Tensor final_states)");
  m.def(
      "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, "
      "Tensor? seq_idx, Tensor dout, Tensor? dfinal_states, bool silu) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "Tensor? conv_state_indices, bool silu) -> Tensor");

  // selective_scan: the forward also returns the state before every chunk of kChunkSize steps
  // (checkpoints, [B, D, n_chunks, N]), from which the backward recomputes each chunk.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state) "
      "-> (Tensor out, Tensor last_state, Tensor checkpoints)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, "
      "Tensor checkpoints, Tensor dout, Tensor? dlast_state) -> (Tensor du, Tensor ddelta, "
      "Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, "
      "Tensor dinitial_state)");
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, "
      "Tensor? state_batch_indices) -> Tensor");

  // ssd: final_states is always returned (the wrapper drops it if unwanted); dt_min/dt_max clamp
  // dt only when they differ from (0, inf). Gradients of absent optional inputs are empty tensors.
  m.def(
      "ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor? initial_states, Tensor? seq_idx) -> (Tensor out, Tensor final_states)");
  m.def(
      "ssd_scan_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor? initial_states, Tensor? seq_idx, Tensor dout, Tensor? dfinal_states) "
      "-> (Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddt_bias, Tensor dinitial_states)");

  // cauchy / vandermonde
  m.def("cauchy_fwd(Tensor v, Tensor z, Tensor w, bool symmetric) -> Tensor");
  m.def(
      "cauchy_bwd(Tensor v, Tensor z, Tensor w, Tensor dout, bool symmetric) "
      "-> (Tensor dv, Tensor dw)");
  m.def("log_vandermonde_fwd(Tensor v, Tensor x, int L, bool symmetric) -> Tensor");
  m.def(
      "log_vandermonde_bwd(Tensor v, Tensor x, int L, Tensor dout, bool symmetric) "
      "-> (Tensor dv, Tensor dx)");
  m.def("log_vandermonde_transpose_fwd(Tensor u, Tensor v, Tensor x, int L) -> Tensor");
  m.def(
      "log_vandermonde_transpose_bwd(Tensor u, Tensor v, Tensor x, int L, Tensor dout) "
      "-> (Tensor du, Tensor dv, Tensor dx)");

  // fftconv: activation is 0 (none), 1 (gelu, erf form) or 2 (silu). The backward returns
  // (du, dk, dD, dk_rev, dpregate, dpostgate); gradients of absent arguments are empty (0,).
  m.def(
      "fftconv_fwd(Tensor u, Tensor k, Tensor? D, Tensor? k_rev, Tensor? pregate, Tensor? postgate, "
      "int activation) -> Tensor");
  m.def(
      "fftconv_bwd(Tensor dout, Tensor u, Tensor k, Tensor? D, Tensor? k_rev, Tensor? pregate, "
      "Tensor? postgate, int activation) -> (Tensor du, Tensor dk, Tensor dD, Tensor dk_rev, "
      "Tensor dpregate, Tensor dpostgate)");
  // ssd test hook: the device's batched GEMM of the SSD driver, out = a @ b (or acc + a @ b) for
  // [batch, M, K] x [batch, K, N] float32/float64 views of any strides; in_dtype picks the
  // tensor-core operand precision on CUDA; tri is an ssd::Tri zero structure (0..3).
  m.def("_ssd_test_gemm(Tensor a, Tensor b, ScalarType in_dtype, int tri, Tensor? acc) -> Tensor");
  // fftconv test hooks (CPU): the CPU's [FFT length, path] for these arguments, and the
  // hand-written real FFT of rows (inverse: the irfft of [R, n/2 + 1] complex rows to length n;
  // strided: through the CUDA fused kernels' per-index drivers).
  m.def("_fftconv_cpu_plan(Tensor u, Tensor k, Tensor? k_rev) -> int[]");
  m.def("_fftconv_test_fft(Tensor x, bool inverse, int n, bool strided) -> Tensor");

  // linear_scan: last_state is always returned (it is tiny); the wrapper drops it if unwanted.
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? initial_state, bool reverse) -> (Tensor h, Tensor last_state)");
  m.def(
      "linear_scan_bwd(Tensor a, Tensor h, Tensor? initial_state, Tensor dh, Tensor? dlast_state, "
      "bool reverse) -> (Tensor da, Tensor db, Tensor dinitial_state)");
}

#ifdef SSMK_PYTHON_MODULE
// An empty Python module, so `import ssm_kernels._C` loads the library and runs the static
// registrations above (the extension-cpp pattern; no pybind11, stable ABI).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
