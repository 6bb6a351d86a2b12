// CUDA kernels of mamba3_scan and mamba3_step: the stages of mamba3_task.h, the code the CPU runs
// too (the tests run the scan's with several emulated lanes and its products element by element).
// Each stage is one kernel: per task one block; per task and state element one thread (a grid of
// tasks x element blocks); per chunk one block, a grid of chunk_blocks() blocks each taking every
// gridDim.x-th chunk in its own work area. Inside a block each phase's items are split across its
// threads with a barrier between phases (BlockLanes), and the chunk's matrix products run on the
// warps' tensor cores (3xTF32 for float32 accumulation, common/cuda/tile_product_mma.h). The
// buffers the stages share and the work areas are one host-allocated global buffer (ChunkBuffers).
// The decode step runs one block per (batch row, value head). Launch errors are checked by the host.
#include "common/cuda/tile_product_mma.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

// mamba3_task.h's lanes on a block: every thread runs the phase (or the products), then all wait
// at a barrier (the next phase reads what this one wrote, in the work area or the outputs).
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

template <mamba3::Stage kStage, typename Params>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_task_kernel(const Params p, const mamba3::ChunkBuffers<typename Params::acc> buf) {
  mamba3::task_stage<kStage>(p, blockIdx.x, buf, BlockLanes{});
}

template <mamba3::Stage kStage, typename Params>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_element_kernel(const Params p, const mamba3::ChunkBuffers<typename Params::acc> buf) {
  mamba3::element_stage<kStage>(p, blockIdx.x, buf, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                                static_cast<int64_t>(gridDim.y) * blockDim.x);
}

// Whether a chunk holds a valid chunk is the same for all of a block's threads, so they all reach
// the stage's barriers.
template <mamba3::Stage kStage, typename Params>
__global__ void __launch_bounds__(kBlockThreads)
    mamba3_chunk_kernel(const Params p, const mamba3::ChunkBuffers<typename Params::acc> buf, bool grads) {
  mamba3::ChunkWork<typename Params::acc> cw(p, buf.work + blockIdx.x * buf.work_size, grads);
  const int64_t slots = mamba3::bwd_state_slots(p);
  for (int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {
    const mamba3::ChunkRef ch = mamba3::chunk_at_slot(p, slot);
    if (ch.valid()) mamba3::chunk_stage<kStage>(p, ch, buf, cw, BlockLanes{});
  }
}

// Launches the stages (mamba3::run_fwd_stages / run_bwd_stages) on the stream, one after the other.
template <typename Params>
struct StageLauncher {
  const Params& p;
  mamba3::ChunkBuffers<typename Params::acc> buf;
  bool grads;
  int64_t blocks;
  cudaStream_t stream;

  template <mamba3::Stage kStage>
  void tasks() {
    if (p.tasks() == 0) return;
    mamba3_task_kernel<kStage, Params><<<static_cast<unsigned int>(p.tasks()), kBlockThreads, 0, stream>>>(p, buf);
  }
  template <mamba3::Stage kStage>
  void elements() {
    if (p.tasks() == 0) return;
    const dim3 grid(static_cast<unsigned int>(p.tasks()), static_cast<unsigned int>(ceil_div(buf.SS, int64_t{kBlockThreads})));
    mamba3_element_kernel<kStage, Params><<<grid, kBlockThreads, 0, stream>>>(p, buf);
  }
  template <mamba3::Stage kStage>
  void chunks() {
    if (blocks == 0) return;
    mamba3_chunk_kernel<kStage, Params><<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(p, buf, grads);
  }
};

template <typename Params>
StageLauncher<Params> stage_launcher(const Params& p, typename Params::acc* scratch, bool grads,
                                     const CudaContext& ctx) {
  const int64_t blocks = mamba3::chunk_blocks(p, grads, ctx.sms);
  return StageLauncher<Params>{p, mamba3::ChunkBuffers<typename Params::acc>(p, grads, blocks, scratch), grads,
                               blocks, ctx.stream};
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
  auto launcher = stage_launcher(p, scratch, false, ctx);
  mamba3::run_fwd_stages(launcher);
}

template <typename T>
void mamba3_bwd_cuda(const Mamba3BwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx) {
  auto launcher = stage_launcher(p, scratch, true, ctx);
  mamba3::run_bwd_stages(launcher);
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
