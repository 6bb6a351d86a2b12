// Portability macros shared by host (C++) and device (CUDA) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSMK_HOST_DEVICE __host__ __device__ __forceinline__
#define SSMK_DEVICE __device__ __forceinline__
#else
#define SSMK_HOST_DEVICE inline
#define SSMK_DEVICE inline
#endif

#if defined(__GNUC__)
#define SSMK_RESTRICT __restrict__
#else
#define SSMK_RESTRICT
#endif
