// mamba3_scan / mamba3_step: typed kernel parameters and the kernel launchers.
//
// The host (mamba3_op.cpp) normalises SISO inputs to rank R = 1 (q, k [B, L, 1, G, N]) and converts
// the small per-step and per-head tensors to contiguous accumulation-dtype buffers; q, k, v, z and
// dout are read through strided views in the input dtype. A task is one (batch, value head), in
// chunks (mamba3_math.h); with cu_seqlens (batch 1) one (sequence, value head) instead: the
// sequence's tokens, in chunks from its own first token, from and to its own state rows. The CPU
// scans a task's chunks in order (mamba3_cpu.cpp), the GPU all chunks at once in the stages of
// mamba3_task.h.
#pragma once

#include <cstdint>

#include "common/types.h"
#include "mamba3/mamba3_math.h"

namespace ssmk {

// The tokens [start, end) of batch row b that one task scans under value head h. The task's index
// (state row times nheads plus h) is the row of its initial and final states and of its partial
// parameter gradients.
struct Mamba3Span {
  int64_t b, h, start, end;
};

struct Mamba3Dims {
  int64_t batch, seqlen, nheads, ngroups, rank, headdim_qk, headdim_v, nangles, chunk;
  bool mimo;                  // mixing weights given (else R = 1 and v, z, out are not mixed)
  const int64_t* cu_seqlens;  // [num_seqs + 1] on the kernels' device, or nullptr
  int64_t num_seqs;           // 0 without cu_seqlens
  // State rows: one per batch row, or one per sequence.
  SSMK_HOST_DEVICE int64_t state_rows() const { return cu_seqlens ? num_seqs : batch; }
  SSMK_HOST_DEVICE int64_t tasks() const { return state_rows() * nheads; }
  // Chunks of the longest possible task (a sequence's chunks start at its first token).
  SSMK_HOST_DEVICE int64_t nchunks() const { return (seqlen + chunk - 1) / chunk; }
  // The offsets are clamped into [0, seqlen], so content the host did not check (CUDA) gives
  // unspecified values but never an out-of-bounds access (common/varlen.h).
  SSMK_HOST_DEVICE Mamba3Span span(int64_t task) const {
    const int64_t row = task / nheads, h = task % nheads;
    if (!cu_seqlens) return Mamba3Span{row, h, 0, seqlen};
    const int64_t start = clamp(cu_seqlens[row], 0, seqlen);
    return Mamba3Span{0, h, start, clamp(cu_seqlens[row + 1], start, seqlen)};
  }
  static SSMK_HOST_DEVICE int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

// The per-step and per-head coefficients, contiguous in the accumulation dtype. Layouts of the
// scan; the step's drop the L axis (adt, dt, trap [B, H], angles [B, H, A]).
template <typename Acc>
struct Mamba3Coeffs {
  const Acc* adt;          // [B, H, L]
  const Acc* dt;           // [B, H, L]
  const Acc* trap;         // [B, H, L] (before the sigmoid)
  const Acc* angles;       // [B, L, H, A] or nullptr (A = 0)
  const Acc* q_bias;       // [H, R, N] or nullptr
  const Acc* k_bias;       // [H, R, N] or nullptr
  const Acc* D;            // [H] or nullptr
  const Acc* mimo_v;       // [H, R, P] (mimo only)
  const Acc* mimo_z;       // [H, R, P] (mimo with z only)
  const Acc* mimo_o;       // [H, R, P] (mimo only)
};

template <typename T>
struct Mamba3Inputs : Mamba3Dims, Mamba3Coeffs<acc_t<T>> {
  using acc = acc_t<T>;
  View<const T, 5> q, k;   // [B, L, R, G, N]
  View<const T, 4> v;      // [B, L, H, P]
  View<const T, 4> z;      // [B, L, H, P], or data nullptr
  // The state layouts here and below: [Bs, ...] with Bs = state_rows() (num_seqs with cu_seqlens).
  const acc* init_angle;   // [Bs, H, A] or nullptr (zeros)
  const acc* init_ssm;     // [Bs, H, P, N] or nullptr
  const acc* init_k;       // [Bs, H, R, N] or nullptr
  const acc* init_v;       // [Bs, H, R, P] or nullptr
};

template <typename T>
struct Mamba3FwdParams : Mamba3Inputs<T> {
  using acc = acc_t<T>;
  T* out;             // [B, L, H, P] contiguous
  acc* final_angle;   // [Bs, H, A]
  acc* final_ssm;     // [Bs, H, P, N]
  acc* final_k;       // [Bs, H, R, N]
  acc* final_v;       // [Bs, H, R, P]
  // Kept for the CPU backward (nullptr on CUDA, whose backward recomputes them): the state
  // before every chunk, in the slots of mamba3_task.h's bwd_state_slot, and y before the gate.
  acc* chunk_states;  // [bwd_state_slots, P, N] or nullptr
  acc* gate_input;    // [B, H, L, R, P] or nullptr
};

// Gradients are written per task (no reduction across tasks in a kernel): the host sums dq, dk
// over the heads of a group and the per-head parameters' parts over the state rows.
template <typename T>
struct Mamba3BwdParams : Mamba3Inputs<T> {
  using acc = acc_t<T>;
  View<const T, 4> dout;      // [B, L, H, P]
  const acc* dfinal_angle;    // [Bs, H, A] or nullptr
  const acc* dfinal_ssm;      // [Bs, H, P, N] or nullptr
  const acc* dfinal_k;        // [Bs, H, R, N] or nullptr
  const acc* dfinal_v;        // [Bs, H, R, P] or nullptr
  const acc* chunk_states;    // the forward's (Mamba3FwdParams), or nullptr: recomputed
  const acc* gate_input;      // the forward's, or nullptr: recomputed
  acc* dq;                    // [B, L, R, H, N] per value head
  acc* dk;                    // [B, L, R, H, N]
  T* dv;                      // [B, L, H, P] contiguous
  T* dz;                      // [B, L, H, P] contiguous, or nullptr
  acc* dadt;                  // [B, H, L]
  acc* ddt;                   // [B, H, L]
  acc* dtrap;                 // [B, H, L] (holds d lambda until its task ends: trap_grads)
  acc* dangles;               // [B, L, H, A] or nullptr
  acc* dq_bias;               // [Bs, H, R, N] per state row
  acc* dk_bias;               // [Bs, H, R, N]
  acc* dD;                    // [Bs, H]
  acc* dmimo_v;               // [Bs, H, R, P] (mimo only)
  acc* dmimo_z;               // [Bs, H, R, P] (mimo with z only)
  acc* dmimo_o;               // [Bs, H, R, P] (mimo only)
  acc* dinit_angle;           // [Bs, H, A]
  acc* dinit_ssm;             // [Bs, H, P, N]
  acc* dinit_k;               // [Bs, H, R, N]
  acc* dinit_v;               // [Bs, H, R, P]
};

// One decode step, updating the states in place; row i of the batch uses state row
// state_batch_indices[i] (or i), and a negative (or, on CUDA, out-of-range) index writes zeros.
template <typename T>
struct Mamba3StepParams : Mamba3Dims, Mamba3Coeffs<acc_t<T>> {
  using acc = acc_t<T>;
  int64_t state_batch;        // Bs (seqlen and chunk are 1, no cu_seqlens)
  View<acc, 3> angle_state;   // [Bs, H, A]
  View<acc, 4> ssm_state;     // [Bs, H, P, N]
  View<acc, 4> k_state;       // [Bs, H, R, N]
  View<acc, 4> v_state;       // [Bs, H, R, P]
  View<const T, 5> q, k;      // [B, 1, R, G, N]: the scan's layouts with L = 1 (mamba3_task.h's
  View<const T, 4> v;         // [B, 1, H, P]     chunk_rows loads both)
  View<const T, 3> z;         // [B, H, P] or data nullptr
  const int64_t* state_batch_indices;  // [B] or nullptr
  T* out;                     // [B, H, P] contiguous
};

// The scan's CPU kernels for T = float and double; the op widens half and bfloat16 inputs to
// float (mamba3_op.cpp, widened_on_cpu). The step's for every float type.
template <typename T>
void mamba3_fwd_cpu(const Mamba3FwdParams<T>& p);
template <typename T>
void mamba3_bwd_cpu(const Mamba3BwdParams<T>& p);
template <typename T>
void mamba3_step_cpu(const Mamba3StepParams<T>& p);
// Test hook: when on, mamba3_fwd_cpu / mamba3_bwd_cpu run mamba3_task.h's stages (the GPU's code)
// instead of the blocked CPU kernels, and they and mamba3_step_cpu run each phase with several
// emulated lanes (the GPU block's split of the items), so the CPU tests cover that code too.
// Returns the previous setting.
bool mamba3_cpu_task_kernels(bool on);
// Those stages on the CPU (mamba3_cpu_tasks.cpp; a file of their own, compiled once without AVX2
// copies: they only serve that test hook). Test hook: when on, each stage runs its items one after
// the other in reverse order instead of in parallel in order, so that a stage reading what another
// item of the same stage writes (which the GPU runs in any order, or at once) fails one of the two
// orders. Returns the previous setting.
bool mamba3_cpu_task_order_reversed(bool on);
template <typename T>
void mamba3_fwd_task_kernels_cpu(const Mamba3FwdParams<T>& p);
template <typename T>
void mamba3_bwd_task_kernels_cpu(const Mamba3BwdParams<T>& p);

#if defined(SSMK_WITH_CUDA)
// Launchers (mamba3_cuda.cu). The scan's `scratch` holds mamba3_task.h's ChunkBuffers for
// chunk_blocks(p, grads, ctx.sms) blocks (ChunkBuffers::size elements), the step's batch x nheads x
// step_scratch(p) elements. They never throw; the host checks launch errors.
template <typename T>
void mamba3_fwd_cuda(const Mamba3FwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx);
template <typename T>
void mamba3_bwd_cuda(const Mamba3BwdParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx);
template <typename T>
void mamba3_step_cuda(const Mamba3StepParams<T>& p, acc_t<T>* scratch, const CudaContext& ctx);
#endif

}  // namespace ssmk
