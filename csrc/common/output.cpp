#include "common/output.h"

namespace ssmk {

std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

}  // namespace ssmk
