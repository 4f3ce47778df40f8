// CPU implementation of the R-SAM ops (schemas: csrc/ops.cpp; plans: csrc/mt_plan.h;
// kernels: csrc/cpu/kernels/rsam.cpp). rsam_noise_ runs over row-aligned chunks (each task owns
// whole output units, so their norms need no second pass); rsam_perturb_ is a norm pass and a
// perturbation pass over plain chunks, as sam_perturb_.
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"

namespace saf::cpu {

void rsam_noise_cpu(at::TensorList params, at::TensorList stash, at::ArrayRef<double> stdev, int64_t seed,
                    int64_t offset) {
  const mt::Plan plan = mt::rsam_noise_plan(params, stash, stdev, offset, kCpuChunk);
  const MtKernels k = mt_kernels();
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  parallel_chunks(
      plan,
      [&](int64_t c, const mt::TensorEntry& t, int64_t, int64_t) {
        int64_t r0, nr;
        plan.rows_of(c, r0, nr);
        k.rsam_noise(t, r0, nr, key, off);
      },
      kCpuChunk);
  mt::bump_versions(params, stash);
}

namespace {

// The partial-sum stage of rsam_perturb_: the sum of d^2 (unscaled), one partial per chunk summed
// in chunk order (the same bits whatever the thread count).
double local_sumsq(const mt::Plan& plan, const MtKernels& k, double lam, double inv) {
  const auto partial = chunk_partials<1>(plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
    *out = k.rsam_norm(t, start, n, lam, inv);
  });
  return ordered_sums<1>(partial)[0];
}

}  // namespace

at::Tensor rsam_sumsq_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash, double lam,
                          const std::optional<at::Tensor>& grad_scale) {
  const mt::Plan plan = mt::rsam_sumsq_plan(params, grads, stash, lam, grad_scale, std::nullopt, kCpuChunk);
  return at::scalar_tensor(local_sumsq(plan, mt_kernels(), lam, inv_scale_of(grad_scale)),
                           at::TensorOptions().dtype(at::kDouble));
}

at::Tensor rsam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash,
                            at::ArrayRef<double> rho, double lam, double eps,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::rsam_perturb_plan(params, grads, stash, rho, lam, eps, grad_scale, found_inf, kCpuChunk);
  mt::check_sumsq(params, sumsq, "saf_kernels.rsam_perturb_");
  const MtKernels k = mt_kernels();
  const double inv = inv_scale_of(grad_scale);
  // Sharded: the all-reduced sum of every shard's partials is given; else this list's own.
  const double total = sumsq.has_value() ? sumsq->item<double>() : local_sumsq(plan, k, lam, inv);
  // d is already unscaled: the coefficient of sam_coef with inv_scale = 1.
  const mt::SamCoef sc = mt::sam_coef(total, 1.0, eps, found_inf_of(found_inf));
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.rsam_perturb(t, start, n, lam, inv, sc.coef);
  });
  mt::bump_versions(params);
  return norm_result(sc.norm, params);
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("rsam_noise_", &rsam_noise_cpu);
  m.impl("rsam_perturb_", &rsam_perturb_cpu);
  m.impl("rsam_sumsq", &rsam_sumsq_cpu);
}

}  // namespace saf::cpu
