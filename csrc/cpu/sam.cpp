// CPU implementation of the SAM ops (schemas: csrc/ops.cpp): one multi-tensor plan per call,
// chunks split over threads (csrc/cpu/multi_tensor.h), each chunk handled by the build for this
// CPU's instruction set (csrc/cpu/kernels/sam.cpp).
//
// sam_perturb_ is two passes over the tensors: the sum of squares (one partial per chunk,
// summed in chunk order: the same bits whatever the thread count), then the perturbation.
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"
#include "mt_plan.h"

namespace saf::cpu {

namespace {

constexpr int32_t kSgdFlags = mt::sgd::kNesterov | mt::sgd::kMaximize | mt::sgd::kFirstRun;

// GradScaler's scale and found_inf live on the tensors' device; on CPU reading them costs nothing.
double inv_scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0 / grad_scale->item<double>() : 1.0;
}

bool found_inf_of(const std::optional<at::Tensor>& found_inf) {
  return found_inf && found_inf->item<double>() > 0;
}

at::Device device_of(at::TensorList l) { return l.empty() ? at::Device(at::kCPU) : l[0].device(); }

}  // namespace

at::Tensor sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash, at::ArrayRef<double> rho,
                           at::ArrayRef<double> eta, at::IntArrayRef flags, double eps, int64_t stash_mode,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "saf_kernels.sam_perturb_";
  mt::check_stash_mode(stash_mode, op);
  mt::check_finite_nonneg(rho, op, "rho");
  mt::check_finite_nonneg(eta, op, "eta");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  mt::Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, kCpuChunk);
  mt::check_same_dtype(params, grads, op, "params", "grads");
  if (stash_mode == mt::sam::COPY) mt::check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(mt::sam::RHO, rho, "rho");
  plan.set_param(mt::sam::ETA, eta, "eta");
  plan.set_flags(flags, mt::sam::kAdaptive);
  const at::Device dev = device_of(params);
  mt::check_scalar_tensor(grad_scale, dev, op, "grad_scale");
  mt::check_scalar_tensor(found_inf, dev, op, "found_inf");
  bool f64 = false;
  for (const auto& p : params) f64 = f64 || p.scalar_type() == at::kDouble;

  const MtKernels k = mt_kernels();
  std::vector<double> partial(plan.n_chunks(), 0.0);
  parallel_chunks(plan, [&](int64_t c, const mt::TensorEntry& t, int64_t start, int64_t n) {
    partial[c] = k.sam_norm(t, start, n);
  });
  double sumsq = 0;
  for (double p : partial) sumsq += p;
  const mt::SamCoef sc = mt::sam_coef(sumsq, inv_scale_of(grad_scale), eps, found_inf_of(found_inf));
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_perturb(t, start, n, sc.coef, stash_mode);
  });
  return at::scalar_tensor(sc.norm, at::TensorOptions().dtype(f64 ? at::kDouble : at::kFloat).device(dev));
}

void sam_restore_cpu(at::TensorList params, at::TensorList stash, int64_t stash_mode) {
  const char* op = "saf_kernels.sam_restore_";
  mt::check_stash_mode(stash_mode, op);
  mt::Plan plan(op, {{"params", params}, {"stash", stash}, {"stash", stash}}, kCpuChunk);  // no grads: stash fills slot G
  if (stash_mode == mt::sam::COPY) mt::check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  const MtKernels k = mt_kernels();
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_restore(t, start, n, stash_mode);
  });
}

void sam_restore_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash,
                         at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                         int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const char* op = "saf_kernels.sam_restore_sgd_";
  mt::check_stash_mode(stash_mode, op);
  // Without momentum there is no buffer: the params stand in for the unused stream.
  const bool has_buf = !momentum_buffers.empty();
  mt::Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash},
                     {"momentum_buffers", has_buf ? momentum_buffers : params}}, kCpuChunk);
  mt::check_same_dtype(params, grads, op, "params", "grads");
  if (stash_mode == mt::sam::COPY) mt::check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(mt::sgd::LR, lr, "lr");
  plan.set_param(mt::sgd::WD, weight_decay, "weight_decay");
  plan.set_param(mt::sgd::MOMENTUM, momentum, "momentum");
  plan.set_param(mt::sgd::DAMPENING, dampening, "dampening");
  plan.set_flags(flags, kSgdFlags);
  for (int64_t i = 0; i < plan.n_tensors(); ++i) {
    TORCH_CHECK_VALUE(has_buf || plan.entry(i).param[mt::sgd::MOMENTUM] == 0.0, op,
                      ": momentum != 0 needs momentum_buffers");
    if (!has_buf) plan.entry(i).param[mt::sgd::MOMENTUM] = 0.0;
  }
  const at::Device dev = device_of(params);
  mt::check_scalar_tensor(grad_scale, dev, op, "grad_scale");
  mt::check_scalar_tensor(found_inf, dev, op, "found_inf");
  const MtKernels k = mt_kernels();
  if (found_inf_of(found_inf)) {  // skipped step: the restore only
    parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t s, int64_t n) { k.sam_restore(t, s, n, stash_mode); });
    return;
  }
  const double inv_scale = inv_scale_of(grad_scale);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_restore_sgd(t, start, n, stash_mode, inv_scale);
  });
}

void sam_restore_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList stash, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList steps, at::ArrayRef<double> lr,
                           at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                           at::ArrayRef<double> weight_decay, at::IntArrayRef flags, int64_t stash_mode,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "saf_kernels.sam_restore_adamw_";
  mt::check_stash_mode(stash_mode, op);
  mt::Plan plan(op,
                {{"params", params}, {"grads", grads}, {"stash", stash}, {"exp_avg", exp_avg},
                 {"exp_avg_sq", exp_avg_sq}, {"steps", steps, /*scalar=*/true}},
                kCpuChunk);
  mt::check_same_dtype(params, grads, op, "params", "grads");
  if (stash_mode == mt::sam::COPY) mt::check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(mt::adamw::LR, lr, "lr");
  plan.set_param(mt::adamw::BETA1, beta1, "beta1");
  plan.set_param(mt::adamw::BETA2, beta2, "beta2");
  plan.set_param(mt::adamw::EPS, eps, "eps");
  plan.set_param(mt::adamw::WD, weight_decay, "weight_decay");
  plan.set_flags(flags, mt::adamw::kMaximize);
  const at::Device dev = device_of(params);
  mt::check_scalar_tensor(grad_scale, dev, op, "grad_scale");
  mt::check_scalar_tensor(found_inf, dev, op, "found_inf");
  const MtKernels k = mt_kernels();
  if (found_inf_of(found_inf)) {
    parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t s, int64_t n) { k.sam_restore(t, s, n, stash_mode); });
    return;
  }
  const double inv_scale = inv_scale_of(grad_scale);
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.sam_restore_adamw(t, start, n, stash_mode, inv_scale);
  });
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("sam_restore_", &sam_restore_cpu);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_cpu);
  m.impl("sam_restore_adamw_", &sam_restore_adamw_cpu);
}

}  // namespace saf::cpu
