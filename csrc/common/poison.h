// The output poisoning switch (common/output.h), on its own so that registration.cpp, which defines
// it, does not parse the tensor headers.
#pragma once

#include <atomic>

namespace ssmk {

std::atomic<bool>& poison_outputs_flag();

}  // namespace ssmk
