// Portability macros shared by host (C++) and device (CUDA) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSMK_HOST_DEVICE __host__ __device__ __forceinline__
#define SSMK_DEVICE __device__ __forceinline__
#else
#define SSMK_HOST_DEVICE inline
#define SSMK_DEVICE inline
#endif

// Small scalar math that must inline into vectorised loops: GCC's early inliner otherwise keeps
// fast_exp out of line inside sigmoid ("call is cold"), and the loop stays scalar.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSMK_MATH_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SSMK_MATH_INLINE inline __attribute__((always_inline))
#else
#define SSMK_MATH_INLINE inline
#endif

#if defined(__GNUC__)
#define SSMK_RESTRICT __restrict__
#else
#define SSMK_RESTRICT
#endif
