// CPU implementation of the SAM ops (schemas: csrc/ops.cpp; plans and checks: csrc/mt_plan.h):
// chunks split over threads (csrc/cpu/multi_tensor.h), each chunk handled by the build for
// this CPU's instruction set (csrc/cpu/kernels/sam.cpp).
//
// sam_perturb_ is two passes over the tensors: the sum of squares (one partial per chunk,
// summed in chunk order: the same bits whatever the thread count), then the perturbation.
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"
#include "mt_plan.h"

namespace saf::cpu {

namespace {

// The fused restore + optimizer steps: step(entry, start, n, inv_scale) on every chunk, or, when
// found_inf is set (a skipped step), the restore alone. Returns whether the step ran.
template <typename Step>
bool restore_or_step(const mt::Plan& plan, int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, Step step) {
  const MtKernels k = mt_kernels();
  const bool skip = found_inf_of(found_inf);
  const double inv_scale = inv_scale_of(grad_scale);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    if (skip) {
      k.sam_restore(t, start, n, stash_mode);
    } else {
      step(k, t, start, n, inv_scale);
    }
  });
  return !skip;
}

// The partial-sum stage of sam_perturb_: the sum of (T g)^2 over the plan's chunks, one partial
// per chunk summed in chunk order (the same bits whatever the thread count).
double local_sumsq(const mt::Plan& plan, const MtKernels& k) {
  const auto partial = chunk_partials<1>(plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
    *out = k.sam_norm(t, start, n);
  });
  return ordered_sums<1>(partial)[0];
}

}  // namespace

at::Tensor sam_sumsq_cpu(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                         at::IntArrayRef flags) {
  const mt::Plan plan = mt::sam_sumsq_plan(params, grads, eta, flags, kCpuChunk);
  return at::scalar_tensor(local_sumsq(plan, mt_kernels()), at::TensorOptions().dtype(at::kDouble));
}

at::Tensor sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash, at::ArrayRef<double> rho,
                           at::ArrayRef<double> eta, at::IntArrayRef flags, double eps, int64_t stash_mode,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan =
      mt::sam_perturb_plan(params, grads, stash, rho, eta, flags, eps, stash_mode, grad_scale, found_inf, kCpuChunk);
  mt::check_sumsq(params, sumsq, "saf_kernels.sam_perturb_");
  const MtKernels k = mt_kernels();
  // Sharded: the all-reduced sum of every shard's partials is given; else this list's own.
  const double total = sumsq.has_value() ? sumsq->item<double>() : local_sumsq(plan, k);
  const mt::SamCoef sc = mt::sam_coef(total, inv_scale_of(grad_scale), eps, found_inf_of(found_inf));
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_perturb(t, start, n, sc.coef, stash_mode);
  });
  mt::bump_versions(params, stash);
  return norm_result(sc.norm, params);
}

void sam_restore_cpu(at::TensorList params, at::TensorList stash, int64_t stash_mode) {
  const mt::Plan plan = mt::sam_restore_plan(params, stash, stash_mode, kCpuChunk);
  const MtKernels k = mt_kernels();
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_restore(t, start, n, stash_mode);
  });
  mt::bump_versions(params);
}

void sam_restore_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash,
                         at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                         int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::sam_sgd_plan(params, grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening,
                                         flags, stash_mode, grad_scale, found_inf, kCpuChunk);
  const bool stepped = restore_or_step(
      plan, stash_mode, grad_scale, found_inf,
      [&](const MtKernels& k, const mt::TensorEntry& t, int64_t start, int64_t n, double inv_scale) {
        k.sam_restore_sgd(t, start, n, stash_mode, inv_scale);
      });
  mt::bump_versions(params);
  if (stepped) mt::bump_versions(momentum_buffers);
}

void sam_restore_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList steps, at::ArrayRef<double> lr,
                           at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                           at::ArrayRef<double> weight_decay, at::IntArrayRef flags, int64_t stash_mode,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::sam_adamw_plan(params, grads, stash, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps,
                                           weight_decay, flags, stash_mode, grad_scale, found_inf, kCpuChunk);
  const bool stepped = restore_or_step(
      plan, stash_mode, grad_scale, found_inf,
      [&](const MtKernels& k, const mt::TensorEntry& t, int64_t start, int64_t n, double inv_scale) {
        k.sam_restore_adamw(t, start, n, stash_mode, inv_scale);
      });
  mt::bump_versions(params);
  if (stepped) {
    mt::bump_versions(exp_avg, exp_avg_sq);
  }
}

at::Tensor sam_perturb_plan_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash,
                                at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::IntArrayRef flags,
                                int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size > 0, "chunk_size must be > 0");
  const mt::Plan plan = mt::sam_perturb_plan(params, grads, stash, rho, eta, flags, 1e-12, mt::sam::COPY,
                                             std::nullopt, std::nullopt, chunk_size);
  at::Tensor out = at::empty({plan.bytes()}, at::TensorOptions().dtype(at::kByte));
  plan.write(out.data_ptr<uint8_t>());
  return out;
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("_sam_perturb_plan", &sam_perturb_plan_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("sam_sumsq", &sam_sumsq_cpu);
  m.impl("sam_restore_", &sam_restore_cpu);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_cpu);
  m.impl("sam_restore_adamw_", &sam_restore_adamw_cpu);
}

}  // namespace saf::cpu
