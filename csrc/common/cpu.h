// CPU building blocks: ISA dispatch for the hot loops.
//
// Wheels are built for baseline x86-64 (SSE2), but the machines we run on have AVX2 and FMA. Hot
// per-row functions are written once as SSMK_CPU_INLINE templates and instantiated twice: as is,
// and inside an SSMK_CPU_AVX2 wrapper, where they are inlined and vectorised for AVX2+FMA. The
// choice is made at run time with cpu_has_avx2(). (The lambda given to at::parallel_for is its own
// function without the target attribute, so the wrapper must sit inside the lambda, around the
// loop over rows.)
#pragma once

#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SSMK_CPU_INLINE __attribute__((always_inline)) inline
#define SSMK_CPU_AVX2 __attribute__((target("avx2,fma")))
#define SSMK_HAVE_AVX2_DISPATCH 1
#else
#define SSMK_CPU_INLINE inline
#define SSMK_CPU_AVX2
#define SSMK_HAVE_AVX2_DISPATCH 0
#endif

namespace ssmk::cpu {

inline bool cpu_has_avx2() {
#if SSMK_HAVE_AVX2_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Whether SSMK_CPU_MULTIVERSION compiles an AVX2 copy for element (or accumulation) type T, its
// first template argument. float64 and complex128 run the baseline copy only: they serve accuracy
// checks against the float64 references, not speed, and their AVX2 copies cost 15% of the compile
// time of mamba3_cpu.cpp, the slowest file (docs/build.md).
template <typename T>
struct IsDoublePrecision : std::is_same<T, double> {};
template <template <typename> class Complex>
struct IsDoublePrecision<Complex<double>> : std::true_type {};  // c10::complex<double>
template <typename T>
inline constexpr bool kAvx2Copy = !IsDoublePrecision<T>::value;

}  // namespace ssmk::cpu

// Defines NAME##_avx2, a copy of the SSMK_CPU_INLINE function template NAME (template parameters
// TPARAMS, call arguments ARGS) compiled for AVX2+FMA, and NAME##_dispatch that picks one at run
// time. Usage:
//   template <typename T> SSMK_CPU_INLINE void rows(const P& p, int64_t b, int64_t e) {...}
//   SSMK_CPU_MULTIVERSION(rows, (typename T), (T), (const P& p, int64_t b, int64_t e), (p, b, e))
#define SSMK_UNPAREN(...) __VA_ARGS__
#define SSMK_FIRST_OF(first, ...) first
#define SSMK_CPU_MULTIVERSION(NAME, TDECL, TARGS, PARAMS, ARGS)                        \
  template <SSMK_UNPAREN TDECL>                                                        \
  SSMK_CPU_AVX2 void NAME##_avx2 PARAMS {                                              \
    NAME<SSMK_UNPAREN TARGS> ARGS;                                                     \
  }                                                                                    \
  template <SSMK_UNPAREN TDECL>                                                        \
  void NAME##_dispatch PARAMS {                                                        \
    if constexpr (::ssmk::cpu::kAvx2Copy<SSMK_FIRST_OF TARGS>) {                       \
      if (::ssmk::cpu::cpu_has_avx2()) {                                               \
        NAME##_avx2<SSMK_UNPAREN TARGS> ARGS;                                          \
        return;                                                                        \
      }                                                                                \
    }                                                                                  \
    NAME<SSMK_UNPAREN TARGS> ARGS;                                                     \
  }
