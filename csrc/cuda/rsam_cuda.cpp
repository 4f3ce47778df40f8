// Torch-side wrappers of the CUDA R-SAM kernels (csrc/cuda/rsam.cu): plans and checks
// (csrc/mt_plan.h), cached device plans, scratch, launch. Nothing here waits for the device.
//
// The schedules change std and rho every step; when every tensor has the same value (the
// optimizers' case) it travels as a kernel argument and the plan holds 1, so that the cached
// device plan stays valid from step to step.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

namespace {

// (values for the plan, common factor): all-equal values become ones and the factor.
double common_factor(at::ArrayRef<double> v, std::vector<double>& out) {
  out.assign(v.begin(), v.end());
  if (v.empty()) return 1.0;
  for (double x : v) {
    if (x != v[0]) return 1.0;
  }
  std::fill(out.begin(), out.end(), 1.0);
  return v[0];
}

}  // namespace

void rsam_noise_cuda(at::TensorList params, at::TensorList stash, at::ArrayRef<double> stdev, int64_t seed,
                     int64_t offset) {
  std::vector<double> plan_std;
  mt::check_finite_nonneg(stdev, "saf_kernels.rsam_noise_", "std");
  const double mult = common_factor(stdev, plan_std);
  // A chunk of whole rows per block: at least one row, else about mt_chunk_size() elements.
  const mt::Plan plan = mt::rsam_noise_plan(params, stash, plan_std, offset, mt_chunk_size());
  if (params.empty()) return;
  const MtCall call(plan, params);
  SAF_CUDA_CHECK(rsam_noise_launch(call.plan, call.n_chunks, call.f64, mt::philox_key(seed), uint64_t(offset), mult,
                                   call.stream),
                 "rsam_noise_");
  mt::bump_versions(params, stash);
}

at::Tensor rsam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, double lam, double eps,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& sumsq) {
  std::vector<double> plan_rho;
  mt::check_finite_nonneg(rho, "saf_kernels.rsam_perturb_", "rho");
  const double mult = common_factor(rho, plan_rho);
  const mt::Plan plan =
      mt::rsam_perturb_plan(params, grads, stash, plan_rho, lam, eps, grad_scale, found_inf, mt_chunk_size());
  mt::check_sumsq(params, sumsq, "saf_kernels.rsam_perturb_");
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.rsam_perturb_: empty parameter list on CUDA");
  const MtCall call(plan, params);
  at::Tensor coef = call.coefs(), norm = call.result({});
  const at::Tensor gs = as_f32(grad_scale), fi = as_f32(found_inf);
  const auto s = call.sums(1, sumsq, "rsam_perturb_", [&](double* p) {
    return rsam_norm_launch(call.plan, call.n_chunks, call.f64, lam, f32_ptr(gs), p, call.stream);
  });
  // d is already unscaled: the finalize gets no grad_scale, only found_inf.
  SAF_CUDA_CHECK(sam_coef_launch(s.data(), s.n, nullptr, f32_ptr(fi), eps,
                                 norm.data_ptr(), call.f64, coef.data_ptr<double>(), call.stream),
                 "rsam_perturb_");
  SAF_CUDA_CHECK(rsam_perturb_launch(call.plan, call.n_chunks, call.f64, lam, f32_ptr(gs), coef.data_ptr<double>(),
                                     mult, call.stream),
                 "rsam_perturb_");
  mt::bump_versions(params);
  return norm;
}

at::Tensor rsam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash, double lam,
                           const std::optional<at::Tensor>& grad_scale) {
  const mt::Plan plan = mt::rsam_sumsq_plan(params, grads, stash, lam, grad_scale, std::nullopt, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.rsam_sumsq: empty parameter list on CUDA");
  const MtCall call(plan, params);
  const at::Tensor gs = as_f32(grad_scale);
  return call.local_sums(1, "rsam_sumsq", [&](double* p) {
    return rsam_norm_launch(call.plan, call.n_chunks, call.f64, lam, f32_ptr(gs), p, call.stream);
  });
}

}  // namespace saf::cuda
