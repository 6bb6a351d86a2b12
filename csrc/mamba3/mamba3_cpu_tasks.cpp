// mamba3_task.h's per-task kernels (the code the GPU runs, one (batch or sequence, value head)
// task per block) on the CPU, for the test hook mamba3_cpu_task_kernels: the CPU tests then check
// that code as well as the blocked CPU kernels of mamba3_cpu.cpp. Each phase runs with
// SerialLanes::kEmulated lanes one after the other, so the tests also check how every phase splits
// its items across a block's threads. The scratch areas start NaN-filled, as the GPU's start
// with whatever memory held: a product that reads padding nobody zeroed fails the tests.
#include "common/aten.h"
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "common/parallel.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {

template <typename T>
void mamba3_fwd_task_kernels_cpu(const Mamba3FwdParams<T>& p) {
  cpu::parallel_items(p.tasks(), p.seqlen * p.headdim_v * p.headdim_qk, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> scratch(mamba3::fwd_scratch(p), std::numeric_limits<acc_t<T>>::quiet_NaN());
    const mamba3::SerialLanes lanes{mamba3::SerialLanes::kEmulated};
    for (int64_t task = begin; task < end; ++task) mamba3::fwd_task(p, task, scratch.data(), lanes);
  });
}

template <typename T>
void mamba3_bwd_task_kernels_cpu(const Mamba3BwdParams<T>& p) {
  // The chunk states in one buffer addressed by bwd_state_slot, as the CUDA kernel lays them out,
  // so that the CPU tests check that layout too (with cu_seqlens, sequences share a head's slots).
  const int64_t state_size = mamba3::tile_state(p).size();
  std::vector<acc_t<T>> states(mamba3::bwd_state_slots(p) * state_size, std::numeric_limits<acc_t<T>>::quiet_NaN());
  cpu::parallel_items(p.tasks(), p.seqlen * p.headdim_v * p.headdim_qk, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> scratch(mamba3::bwd_scratch(p), std::numeric_limits<acc_t<T>>::quiet_NaN());
    const mamba3::SerialLanes lanes{mamba3::SerialLanes::kEmulated};
    for (int64_t task = begin; task < end; ++task) {
      acc_t<T>* task_states = states.data() + mamba3::bwd_state_slot(p, task) * state_size;
      mamba3::bwd_task(p, task, scratch.data(), task_states, lanes);
    }
  });
}

#define SSMK_MAMBA3_INSTANTIATE(T)                                               \
  template void mamba3_fwd_task_kernels_cpu<T>(const Mamba3FwdParams<T>&);     \
  template void mamba3_bwd_task_kernels_cpu<T>(const Mamba3BwdParams<T>&);
SSMK_MAMBA3_INSTANTIATE(float)
SSMK_MAMBA3_INSTANTIATE(double)
#undef SSMK_MAMBA3_INSTANTIATE

}  // namespace ssmk
