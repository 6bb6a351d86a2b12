// mamba3 test hook (CPU): switches the CPU scan to mamba3_task.h's per-task kernels, the code the
// GPU runs, so that the CPU tests check it as well as the blocked CPU kernels.
#include <torch/library.h>

#include "mamba3/mamba3.h"

TORCH_LIBRARY_FRAGMENT(ssm_kernels_test, m) {
  m.def("mamba3_cpu_task_kernels(bool on) -> bool", [](bool on) { return ssmk::mamba3_cpu_task_kernels(on); });
}
