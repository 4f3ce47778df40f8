// CPU side of the multi-tensor machinery: the per-instruction-set kernel table and a parallel
// loop over the chunks of a plan, balanced by elements (tensors of a model range from 64 to
// millions of elements, so an even split of chunk indices would not balance).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/kernels/kernels.h"
#include "mt_plan.h"

namespace saf::cpu {

// Chunk length of the CPU kernels: large enough that the per-chunk overhead vanishes, small
// enough that a model's chunks spread over the threads.
constexpr int64_t kCpuChunk = 16384;
constexpr int64_t kMinTaskElements = 65536;

struct MtKernels {
  decltype(&DEFAULT::sam_norm_chunk) sam_norm;
  decltype(&DEFAULT::sam_perturb_chunk) sam_perturb;
  decltype(&DEFAULT::sam_restore_chunk) sam_restore;
  decltype(&DEFAULT::sam_restore_sgd_chunk) sam_restore_sgd;
  decltype(&DEFAULT::sam_restore_adamw_chunk) sam_restore_adamw;
  decltype(&DEFAULT::ema_chunk) ema;
};

#define SAF_MT_TABLE(NS)                                                                                  \
  MtKernels {                                                                                             \
    &NS::sam_norm_chunk, &NS::sam_perturb_chunk, &NS::sam_restore_chunk, &NS::sam_restore_sgd_chunk,       \
        &NS::sam_restore_adamw_chunk, &NS::ema_chunk                                                      \
  }

inline MtKernels mt_kernels() {
#if defined(SAF_KERNELS_X86)
  const Isa isa = cpu_isa();
  if (isa == Isa::AVX512) return SAF_MT_TABLE(AVX512);
  if (isa == Isa::AVX2) return SAF_MT_TABLE(AVX2);
#endif
  return SAF_MT_TABLE(DEFAULT);
}
#undef SAF_MT_TABLE

// Calls f(chunk_index, entry, start, n) for every chunk of the plan, in parallel. Chunks are
// split into contiguous ranges of about equal element counts; what f computes per chunk does not
// depend on the split, so reductions stay deterministic.
template <typename F>
void parallel_chunks(const mt::Plan& plan, F f) {
  const int64_t nc = plan.n_chunks();
  if (nc == 0) return;
  const int64_t total = plan.total_elements();
  const int64_t threads = at::get_num_threads();
  // At least kMinTaskElements per task: below that, waking a second thread costs more than the
  // work (and on a loaded machine the wait for its time slice costs milliseconds), as ATen's
  // GRAIN_SIZE reasons for its own element-wise ops.
  const int64_t tasks = std::min<int64_t>({nc, threads * 4, std::max<int64_t>(1, total / kMinTaskElements)});
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const mt::ChunkEntry& ce = plan.chunk(c);
      f(c, plan.entry(ce.tensor), int64_t(ce.chunk) * plan.chunk_size(), plan.chunk_len(c));
    }
  };
  if (tasks <= 1) {
    run(0, nc);
    return;
  }
  // Range boundaries at (about) every total / tasks elements.
  std::vector<int64_t> bounds(tasks + 1, nc);
  bounds[0] = 0;
  int64_t acc = 0, k = 1;
  for (int64_t c = 0; c < nc && k < tasks; ++c) {
    acc += plan.chunk_len(c);
    if (acc * tasks >= k * total) bounds[k++] = c + 1;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run(bounds[t], bounds[t + 1]);
  });
}

}  // namespace saf::cpu
