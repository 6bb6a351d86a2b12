// CPU kernels of mamba3_scan and mamba3_step: the per-task kernels of mamba3_task.h over
// at::parallel_for, each thread with its own scratch area, in AVX2+FMA variants chosen at run
// time (common/cpu.h).
#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

template <typename T>
SSMK_CPU_INLINE void fwd_tasks(const Mamba3FwdParams<T>& p, int64_t begin, int64_t end) {
  std::vector<acc_t<T>> scratch(mamba3::fwd_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::fwd_task(p, task, scratch.data());
}
SSMK_CPU_MULTIVERSION(fwd_tasks, (typename T), (T), (const Mamba3FwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void bwd_tasks(const Mamba3BwdParams<T>& p, int64_t begin, int64_t end) {
  std::vector<acc_t<T>> scratch(mamba3::bwd_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::bwd_task(p, task, scratch.data());
}
SSMK_CPU_MULTIVERSION(bwd_tasks, (typename T), (T), (const Mamba3BwdParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

template <typename T>
SSMK_CPU_INLINE void step_tasks(const Mamba3StepParams<T>& p, int64_t begin, int64_t end) {
  std::vector<acc_t<T>> scratch(mamba3::step_scratch(p));
  for (int64_t task = begin; task < end; ++task) mamba3::step_task(p, task, scratch.data());
}
SSMK_CPU_MULTIVERSION(step_tasks, (typename T), (T), (const Mamba3StepParams<T>& p, int64_t begin, int64_t end),
                      (p, begin, end))

}  // namespace

template <typename T>
void mamba3_fwd_cpu(const Mamba3FwdParams<T>& p) {
  at::parallel_for(0, p.tasks(), 1, [&](int64_t b, int64_t e) { fwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_bwd_cpu(const Mamba3BwdParams<T>& p) {
  at::parallel_for(0, p.tasks(), 1, [&](int64_t b, int64_t e) { bwd_tasks_dispatch<T>(p, b, e); });
}

template <typename T>
void mamba3_step_cpu(const Mamba3StepParams<T>& p) {
  at::parallel_for(0, p.batch * p.nheads, 1, [&](int64_t b, int64_t e) { step_tasks_dispatch<T>(p, b, e); });
}

#define SSMK_MAMBA3_INSTANTIATE(T)                               \
  template void mamba3_fwd_cpu<T>(const Mamba3FwdParams<T>&);    \
  template void mamba3_bwd_cpu<T>(const Mamba3BwdParams<T>&);    \
  template void mamba3_step_cpu<T>(const Mamba3StepParams<T>&);
SSMK_FLOAT_TYPES(SSMK_MAMBA3_INSTANTIATE)

}  // namespace ssmk
