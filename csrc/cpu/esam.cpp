// CPU implementation of ESAM's stochastic weight perturbation (schemas: csrc/ops.cpp; plans and
// checks: csrc/mt_plan.h; kernels: csrc/cpu/kernels/esam.cpp). esam_perturb_ is two passes:
// the norm of the kept gradients (one partial per chunk, summed in chunk order), then the
// perturbation. Both regenerate the keep mask from (seed, offset); nothing is stored.
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"

namespace saf::cpu {

namespace {

// The partial-sum stage of esam_perturb_: the sum of (keep T g)^2, one partial per chunk summed
// in chunk order (the same bits whatever the thread count).
double local_sumsq(const mt::Plan& plan, const MtKernels& k, uint64_t key, uint64_t off) {
  const auto partial = chunk_partials<1>(plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
    *out = k.esam_norm(t, start, n, key, off);
  });
  return ordered_sums<1>(partial)[0];
}

}  // namespace

at::Tensor esam_sumsq_cpu(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                          at::ArrayRef<double> beta, at::IntArrayRef flags, int64_t seed, int64_t offset) {
  const mt::Plan plan = mt::esam_sumsq_plan(params, grads, eta, beta, flags, offset, kCpuChunk);
  return at::scalar_tensor(local_sumsq(plan, mt_kernels(), mt::philox_key(seed), uint64_t(offset)),
                           at::TensorOptions().dtype(at::kDouble));
}

at::Tensor esam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash,
                            at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                            at::IntArrayRef flags, double eps, int64_t seed, int64_t offset, int64_t stash_mode,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::esam_perturb_plan(params, grads, stash, rho, eta, beta, flags, eps, offset, stash_mode,
                                              grad_scale, found_inf, kCpuChunk);
  mt::check_sumsq(params, sumsq, "saf_kernels.esam_perturb_");
  const MtKernels k = mt_kernels();
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  // Sharded: the all-reduced sum of every shard's partials is given; else this list's own.
  const double total = sumsq.has_value() ? sumsq->item<double>() : local_sumsq(plan, k, key, off);
  const mt::SamCoef sc = mt::sam_coef(total, inv_scale_of(grad_scale), eps, found_inf_of(found_inf));
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.esam_perturb(t, start, n, sc.coef, stash_mode, key, off);
  });
  mt::bump_versions(params, stash);
  return norm_result(sc.norm, params);
}

void esam_restore_cpu(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t seed,
                      int64_t offset, int64_t stash_mode) {
  const mt::Plan plan = mt::esam_restore_plan(params, stash, beta, offset, stash_mode, kCpuChunk);
  const MtKernels k = mt_kernels();
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.esam_restore(t, start, n, stash_mode, key, off);
  });
  mt::bump_versions(params);
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("esam_perturb_", &esam_perturb_cpu);
  m.impl("esam_sumsq", &esam_sumsq_cpu);
  m.impl("esam_restore_", &esam_restore_cpu);
}

}  // namespace saf::cpu
