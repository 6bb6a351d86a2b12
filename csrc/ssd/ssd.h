// ssd_scan (Mamba-2 chunked SSD): the typed parameters of each stage and the CUDA launchers.
//
// The host driver (ssd_op.cpp) runs the SSD decomposition (see ssd_math.h) as a fixed sequence of
// stages on chunk-major accumulation-dtype buffers ([B, nc, H, Q, ...], the sequence zero-padded
// to a multiple of the chunk size Q): batched GEMMs (BLAS on the CPU, the tensor-core GEMM of
// common/cuda/batched_gemm.h on the GPU) and stage kernels for the rest (cumulative sums, masked
// decays, the scans across chunks, the epilogues and the backward's reductions). Both devices
// run the same algorithm on the same buffers. Each stage gets its own params struct, built once
// by the host from the buffers that exist when it runs.
//
// Heads of one group are adjacent (head h uses group h / (H / G)), so the per-head products with
// a group's B or C are one GEMM per (batch, chunk, group) on the heads stacked along P.
//
// Structs templated on `T` take the input element type; those templated on `Acc` only touch
// accumulation-dtype buffers, so one instantiation serves float32 and the 16-bit inputs.
#pragma once

#include <cstdint>

#include "common/cuda/batched_gemm_params.h"
#include "common/types.h"
#include "ssd/ssd_math.h"

