// mamba3_task.h's staged scan (the code the GPU runs, a stage per kernel) on the CPU, for the test
// hook mamba3_cpu_task_kernels: the CPU tests then check that code as well as the blocked CPU
// kernels of mamba3_cpu.cpp. The stages run in order, each over its items (tasks, or chunks) in
// parallel (or, under the hook mamba3_cpu_task_order_reversed, one after the other from the last),
// and each phase of an item with SerialLanes::kEmulated lanes one after the other, so the tests
// also check how every phase splits its items across a block's threads. The buffers and work
// areas start NaN-filled, as the GPU's start with whatever memory held: a product that reads
// padding nobody zeroed, or a stage that reads what no earlier stage wrote, fails the tests.
#include "common/aten.h"
#include <ATen/Parallel.h>

#include <atomic>
#include <limits>
#include <vector>

#include "common/parallel.h"
#include "mamba3/mamba3_task.h"

namespace ssmk {
namespace {

// The GPU's tensor-core loads need every product buffer 32-byte aligned: each must start a whole
// number of tiles' rows (kTile elements) into its work area, which must start so in the buffers
// (`buf`, carved from `base`), and all must fit in Work::size.
template <typename acc>
void check_layout(const Mamba3Dims& d, bool grads, const mamba3::ChunkBuffers<acc>& buf, const acc* base) {
  std::vector<acc> area(buf.work_size);
  const mamba3::Work<acc> wk(d, area.data(), grads);
  const int64_t M = wk.M, ldN = wk.ldN, ldP = wk.ldP;
  struct Buffer {
    const acc* at;
    int64_t size;
  };
  const Buffer fwd[] = {{wk.q, M * ldN},  {wk.k, M * ldN},  {wk.x, M * ldP},  {wk.cb, M * M},
                        {wk.m, M * M},    {wk.g, M * M},    {wk.qs, M * ldP}, {wk.y, M * ldP},
                        {wk.xw, M * ldP}, {wk.cs, d.chunk * d.nangles}, {wk.ew, d.chunk}};
  const Buffer bwd[] = {{wk.dy, M * ldP}, {wk.dx, M * ldP}, {wk.dys, M * ldP}, {wk.dxy, M * M},
                        {wk.kds, M * ldP}, {wk.dq, M * ldN}, {wk.dk, M * ldN}, {wk.dm, M * M}};
  const auto check = [&](const Buffer& b) {
    const int64_t offset = b.at - area.data();
    TORCH_CHECK(offset % kTile == 0 && offset + b.size <= mamba3::Work<acc>::size(d, grads),
                "mamba3 Work layout: a buffer at element ", offset, " of ", b.size, " elements in an area of ",
                mamba3::Work<acc>::size(d, grads));
  };
  for (const Buffer& b : fwd) check(b);
  if (grads) {
    for (const Buffer& b : bwd) check(b);
  }
  // The states (tile operands) and the work areas start on tiles, as every part of the buffers.
  for (const acc* part : {buf.states, buf.decay, buf.thetas, buf.dstates, buf.dinit, buf.sums, buf.work}) {
    TORCH_CHECK(!part || (part - base) % kTile == 0, "mamba3 ChunkBuffers layout: a part at element ", part - base);
  }
  TORCH_CHECK(buf.work_size % kTile == 0, "mamba3 chunk work area: not a whole number of tiles");
}

std::atomic<bool> g_reversed{false};

// Runs f(item) for the items 0 .. count-1: in parallel in order, or (g_reversed) one after the
// other from the last.
template <typename F>
void for_items(int64_t count, int64_t item_cost, const F& f) {
  if (g_reversed) {
    for (int64_t item = count - 1; item >= 0; --item) f(item);
    return;
  }
  cpu::parallel_items(count, item_cost, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) f(item);
  });
}

// Runs the stages (mamba3::run_fwd_stages / run_bwd_stages) on the CPU.
template <template <typename> class Params, typename T>
struct HookRunner {
  using acc = acc_t<T>;
  const Params<T>& p;
  bool grads;
  std::vector<acc> area;
  mamba3::ChunkBuffers<acc> buf;
  const mamba3::SerialLanes lanes{mamba3::SerialLanes::kEmulated};

  HookRunner(const Params<T>& params, bool g)
      : p(params), grads(g), area(mamba3::ChunkBuffers<acc>(params, g, 0, nullptr).size, kNaN),
        buf(params, g, 0, area.data()) {
    check_layout<acc>(params, g, buf, area.data());
  }
  static constexpr acc kNaN = std::numeric_limits<acc>::quiet_NaN();

  template <mamba3::Stage kStage>
  void tasks() {
    for_items(p.tasks(), p.seqlen * p.nangles + p.headdim_v,
              [&](int64_t task) { mamba3::task_stage<kStage>(p, task, buf, lanes); });
  }
  template <mamba3::Stage kStage>
  void elements() {
    for_items(p.tasks(), p.seqlen * p.headdim_v, [&](int64_t task) {
      lanes([&](int64_t lane, int64_t n) { mamba3::element_stage<kStage>(p, task, buf, lane, n); });
    });
  }
  // Every chunk in a work area of its own, NaN-filled (a work area that a chunk reads before it
  // writes fails the tests whichever chunk used it last).
  template <mamba3::Stage kStage>
  void chunks() {
    const int64_t slots = mamba3::bwd_state_slots(p);
    for_items(slots, p.chunk * p.headdim_v * p.headdim_qk, [&](int64_t slot) {
      const mamba3::ChunkRef ch = mamba3::chunk_at_slot(p, slot);
      if (!ch.valid()) return;
      std::vector<acc> work(buf.work_size, kNaN);
      mamba3::ChunkWork<acc> cw(p, work.data(), grads);
      mamba3::chunk_stage<kStage>(p, ch, buf, cw, lanes);
    });
  }
};

}  // namespace

bool mamba3_cpu_task_order_reversed(bool on) { return g_reversed.exchange(on); }

template <typename T>
void mamba3_fwd_task_kernels_cpu(const Mamba3FwdParams<T>& p) {
  HookRunner<Mamba3FwdParams, T> runner(p, false);
  mamba3::run_fwd_stages(runner);
}

template <typename T>
void mamba3_bwd_task_kernels_cpu(const Mamba3BwdParams<T>& p) {
  HookRunner<Mamba3BwdParams, T> runner(p, true);
  mamba3::run_bwd_stages(runner);
}

#define SSMK_MAMBA3_INSTANTIATE(T)                                               \
  template void mamba3_fwd_task_kernels_cpu<T>(const Mamba3FwdParams<T>&);     \
  template void mamba3_bwd_task_kernels_cpu<T>(const Mamba3BwdParams<T>&);
SSMK_MAMBA3_INSTANTIATE(float)
SSMK_MAMBA3_INSTANTIATE(double)
#undef SSMK_MAMBA3_INSTANTIATE

}  // namespace ssmk
