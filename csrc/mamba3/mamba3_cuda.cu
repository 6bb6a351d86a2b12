// CUDA kernels of mamba3_scan and mamba3_step: the per-task kernels of mamba3_task.h, the code the
// CPU kernels run. The scan runs one thread per (batch or packed sequence, value head) task, each
// task's scratch area in global memory (host-allocated): a simple port that keeps the CPU's
// blocking exactly, correct and bounded in memory, but serial within a task and without tensor
// cores (docs/mamba3.md). The decode step runs one block per (batch row, value head), its four
// phases (mamba3_task.h, step_task) split across the block's threads with a barrier between them.
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

// Threads of a decode-step block: the phases' items are the task's R N (rotations, k_state) and
// its P state rows (P = 64 in mamba_ssm's layers).
constexpr int kStepThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    mamba3_step_kernel(const Mamba3StepParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = blockIdx.x, lane = threadIdx.x, lanes = blockDim.x;
  const mamba3::StepTask<T> t(p, task, scratch + task * per_task);
  mamba3::step_angles(p, t, lane, lanes);
  __syncthreads();
  mamba3::step_inputs(p, t, lane, lanes);
  __syncthreads();
  mamba3::step_rows(p, t, lane, lanes);
  __syncthreads();
  mamba3::step_store(p, t, lane, lanes);
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
  mamba3_step_kernel<T><<<static_cast<unsigned int>(p.batch * p.nheads), kStepThreads, 0, ctx.stream>>>(
      p, scratch, mamba3::step_scratch(p));
}

#define SSMK_INSTANTIATE(T)                                                                       \
  template void mamba3_fwd_cuda<T>(const Mamba3FwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_bwd_cuda<T>(const Mamba3BwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_step_cuda<T>(const Mamba3StepParams<T>&, acc_t<T>*, const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
