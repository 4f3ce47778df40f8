// CPU side of the ESAM / R-SAM / GSAM ops: their per-instruction-set kernel table and a parallel
// loop over the row chunks of a RowPlan (element chunks use parallel_chunks of
// csrc/cpu/multi_tensor.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/kernels/kernels.h"
#include "cpu/multi_tensor.h"
#include "mt_plan_esam.h"

namespace saf::cpu {

struct EsamKernels {
  decltype(&DEFAULT::esam_norm_chunk) esam_norm;
  decltype(&DEFAULT::esam_perturb_chunk) esam_perturb;
  decltype(&DEFAULT::esam_restore_chunk) esam_restore;
  decltype(&DEFAULT::rsam_noise_chunk) rsam_noise;
  decltype(&DEFAULT::rsam_norm_chunk) rsam_norm;
  decltype(&DEFAULT::rsam_perturb_chunk) rsam_perturb;
  decltype(&DEFAULT::gsam_dots_chunk) gsam_dots;
  decltype(&DEFAULT::gsam_combine_chunk) gsam_combine;
  decltype(&DEFAULT::gsam_sgd_chunk) gsam_sgd;
};

#define SAF_ESAM_TABLE(NS)                                                                                   \
  EsamKernels {                                                                                              \
    &NS::esam_norm_chunk, &NS::esam_perturb_chunk, &NS::esam_restore_chunk, &NS::rsam_noise_chunk,           \
        &NS::rsam_norm_chunk, &NS::rsam_perturb_chunk, &NS::gsam_dots_chunk, &NS::gsam_combine_chunk,        \
        &NS::gsam_sgd_chunk                                                                                  \
  }

inline EsamKernels esam_kernels() {
#if defined(SAF_KERNELS_X86)
  const Isa isa = cpu_isa();
  if (isa == Isa::AVX512) return SAF_ESAM_TABLE(AVX512);
  if (isa == Isa::AVX2) return SAF_ESAM_TABLE(AVX2);
#endif
  return SAF_ESAM_TABLE(DEFAULT);
}
#undef SAF_ESAM_TABLE

// Calls f(entry, row0, nrows) for every chunk of a RowPlan, in parallel; ranges of chunks are
// balanced by element count. Each chunk owns whole rows, so the split changes no result.
template <typename F>
void parallel_rows(const mt::RowPlan& plan, F f) {
  const int64_t nc = plan.n_chunks();
  if (nc == 0) return;
  std::vector<int64_t> prefix(nc + 1, 0);
  for (int64_t c = 0; c < nc; ++c) prefix[c + 1] = prefix[c] + plan.chunk_elems(c);
  const int64_t total = prefix[nc];
  const int64_t tasks = std::min<int64_t>({nc, int64_t(at::get_num_threads()) * 4,
                                           std::max<int64_t>(1, total / kCpuChunk)});
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t r0, nr;
      plan.rows_of(c, r0, nr);
      f(plan.entry(plan.chunk(c).tensor), r0, nr);
    }
  };
  if (tasks <= 1) {
    run(0, nc);
    return;
  }
  std::vector<int64_t> bounds(tasks + 1, nc);
  bounds[0] = 0;
  for (int64_t k = 1, c = 0; k < tasks; ++k) {
    while (c < nc && prefix[c] * tasks < k * total) ++c;
    bounds[k] = c;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run(bounds[t], bounds[t + 1]);
  });
}

// GradScaler's scale and found_inf live on the tensors' device; on CPU reading them costs nothing.
inline double inv_scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0 / grad_scale->item<double>() : 1.0;
}

inline bool found_inf_of(const std::optional<at::Tensor>& found_inf) {
  return found_inf && found_inf->item<double>() > 0;
}

// Sum of per-chunk partials in chunk order: the same bits whatever the thread count.
inline double ordered_sum(const std::vector<double>& partial) {
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

}  // namespace saf::cpu