namespace ssmk {

struct SsdDims {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk, nchunks;
  // Packed sequences on the CPU (batch 1): chunk c holds tokens chunk_token[c] ..
  // chunk_token[c] + chunk_len[c] - 1 of the packed row (seqlen tokens) at positions 0 ..
  // chunk_len[c] - 1, the rest of the chunk being padding. nullptr (CUDA, and unpacked rows):
  // chunk c holds tokens c Q .. min(c Q + Q, seqlen) - 1.
  const int64_t* chunk_token;  // [nchunks] or nullptr
  const int64_t* chunk_len;    // [nchunks] or nullptr
  int64_t tasks() const { return batch * nchunks * nheads; }  // (batch, chunk, head) tasks
};

// dt processing (bias, softplus, clamp to dt_limit), shared by the first and the last stage.
template <typename T>
struct SsdDtParams {
  using acc = acc_t<T>;
  View<const T, 3> dt;  // [B, L, H]
  const acc* A;         // [H]
  const acc* dt_bias;   // [H] or nullptr
  bool softplus;
  bool clamp;           // dt_limit differs from (0, inf)
  double dt_limit[2];   // (lo, hi)
};

// Stage 1 (prep_task): dt processed, Acs, the decays e, r and kdecay.
template <typename T>
struct SsdPrepParams : SsdDims, SsdDtParams<T> {
  using acc = acc_t<T>;
  // [B, nc * Q] seq_idx padded with its last value, or nullptr. Every stage only compares its
  // values with each other (never indexes with them), so any values are memory-safe.
  const int32_t* seg;
  acc* dtv;            // [B, nc, H, Q] processed dt (0 on padding)
  acc* acs;            // [B, nc, H, Q] cumulative sum of dt * A within the chunk
  acc* e;              // [B, nc, H, Q] e^{Acs_last - Acs_s}, masked to the last position's sequence
  acc* r;              // [B, nc, H, Q] e^{Acs_t}, masked to the previous chunk's last sequence
  acc* kdecay;         // [B, nc, H] e^{Acs_last}, 0 when the chunk starts a new sequence
  // Packed sequences on CUDA (the aligned copy, batch 1): [nc * Q], 0 on the padding between
  // sequences (dt taken as 0 there), or nullptr. The CPU's chunk map (SsdDims) needs none.
  const uint8_t* valid;
};

// What GL = CB masked and decayed, (C_t . B_s) e^{Acs_t - Acs_s}, is rebuilt from.
template <typename Acc>
struct SsdGlParams : SsdDims {
  const Acc* cb;       // [B, nc, G, Q, Q] C_t . B_s
  const Acc* acs;      // [B, nc, H, Q]
  const int32_t* seg;  // [B, nc * Q] or nullptr
};

// The backward of the masked decay (wsum): dGL -> dGL * decay, and dacs.
template <typename Acc>
struct SsdWsumParams : SsdGlParams<Acc> {
  Acc* dacs;  // [B, nc, H, Q] intra-chunk part of d loss / d Acs
};

// The scan across chunks, per (batch, head). With packed sequences (chunk_seq given, batch 1)
// every chunk holds one sequence's tokens: the state restarts from that sequence's initial state
// at its first chunk, and its final state is the state after its last chunk.
template <typename Acc>
struct SsdScanParams : SsdDims {
  const Acc* kdecay;  // [B, nc, H]
  const Acc* init;    // [B, H, P, N] ([num_seqs, H, P, N] packed) or nullptr
  Acc* states;        // [B, nc, H, P, N] in: chunk states S_c; out: state before chunk c
  Acc* final_states;  // [B, H, P, N] ([num_seqs, H, P, N] packed)
  const int32_t* chunk_seq;  // [nc] sequence of each chunk (num_seqs past the last one), or nullptr
  int64_t num_seqs;
};

namespace ssd {

// Packed scan: does chunk c start (end) its sequence? Chunks past the last sequence hold
// chunk_seq == num_seqs, a sequence with no states.
SSMK_HOST_DEVICE bool starts_sequence(const int32_t* chunk_seq, int64_t c) {
  return c == 0 || chunk_seq[c - 1] != chunk_seq[c];
}
SSMK_HOST_DEVICE bool ends_sequence(const int32_t* chunk_seq, int64_t c, int64_t nc) {
  return c == nc - 1 || chunk_seq[c + 1] != chunk_seq[c];
}

}  // namespace ssd

// The scan, then the reverse scan of the state gradients.
template <typename Acc>
struct SsdScanBwdParams : SsdScanParams<Acc> {
  const Acc* dfinal;  // [B, H, P, N] ([num_seqs, H, P, N] packed) or nullptr
  Acc* dstates;       // [B, nc, H, P, N] in: d loss / d H_{c-1} through chunk c's outputs;
                      // out: d loss / d H_c (state at the end of chunk c)
  Acc* dinit;         // [B, H, P, N] ([num_seqs, H, P, N] packed)
  Acc* ddecay;        // [B, nc, H, nsplit] partial sums of d loss / d Acs_last via kdecay
  int64_t nsplit;
};

// The forward's epilogue: out = (y_intra + r_t y_inter + D x) * silu(z).
template <typename T>
struct SsdFwdParams : SsdDims {
  using acc = acc_t<T>;
  View<const T, 4> x;    // [B, L, H, P]
  View<const T, 4> z;    // [B, L, H, P], or data nullptr
  const acc* D;          // [H, P] or nullptr
  const acc* r;          // [B, nc, H, Q]
  const acc* y_intra;    // [B, nc, H, Q, P] GL @ (dt x)
  const acc* y_interT;   // [B, nc, H, P, Q] H_{c-1} @ C^T (without the e^{Acs_t} factor)
  T* out;                // [B, L, H, P] contiguous
};

// The backward's last stage: d loss / d Acs assembled and the gradients of dt, A, x, D and z.
template <typename T>
struct SsdBwdParams : SsdDims, SsdDtParams<T> {
  using acc = acc_t<T>;
  View<const T, 4> x;     // [B, L, H, P]
  View<const T, 4> z;     // [B, L, H, P], or data nullptr
  View<const T, 4> dout;  // [B, L, H, P]
  const acc* D;           // [H, P] or nullptr
  const int32_t* seg;     // [B, nc * Q] or nullptr
  const acc* e;           // [B, nc, H, Q]
  const acc* r;           // [B, nc, H, Q]
  const acc* dtv;         // [B, nc, H, Q]
  const acc* dacs;        // [B, nc, H, Q]
  const acc* ddecay;      // [B, nc, H, nsplit]
  int64_t nsplit;
  const acc* xdt;         // [B, nc, H, Q, P] dt x
  const acc* dxdt;        // [B, nc, H, Q, P] GL^T dy (intra part of d loss / d (dt x))
  const acc* dy;          // [B, nc, H, Q, P] d loss / d y (y before the z gate)
  const acc* dyrT;        // [B, nc, H, P, Q] dy^T scaled by r
  const acc* zT;          // [B, nc, H, P, Q] (B dH_c^T)^T: state part of d loss / d (dt x), before e
  const acc* y_intra;     // [B, nc, H, Q, P], only read with z (else nullptr)
  const acc* y_interT;    // [B, nc, H, P, Q]
  T* dx;                  // [B, L, H, P] contiguous
  acc* ddt;               // [B, L, H] contiguous (gradient of raw dt)
  T* dz;                  // [B, L, H, P] contiguous, or nullptr
  acc* dA_part;           // [B, nc, H]
  acc* dD_part;           // [B, nc, H, P] or nullptr

