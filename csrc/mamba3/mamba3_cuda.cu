// CUDA kernels of mamba3_scan and mamba3_step: the per-task kernels of mamba3_task.h, the code the
// CPU kernels run, with one thread per (batch or packed sequence, value head) task and each
// task's scratch area in global memory (host-allocated). A simple port that keeps the CPU's blocking exactly: correct
// and bounded in memory, but serial within a task and without tensor cores (docs/mamba3.md).
// Launch errors are checked by the host.
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

constexpr int kThreads = 32;

template <typename T>
__global__ void mamba3_fwd_kernel(const Mamba3FwdParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= p.tasks()) return;
  mamba3::fwd_task(p, task, scratch + task * per_task);
}

// The chunk states follow the tasks' scratch areas; with cu_seqlens a task finds its slots (and
// its tokens) from the offsets on the device.
template <typename T>
__global__ void mamba3_bwd_kernel(const Mamba3BwdParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= p.tasks()) return;
  acc_t<T>* states = scratch + p.tasks() * per_task + mamba3::bwd_state_slot(p, task) * p.headdim_v * p.headdim_qk;
  mamba3::bwd_task(p, task, scratch + task * per_task, states);
}

template <typename T>
__global__ void mamba3_step_kernel(const Mamba3StepParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= p.batch * p.nheads) return;
  mamba3::step_task(p, task, scratch + task * per_task);
}

unsigned int blocks_for(int64_t tasks) { return static_cast<unsigned int>(ceil_div(tasks, kThreads)); }

}  // namespace

template <typename T>
void mamba3_fwd_cuda(const Mamba3FwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_fwd_kernel<T><<<blocks_for(p.tasks()), kThreads, 0, ctx.stream>>>(p, scratch, mamba3::fwd_scratch(p));
}

template <typename T>
void mamba3_bwd_cuda(const Mamba3BwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_bwd_kernel<T><<<blocks_for(p.tasks()), kThreads, 0, ctx.stream>>>(p, scratch, mamba3::bwd_scratch(p));
}

template <typename T>
void mamba3_step_cuda(const Mamba3StepParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_step_kernel<T><<<blocks_for(p.batch * p.nheads), kThreads, 0, ctx.stream>>>(p, scratch,
                                                                                    mamba3::step_scratch(p));
}

#define SSMK_INSTANTIATE(T)                                                                       \
  template void mamba3_fwd_cuda<T>(const Mamba3FwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_bwd_cuda<T>(const Mamba3BwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_step_cuda<T>(const Mamba3StepParams<T>&, acc_t<T>*, const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
