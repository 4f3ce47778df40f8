// CPU implementation of the GSAM ops (schemas: csrc/ops.cpp; plans: csrc/mt_plan.h;
// kernels: csrc/cpu/kernels/gsam.cpp): one pass of per-chunk partial sums (<old_g, g>, |old_g|^2,
// |g|^2, summed in chunk order: deterministic), the coefficients (saf::mt::gsam_coef), then one
// pass that writes the combined gradient (and restores), or restores and steps SGD.
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/multi_tensor.h"

namespace saf::cpu {

namespace {

std::array<double, 3> local_sums(const MtKernels& k, const mt::Plan& plan) {
  return ordered_sums<3>(chunk_partials<3>(
      plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) { k.gsam_dots(t, start, n, out); }));
}

mt::GsamCoef gsam_reduce(const MtKernels& k, const mt::Plan& plan, double alpha, double eps,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& old_grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  std::array<double, 3> s{};
  if (sums.has_value()) {
    // Sharded: the all-reduced sums of every shard's partials are given; else this list's own.
    const at::Tensor v = sums->to(at::kDouble).reshape({3}).cpu();
    for (int j = 0; j < 3; ++j) s[j] = v[j].item<double>();
  } else {
    s = local_sums(k, plan);
  }
  return mt::gsam_coef(s[0], s[1], s[2], inv_scale_of(grad_scale), inv_scale_of(old_grad_scale), alpha, eps,
                       found_inf_of(found_inf));
}

at::Tensor gsam_stats(const mt::GsamCoef& c, at::TensorList params) {
  return stats_result({c.cos, c.norm_old, c.norm_new}, params);
}

}  // namespace

at::Tensor gsam_combine_cpu(at::TensorList params, at::TensorList grads, at::TensorList old_grads, at::TensorList stash,
                            double alpha, double eps, int64_t stash_mode, bool restore,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& old_grad_scale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::gsam_combine_plan(params, grads, old_grads, stash, alpha, eps, stash_mode, restore,
                                              grad_scale, old_grad_scale, found_inf, kCpuChunk);
  mt::check_sums(params, sums, "saf_kernels.gsam_combine_");
  const MtKernels k = mt_kernels();
  const mt::GsamCoef c = gsam_reduce(k, plan, alpha, eps, grad_scale, old_grad_scale, found_inf, sums);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.gsam_combine(t, start, n, c.c_new, c.c_old, c.apply, restore, stash_mode);
  });
  if (restore) mt::bump_versions(params);
  if (c.apply) mt::bump_versions(grads);
  return gsam_stats(c, params);
}

at::Tensor gsam_restore_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                                at::TensorList stash, at::TensorList momentum_buffers, at::ArrayRef<double> lr,
                                at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                                at::ArrayRef<double> dampening, at::IntArrayRef flags, double alpha, double eps,
                                int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& old_grad_scale,
                                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::gsam_sgd_plan(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum,
                                          dampening, flags, alpha, eps, stash_mode, grad_scale, old_grad_scale,
                                          found_inf, kCpuChunk);
  mt::check_sums(params, sums, "saf_kernels.gsam_restore_sgd_");
  const MtKernels k = mt_kernels();
  const mt::GsamCoef c = gsam_reduce(k, plan, alpha, eps, grad_scale, old_grad_scale, found_inf, sums);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.gsam_sgd(t, start, n, c.c_new, c.c_old, c.apply, stash_mode);
  });
  mt::bump_versions(params);
  if (c.apply) mt::bump_versions(momentum_buffers);
  return gsam_stats(c, params);
}

at::Tensor gsam_sums_cpu(at::TensorList grads, at::TensorList old_grads) {
  const mt::Plan plan = mt::gsam_sums_plan(grads, old_grads, kCpuChunk);
  const auto s = local_sums(mt_kernels(), plan);
  return at::tensor({s[0], s[1], s[2]}, at::TensorOptions().dtype(at::kDouble));
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("gsam_combine_", &gsam_combine_cpu);
  m.impl("gsam_sums", &gsam_sums_cpu);
  m.impl("gsam_restore_sgd_", &gsam_restore_sgd_cpu);
}

}  // namespace saf::cpu
