// CUDA kernels of mamba3_scan and mamba3_step: the per-task kernels of mamba3_task.h, the code the
// CPU runs too (the tests run the scan's with several emulated lanes and its products element by
// element). One block per task ((batch or packed sequence, value head); the step's (batch row,
// value head)), each phase's items split across the block's threads with a barrier between phases
// (BlockLanes); the chunk's matrix products on the warps' tensor cores (3xTF32 for float32
// accumulation, common/cuda/tile_product_mma.h). Each task's scratch area is in global memory
// (host-allocated, 32-byte aligned per task). Launch errors are checked by the host.
#include "common/cuda/tile_product_mma.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

// mamba3_task.h's lanes on a block: every thread runs the phase (or the products), then all wait
// at a barrier (the next phase reads what this one wrote, in the task's scratch or the outputs).
struct BlockLanes {
  template <typename Phase>
  __device__ __forceinline__ void operator()(Phase&& phase) const {
    phase(static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
    __syncthreads();
  }
  template <typename... Products>
  __device__ __forceinline__ void products(const Products&... prs) const {
    cuda::block_tile_products(prs...);
    __syncthreads();
  }
};

// Threads of a block: the phases' items are a chunk's Q R rows times a head dim, a state's P N
// elements (P = 64, N = 128 in mamba_ssm's layers), or the P channels.
constexpr int kBlockThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_fwd_kernel(const Mamba3FwdParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = blockIdx.x;
  mamba3::fwd_task(p, task, scratch + task * per_task, BlockLanes{});
}

// The chunk states follow the tasks' scratch areas; with cu_seqlens a task finds its slots (and
// its tokens) from the offsets on the device.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_bwd_kernel(const Mamba3BwdParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = blockIdx.x;
  acc_t<T>* states = scratch + p.tasks() * per_task + mamba3::bwd_state_slot(p, task) * p.headdim_v * p.headdim_qk;
  mamba3::bwd_task(p, task, scratch + task * per_task, states, BlockLanes{});
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_step_kernel(const Mamba3StepParams<T> p, acc_t<T>* scratch, int64_t per_task) {
  const int64_t task = blockIdx.x;
  mamba3::step_task(p, task, scratch + task * per_task, BlockLanes{});
}

}  // namespace

template <typename T>
void mamba3_fwd_cuda(const Mamba3FwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_fwd_kernel<T><<<static_cast<unsigned int>(p.tasks()), kBlockThreads, 0, ctx.stream>>>(
      p, scratch, mamba3::fwd_scratch(p));
}

template <typename T>
void mamba3_bwd_cuda(const Mamba3BwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_bwd_kernel<T><<<static_cast<unsigned int>(p.tasks()), kBlockThreads, 0, ctx.stream>>>(
      p, scratch, mamba3::bwd_scratch(p));
}

template <typename T>
void mamba3_step_cuda(const Mamba3StepParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  mamba3_step_kernel<T><<<static_cast<unsigned int>(p.batch * p.nheads), kBlockThreads, 0, ctx.stream>>>(
      p, scratch, mamba3::step_scratch(p));
}

#define SSMK_INSTANTIATE(T)                                                                       \
  template void mamba3_fwd_cuda<T>(const Mamba3FwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_bwd_cuda<T>(const Mamba3BwdParams<T>&, acc_t<T>*, const CudaContext&);   \
  template void mamba3_step_cuda<T>(const Mamba3StepParams<T>&, acc_t<T>*, const CudaContext&);
SSMK_FLOAT_TYPES(SSMK_INSTANTIATE)
#undef SSMK_INSTANTIATE

}  // namespace ssmk
