// Strided batched GEMM on tensor cores: out[b] (=|+=) A[b] . B[b], float32 operands in global
// memory with any strides, float32 [batch, M, N] contiguous output. Operands are rounded to the
// precision of mma.h on their way into shared memory; accumulation is float32.
//
// One block of 8 warps computes a 64x64 output tile; each warp a 32x16 eighth as two WMMA
// tiles. The K loop stages 64x32 of A and 32x64 of B in shared memory; the next step's global
// loads are issued before the current step's products so their latency overlaps. Loads are
// coalesced along whichever operand dimension has stride 1.
//
// The zero structures (Triangle) and the parameters are in batched_gemm_params.h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda/batched_gemm_params.h"
#include "common/cuda/mma.h"

namespace ssmk::cuda {

// A read from global memory through p.a and its strides. A kernel may instead pass a loader whose
// `matrix(batch)` returns an object with `float operator()(int m, int k) const` computing A's
// elements on the fly (a fused prologue); it is called only for in-range (m, k), and
// p.a_col_stride == 1 should then say that consecutive k are the cheap direction to walk.
struct StridedA {};

template <MmaPrecision P>
struct BatchedGemmTraits {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocks = 2;
  static constexpr int kBM = kGemmTileM, kBN = kGemmTileN, kBK = kGemmTileK;
  using Mma = WarpMma<P>;
  using smem_t = typename Mma::smem_t;
  // Padding keeps every fragment pointer 32-byte aligned and spreads rows over banks.
  static constexpr int kPad = 16 / static_cast<int>(sizeof(smem_t));
  static constexpr int kLdA = kBK + kPad;  // A tile [kBM][kLdA]
  static constexpr int kLdB = kBN + kPad;  // B tile [kBK][kLdB]
  static constexpr int kLdC = kBN + 4;     // output tile [kBM][kLdC], float
  static constexpr int kABytes = kBM * kLdA * static_cast<int>(sizeof(smem_t));
  static constexpr int kBBytes = kBK * kLdB * static_cast<int>(sizeof(smem_t));
  static constexpr int kCBytes = kBM * kLdC * static_cast<int>(sizeof(float));
  static constexpr int kSmemBytes = (kABytes + kBBytes) > kCBytes ? (kABytes + kBBytes) : kCBytes;
  static constexpr int kALoads = kBM * kBK / kThreads;  // elements per thread per K step
  static constexpr int kBLoads = kBK * kBN / kThreads;
  static_assert(kABytes % 128 == 0, "B tile must stay 128-byte aligned");
  static_assert((16 * kLdA * sizeof(smem_t)) % 32 == 0 && (Mma::kK * sizeof(smem_t)) % 32 == 0,
                "A fragments must be 32-byte aligned");
  static_assert((Mma::kK * kLdB * sizeof(smem_t)) % 32 == 0, "B fragments must be 32-byte aligned");
  static_assert((16 * kLdC * sizeof(float)) % 32 == 0, "output fragments must be 32-byte aligned");
};

// Which elements of a kRows x kCols tile thread `tid` loads: (row0 + i drow, col0 + i dcol) for
// i = 0 .. kRows kCols / kThreads - 1, walked so that consecutive threads touch consecutive
// addresses of the operand's stride-1 dimension.
template <int kRows, int kCols, int kThreads>
struct TileWalk {
  static_assert(kThreads % kCols == 0 && kThreads % kRows == 0, "threads must tile rows and columns");
  int row0, col0, drow, dcol;
  __device__ __forceinline__ TileWalk(int tid, bool col_contiguous) {
    if (col_contiguous) {
      row0 = tid / kCols, col0 = tid % kCols, drow = kThreads / kCols, dcol = 0;
    } else {
      row0 = tid % kRows, col0 = tid / kRows, drow = 0, dcol = kThreads / kRows;
    }
  }
};

__device__ __forceinline__ StridedA bind_matrix(const StridedA& s, int64_t) { return s; }
template <typename ALoad>
__device__ __forceinline__ auto bind_matrix(const ALoad& load, int64_t batch) { return load.matrix(batch); }

template <MmaPrecision P, typename ALoad>
__global__ void __launch_bounds__(BatchedGemmTraits<P>::kThreads, BatchedGemmTraits<P>::kMinBlocks)
    batched_gemm_kernel(const BatchedGemmParams p, const ALoad a_load) {
  using Tr = BatchedGemmTraits<P>;
  using Mma = typename Tr::Mma;
  using smem_t = typename Tr::smem_t;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kBK = Tr::kBK, kThreads = Tr::kThreads;
  __shared__ __align__(128) unsigned char smem[Tr::kSmemBytes];
  auto* sA = reinterpret_cast<smem_t*>(smem);
  auto* sB = reinterpret_cast<smem_t*>(smem + Tr::kABytes);
  auto* sC = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's 32x16 eighth of the tile
  const TileWalk<kBM, kBK, kThreads> wa(tid, p.a_col_stride == 1);
  const TileWalk<kBK, kBN, kThreads> wb(tid, p.b_col_stride == 1);
  const int64_t tiles_per_batch = p.tiles_m * p.tiles_n;

  for (int64_t tile = blockIdx.x; tile < p.batch * tiles_per_batch; tile += gridDim.x) {
    const int64_t bi = tile / tiles_per_batch;
    const int64_t tm = (tile % tiles_per_batch) / p.tiles_n, tn = tile % p.tiles_n;
    const int64_t m0 = tm * kBM, n0 = tn * kBN;
    float* out = p.out + bi * p.M * p.N;

    if (p.triangle == Triangle::kLowerOut && n0 > m0 + kBM - 1) {
      if (!p.accumulate) {
        for (int e = tid; e < kBM * kBN; e += kThreads) {
          const int64_t m = m0 + e / kBN, n = n0 + e % kBN;
          if (m < p.M && n < p.N) out[m * p.N + n] = 0.0f;
        }
      }
      continue;
    }
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
    int k_begin = 0, k_end = K;
    if (p.triangle == Triangle::kLowerA) k_end = min(K, static_cast<int>(m0) + kBM);
    if (p.triangle == Triangle::kUpperA) k_begin = min(K, static_cast<int>(m0));

    const float* a = p.a + bi * p.a_batch_stride;
    const float* b = p.b + bi * p.b_batch_stride;
    // Offsets inside one matrix fit in 32 bits (the caller checks batched_gemm_fits_int32 and
    // takes another path otherwise); batch offsets are 64-bit.
    const int a_step = static_cast<int>(wa.drow * p.a_row_stride + wa.dcol * p.a_col_stride);
    const int b_step = static_cast<int>(wb.drow * p.b_row_stride + wb.dcol * p.b_col_stride);
    float ra[Tr::kALoads], rb[Tr::kBLoads];
    const auto a_matrix = bind_matrix(a_load, bi);
    auto load = [&](int k0) {
      const int m = static_cast<int>(m0) + wa.row0, ka = k0 + wa.col0;
      if constexpr (std::is_same_v<ALoad, StridedA>) {
        const float* pa = a + (m * static_cast<int>(p.a_row_stride) + ka * static_cast<int>(p.a_col_stride));
#pragma unroll
        for (int i = 0; i < Tr::kALoads; ++i) {
          ra[i] = m + i * wa.drow < M && ka + i * wa.dcol < k_end ? pa[i * a_step] : 0.0f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < Tr::kALoads; ++i) {
          const int mi = m + i * wa.drow, ki = ka + i * wa.dcol;
          ra[i] = mi < M && ki < k_end ? a_matrix(mi, ki) : 0.0f;
        }
      }
      const int kb = k0 + wb.row0, n = static_cast<int>(n0) + wb.col0;
      const float* pb = b + (kb * static_cast<int>(p.b_row_stride) + n * static_cast<int>(p.b_col_stride));
#pragma unroll
      for (int i = 0; i < Tr::kBLoads; ++i) {
        rb[i] = kb + i * wb.drow < k_end && n + i * wb.dcol < N ? pb[i * b_step] : 0.0f;
      }
    };

    typename Mma::FragAcc acc[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) Mma::zero(acc[i]);

    if (k_begin < k_end) load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
      __syncthreads();  // the previous step's fragments have been read
#pragma unroll
      for (int i = 0; i < Tr::kALoads; ++i)
        sA[(wa.row0 + i * wa.drow) * Tr::kLdA + wa.col0 + i * wa.dcol] = MmaTraits<P>::from_float(ra[i]);
#pragma unroll
      for (int i = 0; i < Tr::kBLoads; ++i)
        sB[(wb.row0 + i * wb.drow) * Tr::kLdB + wb.col0 + i * wb.dcol] = MmaTraits<P>::from_float(rb[i]);
      __syncthreads();
      if (k0 + kBK < k_end) load(k0 + kBK);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += Mma::kK) {
        typename Mma::FragA fa, fa_lo;
        typename Mma::FragB fb, fb_lo;
        Mma::load_b(fb, fb_lo, sB + kk * Tr::kLdB + wn * 16, Tr::kLdB);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          Mma::load_a(fa, fa_lo, sA + (wm * 32 + i * 16) * Tr::kLdA + kk, Tr::kLdA);
          Mma::mma(acc[i], fa, fa_lo, fb, fb_lo);
        }
      }
    }

    __syncthreads();  // sC overlays sA and sB
