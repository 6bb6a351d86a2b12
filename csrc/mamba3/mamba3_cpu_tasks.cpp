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
namespace {

// The GPU's tensor-core loads need every product buffer 32-byte aligned: each must start a whole
// number of tiles' rows (kTile elements) into its task's area, which is aligned, and all must fit
// in Work::size.
template <typename acc>
void check_work_layout(const Mamba3Dims& d, bool grads) {
  std::vector<acc> area(mamba3::Work<acc>::size(d, grads));
  const mamba3::Work<acc> wk(d, area.data(), grads);
  const int64_t M = wk.M, ldN = wk.ldN, ldP = wk.ldP;
  struct Buffer {
    const acc* at;
    int64_t size;
  };
  const Buffer fwd[] = {{wk.q, M * ldN},  {wk.k, M * ldN},  {wk.x, M * ldP},  {wk.cb, M * M},
                        {wk.m, M * M},    {wk.g, M * M},    {wk.qs, M * ldP}, {wk.y, M * ldP},
                        {wk.xw, M * ldP}, {wk.cs, d.chunk * d.nangles}, {wk.ew, d.chunk}};
  const Buffer bwd[] = {{wk.dy, M * ldP}, {wk.dx, M * ldP}, {wk.dys, M * ldP}, {wk.dxy, M * M},
                        {wk.kds, M * ldP}, {wk.dq, M * ldN}, {wk.dk, M * ldN}, {wk.dm, M * M}};
  const auto check = [&](const Buffer& b) {
    const int64_t offset = b.at - area.data();
    TORCH_CHECK(offset % kTile == 0 && offset + b.size <= static_cast<int64_t>(area.size()),
                "mamba3 Work layout: a buffer at element ", offset, " of ", b.size, " elements in an area of ",
                area.size());
  };
  for (const Buffer& b : fwd) check(b);
  if (grads) {
    for (const Buffer& b : bwd) check(b);
  }
}

}  // namespace

template <typename T>
void mamba3_fwd_task_kernels_cpu(const Mamba3FwdParams<T>& p) {
  check_work_layout<acc_t<T>>(p, false);
  TORCH_CHECK(mamba3::fwd_scratch(p) % kTile == 0, "mamba3 forward scratch: not a whole number of tiles");
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
  check_work_layout<acc_t<T>>(p, true);
  TORCH_CHECK(mamba3::bwd_scratch(p) % kTile == 0, "mamba3 backward scratch: not a whole number of tiles");
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
