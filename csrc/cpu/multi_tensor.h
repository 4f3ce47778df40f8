// CPU side of the multi-tensor machinery, shared by every multi-tensor op (csrc/cpu/{sam,ema,
// esam,rsam,gsam}.cpp): the per-instruction-set kernel table, a parallel loop over the chunks of
// a plan balanced by elements (tensors of a model range from 64 to millions of elements, so an
// even split of chunk indices would not balance), and the two stages of a reduction (per-chunk
// partial sums, then their sum in chunk order: the same bits whatever the thread count).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/kernels/kernels.h"
#include "mt_plan.h"

namespace saf::cpu {

// Chunk length of the CPU kernels: large enough that the per-chunk overhead vanishes, small
// enough that a model's chunks spread over the threads.
constexpr int64_t kCpuChunk = 16384;
constexpr int64_t kMinTaskElements = 65536;

// The chunk kernels of every multi-tensor op, for this CPU's instruction set.
struct MtKernels {
#define SAF_MT_KERNEL_PTR(name) decltype(&DEFAULT::name##_chunk) name;
  SAF_MT_KERNELS(SAF_MT_KERNEL_PTR)
#undef SAF_MT_KERNEL_PTR
};

#define SAF_MT_KERNEL_ADDR(name) &NS::name##_chunk,
#define SAF_MT_TABLE(ISA)                            \
  [] {                                               \
    namespace NS = ISA;                              \
    return MtKernels{SAF_MT_KERNELS(SAF_MT_KERNEL_ADDR)}; \
  }()

inline MtKernels mt_kernels() {
#if defined(SAF_KERNELS_X86)
  const Isa isa = cpu_isa();
  if (isa == Isa::AVX512) return SAF_MT_TABLE(AVX512);
  if (isa == Isa::AVX2) return SAF_MT_TABLE(AVX2);
#endif
  return SAF_MT_TABLE(DEFAULT);
}
#undef SAF_MT_TABLE
#undef SAF_MT_KERNEL_ADDR

// Calls f(chunk_index, entry, start, n) for every chunk of the plan (element or row chunks: start
// and n in elements), in parallel. Chunks are split into contiguous ranges of about equal element
// counts, at least min_task elements each; what f computes per chunk does not depend on the split,
// so reductions stay deterministic.
template <typename F>
void parallel_chunks(const mt::Plan& plan, F f, int64_t min_task = kMinTaskElements) {
  const int64_t nc = plan.n_chunks();
  if (nc == 0) return;
  const int64_t total = plan.total_elements();
  const int64_t threads = at::get_num_threads();
  // Below min_task elements per task, waking a second thread costs more than the work (and on a
  // loaded machine the wait for its time slice costs milliseconds), as ATen's GRAIN_SIZE reasons
  // for its own element-wise ops.
  const int64_t tasks = std::min<int64_t>({nc, threads * 4, std::max<int64_t>(1, total / min_task)});
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, plan.entry(plan.chunk(c).tensor), plan.chunk_start(c), plan.chunk_len(c));
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

// The two stages of a reduction over the plan, K sums per chunk. Stage 1: f(entry, start, n,
// out) writes chunk c's K partial sums to out (chunk-major, K per chunk), in parallel. Stage 2:
// each sum over the chunks in chunk order (the same bits whatever the thread count).
template <int K, typename F>
std::vector<double> chunk_partials(const mt::Plan& plan, F f) {
  std::vector<double> partial(size_t(plan.n_chunks() * K), 0.0);
  parallel_chunks(plan, [&](int64_t c, const mt::TensorEntry& t, int64_t start, int64_t n) {
    f(t, start, n, partial.data() + c * K);
  });
  return partial;
}

template <int K>
std::array<double, K> ordered_sums(const std::vector<double>& partial) {
  std::array<double, K> s{};
  for (size_t c = 0; c + K <= partial.size(); c += K) {
    for (int j = 0; j < K; ++j) s[j] += partial[c + j];
  }
  return s;
}

// GradScaler's scale and found_inf live on the tensors' device; on CPU reading them costs nothing.
inline double inv_scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0 / grad_scale->item<double>() : 1.0;
}

inline bool found_inf_of(const std::optional<at::Tensor>& found_inf) {
  return found_inf && found_inf->item<double>() > 0;
}

// The norm a perturbation op returns: float64 if any param is, else float32.
inline at::Tensor norm_result(double norm, at::TensorList params) {
  return at::scalar_tensor(norm, at::TensorOptions().dtype(mt::any_f64(params) ? at::kDouble : at::kFloat));
}

// GSAM's and LookSAM's stats ([cos, ||old_g||, ||g||]): float64 if any tensor is, else float32.
inline at::Tensor stats_result(const std::array<double, 3>& v, at::TensorList tensors) {
  const auto dtype = mt::any_f64(tensors) ? at::kDouble : at::kFloat;
  return at::tensor({v[0], v[1], v[2]}, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// A one-element state tensor (LookSAM's gv_norm, Momentum-SAM's inv_norm; dtypes checked by the
// plan) set to x rounded to its dtype; returns the value stored.
inline double set_state_scalar(const at::Tensor& t, double x) {
  double stored = x;
  switch (t.scalar_type()) {
    case at::kDouble: *t.data_ptr<double>() = x; break;
    case at::kHalf: stored = double(*t.data_ptr<at::Half>() = at::Half(float(x))); break;
    case at::kBFloat16: stored = double(*t.data_ptr<at::BFloat16>() = at::BFloat16(float(x))); break;
    default: stored = double(*t.data_ptr<float>() = float(x)); break;
  }
  mt::bump_versions({t});
  return stored;
}

}  // namespace saf::cpu