  // Task i's (one (batch, chunk, head), the order of the per-chunk buffers) slices of them.
  struct TaskSlices {
    const acc *xdt, *dxdt, *dy, *zT, *dyrT, *y_interT, *e, *r, *dtv, *dacs;
  };
  SSMK_HOST_DEVICE TaskSlices task_slices(int64_t i) const {
    const int64_t QP = chunk * headdim, Q = chunk;
    return {xdt + i * QP, dxdt + i * QP, dy + i * QP, zT + i * QP, dyrT + i * QP,
            y_interT + i * QP, e + i * Q, r + i * Q, dtv + i * Q, dacs + i * Q};
  }
};

#if defined(SSMK_WITH_CUDA)
namespace ssd {

constexpr int kCudaThreads = 256;  // the scan kernel's block: one thread per state element

// The scan's splits of a (batch, head) row on CUDA: the size of ddecay's last dim.
inline int64_t cuda_scan_splits(const SsdDims& d) {
  return (d.headdim * d.dstate + kCudaThreads - 1) / kCudaThreads;
}

}  // namespace ssd

// Launchers (ssd_cuda.cu). They never throw; the host checks launch errors.
template <typename T> void ssd_prep_cuda(const SsdPrepParams<T>& p, const CudaContext& ctx);
template <typename Acc> void ssd_build_gl_cuda(const SsdGlParams<Acc>& p, Acc* gl, const CudaContext& ctx);  // gl [tasks, Q, Q]
template <typename Acc> void ssd_scan_fwd_cuda(const SsdScanParams<Acc>& p, const CudaContext& ctx);
template <typename Acc> void ssd_scan_bwd_cuda(const SsdScanBwdParams<Acc>& p, const CudaContext& ctx);
template <typename T> void ssd_epilogue_cuda(const SsdFwdParams<T>& p, const CudaContext& ctx);
template <typename Acc> void ssd_wsum_cuda(const SsdWsumParams<Acc>& p, Acc* dgl, const CudaContext& ctx);  // dgl [tasks, Q, Q]
template <typename T> void ssd_final_cuda(const SsdBwdParams<T>& p, const CudaContext& ctx);

// The tensor-core GEMM with T's operand precision (float16, bfloat16; 3xTF32 for float32).
// Returns false, launching nothing, where the sizes pass its 32-bit in-matrix offsets.
template <typename T> bool ssd_gemm_cuda(const cuda::BatchedGemmParams& g, const CudaContext& ctx);
// out = GL @ rhs (transposed = false) or GL^T @ rhs (true), GL computed in the GEMM's operand
// loads from `gl`; g's A is a view of CB whose strides set the walk (k contiguous for GL, m for
// GL^T). Returns false like ssd_gemm_cuda.
template <typename T> bool ssd_gl_gemm_cuda(const cuda::BatchedGemmParams& g, const SsdGlParams<float>& gl, bool transposed,
                      const CudaContext& ctx);
#endif

}  // namespace ssmk
