// CPU implementation of the LookSAM ops (schemas: csrc/ops.cpp; plans in GSAM's slots:
// csrc/mt_plan.h; kernels: csrc/cpu/kernels/looksam.cpp and GSAM's / SAM's chunk kernels).
// looksam_gv_: GSAM's partial sums <g, g_s>, |g|^2, |g_s|^2 (summed in chunk order: deterministic),
// the coefficient (saf::mt::looksam_gv_coef), then one pass writing gv and summing |gv|^2 (skipped
// when the coefficient does not apply). looksam_combine_: SAM's sum of squares of g, the
// coefficient (saf::mt::looksam_combine_coef), then GSAM's combine pass g = 1 g + coef gv.
#include <torch/library.h>

#include <array>
#include <cmath>

#include "cpu/multi_tensor.h"

namespace saf::cpu {

at::Tensor looksam_gv_cpu(at::TensorList gv, const at::Tensor& gv_norm, at::TensorList grads, at::TensorList old_grads,
                          double eps, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::looksam_gv_plan(gv, gv_norm, grads, old_grads, eps, kCpuChunk);
  mt::check_sums(gv, sums, "saf_kernels.looksam_gv_");
  if (gv.empty()) return at::zeros({3});
  const MtKernels k = mt_kernels();
  std::array<double, 3> s{};
  if (sums.has_value()) {  // sharded: the all-reduced sums of every shard's partials
    const at::Tensor v = sums->to(at::kDouble).reshape({3}).cpu();
    for (int j = 0; j < 3; ++j) s[j] = v[j].item<double>();
  } else {
    s = ordered_sums<3>(chunk_partials<3>(
        plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) { k.gsam_dots(t, start, n, out); }));
  }
  const mt::LookSamGvCoef c = mt::looksam_gv_coef(s[0], s[1], s[2], eps);
  if (c.ok) {
    const auto v = ordered_sums<1>(
        chunk_partials<1>(plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
          out[0] = k.looksam_gv(t, start, n, c.c);
        }));
    set_state_scalar(gv_norm, std::sqrt(v[0]));
    mt::bump_versions(gv);
  }
  return stats_result({c.cos, c.norm_old, c.norm_new}, gv);
}

at::Tensor looksam_combine_cpu(at::TensorList grads, at::TensorList gv, const at::Tensor& gv_norm, double alpha,
                               double eps, const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::looksam_combine_plan(grads, gv, gv_norm, alpha, eps, kCpuChunk);
  mt::check_sumsq(grads, sumsq, "saf_kernels.looksam_combine_");
  if (grads.empty()) return at::zeros({});
  const MtKernels k = mt_kernels();
  const double gg = sumsq.has_value() ? sumsq->item<double>()
                                      : ordered_sums<1>(chunk_partials<1>(plan, [&](const mt::TensorEntry& t,
                                                                                    int64_t start, int64_t n,
                                                                                    double* out) {
                                          out[0] = k.sam_norm(t, start, n);
                                        }))[0];
  const mt::LookSamCombineCoef c = mt::looksam_combine_coef(gg, gv_norm.item<double>(), alpha, eps);
  if (c.ok) {
    parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
      k.gsam_combine(t, start, n, 1.0, c.coef, true, false, mt::sam::COPY);
    });
    mt::bump_versions(grads);
  }
  return norm_result(c.norm, grads);
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("looksam_gv_", &looksam_gv_cpu);
  m.impl("looksam_combine_", &looksam_combine_cpu);
}

}  // namespace saf::cpu
