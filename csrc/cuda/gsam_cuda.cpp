// Torch-side wrappers of the CUDA GSAM kernels (csrc/cuda/gsam.cu): plans and checks
// (csrc/mt_plan.h), the cached device plan, scratch, launch. Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

namespace {

// Reductions and coefficients on the device: the partial-sum stage, then the one-block finalize;
// returns (coefs [3] float64, stats [3]).
std::pair<at::Tensor, at::Tensor> gsam_reduce(const MtCall& call, double alpha, double eps,
                                              const std::optional<at::Tensor>& grad_scale,
                                              const std::optional<at::Tensor>& old_grad_scale,
                                              const std::optional<at::Tensor>& found_inf,
                                              const std::optional<at::Tensor>& sums, const char* op) {
  at::Tensor coefs = call.coefs(3), stats = call.result({3});
  const at::Tensor gs = as_f32(grad_scale), ogs = as_f32(old_grad_scale), fi = as_f32(found_inf);
  const auto s = call.sums(
      3, sums, op, [&](double* p) { return gsam_dots_launch(call.plan, call.n_chunks, call.f64, p, call.stream); });
  SAF_CUDA_CHECK(gsam_coef_launch(s.data(), s.n, f32_ptr(gs), f32_ptr(ogs), f32_ptr(fi),
                                  alpha, eps, coefs.data_ptr<double>(), stats.data_ptr(), call.f64, call.stream),
                 op);
  return {coefs, stats};
}

}  // namespace

at::Tensor gsam_combine_cuda(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                             at::TensorList stash, double alpha, double eps, int64_t stash_mode, bool restore,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& old_grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::gsam_combine_plan(params, grads, old_grads, stash, alpha, eps, stash_mode, restore,
                                              grad_scale, old_grad_scale, found_inf, mt_chunk_size());
  mt::check_sums(params, sums, "saf_kernels.gsam_combine_");
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.gsam_combine_: empty parameter list on CUDA");
  const MtCall call(plan, params);
  auto [coefs, stats] = gsam_reduce(call, alpha, eps, grad_scale, old_grad_scale, found_inf, sums, "gsam_combine_");
  SAF_CUDA_CHECK(gsam_combine_launch(call.plan, call.n_chunks, call.f64, coefs.data_ptr<double>(), restore,
                                     stash_mode, call.stream),
                 "gsam_combine_");
  if (restore) mt::bump_versions(params);
  mt::bump_versions(grads);
  return stats;
}

at::Tensor gsam_restore_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                                 at::TensorList stash, at::TensorList momentum_buffers, at::ArrayRef<double> lr,
                                 at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                                 at::ArrayRef<double> dampening, at::IntArrayRef flags, double alpha, double eps,
                                 int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& old_grad_scale,
                                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::gsam_sgd_plan(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum,
                                          dampening, flags, alpha, eps, stash_mode, grad_scale, old_grad_scale,
                                          found_inf, mt_chunk_size());
  mt::check_sums(params, sums, "saf_kernels.gsam_restore_sgd_");
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.gsam_restore_sgd_: empty parameter list on CUDA");
  const MtCall call(plan, params);
  auto [coefs, stats] =
      gsam_reduce(call, alpha, eps, grad_scale, old_grad_scale, found_inf, sums, "gsam_restore_sgd_");
  SAF_CUDA_CHECK(
      gsam_sgd_launch(call.plan, call.n_chunks, call.f64, coefs.data_ptr<double>(), stash_mode, call.stream),
      "gsam_restore_sgd_");
  mt::bump_versions(params, momentum_buffers);
  return stats;
}

at::Tensor gsam_sums_cuda(at::TensorList grads, at::TensorList old_grads) {
  const mt::Plan plan = mt::gsam_sums_plan(grads, old_grads, mt_chunk_size());
  TORCH_CHECK_VALUE(!grads.empty(), "saf_kernels.gsam_sums: empty gradient list on CUDA");
  const MtCall call(plan, grads);
  return call.local_sums(
      3, "gsam_sums", [&](double* p) { return gsam_dots_launch(call.plan, call.n_chunks, call.f64, p, call.stream); });
}

}  // namespace saf::cuda
