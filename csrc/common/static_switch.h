// Compile-time switches over runtime flags, used only where the flag changes an inner loop.
#pragma once

#define SSMK_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                          \
    if (COND) {                                  \
      constexpr static bool CONST_NAME = true;   \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static bool CONST_NAME = false;  \
      return __VA_ARGS__();                      \
    }                                            \
  }()