#pragma unroll
    for (int i = 0; i < 2; ++i) Mma::store(sC + (wm * 32 + i * 16) * Tr::kLdC + wn * 16, Tr::kLdC, acc[i]);
    __syncthreads();
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int r = e / kBN, c = e % kBN;
      const int64_t m = m0 + r, n = n0 + c;
      if (m < p.M && n < p.N) {
        const float v = sC[r * Tr::kLdC + c];
        out[m * p.N + n] = p.accumulate ? out[m * p.N + n] + v : v;
      }
    }
    __syncthreads();  // sC is read before the next tile's loads overwrite it
  }
}

template <MmaPrecision P, typename ALoad = StridedA>
void launch_batched_gemm(const BatchedGemmParams& p, int num_sms, cudaStream_t stream, const ALoad& a_load = {}) {
  using Tr = BatchedGemmTraits<P>;
  const int64_t tiles = p.batch * p.tiles_m * p.tiles_n;
  if (tiles == 0) return;
  // Several resident blocks per SM; beyond that a block loops over tiles.
  const int64_t max_blocks = static_cast<int64_t>(num_sms) * 32;
  const unsigned grid = static_cast<unsigned>(tiles < max_blocks ? tiles : max_blocks);
  batched_gemm_kernel<P, ALoad><<<grid, Tr::kThreads, 0, stream>>>(p, a_load);
}

}  // namespace ssmk::cuda
