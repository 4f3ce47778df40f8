// Torch-side wrappers of the CUDA GSAM kernels (csrc/cuda/gsam.cu): plans and checks
// (csrc/mt_plan_esam.h), the cached device plan, scratch, launch. Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_check.h"
#include "cuda/esam_launchers.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan_esam.h"

namespace saf::cuda {

namespace {

// Reductions and coefficients on the device; returns (coefs [3] float64, stats [3]).
std::pair<at::Tensor, at::Tensor> gsam_reduce(const mt::Plan& plan, const void* dplan, at::TensorList params,
                                              double alpha, double eps, const std::optional<at::Tensor>& grad_scale,
                                              const std::optional<at::Tensor>& old_grad_scale,
                                              const std::optional<at::Tensor>& found_inf, cudaStream_t stream,
                                              const char* op) {
  const bool f64 = mt::any_f64(params);
  const auto opts = params[0].options();
  at::Tensor partials = at::empty({3 * std::max<int64_t>(1, plan.n_chunks())}, opts.dtype(at::kDouble));
  at::Tensor coefs = at::empty({3}, opts.dtype(at::kDouble));
  at::Tensor stats = at::empty({3}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  const at::Tensor gs = as_f32(grad_scale), ogs = as_f32(old_grad_scale), fi = as_f32(found_inf);
  SAF_CUDA_CHECK(gsam_dots_launch(dplan, plan.n_chunks(), f64, partials.data_ptr<double>(), stream), op);
  SAF_CUDA_CHECK(gsam_coef_launch(partials.data_ptr<double>(), plan.n_chunks(), f32_ptr(gs), f32_ptr(ogs),
                                  f32_ptr(fi), alpha, eps, coefs.data_ptr<double>(), stats.data_ptr(), f64,
                                  stream),
                 op);
  return {coefs, stats};
}

}  // namespace

at::Tensor gsam_combine_cuda(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                             at::TensorList stash, double alpha, double eps, int64_t stash_mode, bool restore,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& old_grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::gsam_combine_plan(params, grads, old_grads, stash, alpha, eps, stash_mode, restore,
                                              grad_scale, old_grad_scale, found_inf, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.gsam_combine_: empty parameter list on CUDA");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const void* dplan = PlanCache::instance().upload(plan, stream);
  auto [coefs, stats] =
      gsam_reduce(plan, dplan, params, alpha, eps, grad_scale, old_grad_scale, found_inf, stream, "gsam_combine_");
  SAF_CUDA_CHECK(gsam_combine_launch(dplan, plan.n_chunks(), mt::any_f64(params), coefs.data_ptr<double>(),
                                     restore, stash_mode, stream),
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
                                 const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::gsam_sgd_plan(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum,
                                          dampening, flags, alpha, eps, stash_mode, grad_scale, old_grad_scale,
                                          found_inf, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.gsam_restore_sgd_: empty parameter list on CUDA");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const void* dplan = PlanCache::instance().upload(plan, stream);
  auto [coefs, stats] = gsam_reduce(plan, dplan, params, alpha, eps, grad_scale, old_grad_scale, found_inf, stream,
                                    "gsam_restore_sgd_");
  SAF_CUDA_CHECK(
    gsam_sgd_launch(dplan, plan.n_chunks(), mt::any_f64(params), coefs.data_ptr<double>(), stash_mode, stream),
    "gsam_restore_sgd_");
  mt::bump_versions(params);
  mt::bump_versions(momentum_buffers);
  return stats;
}

TORCH_LIBRARY_IMPL(saf_kernels, CUDA, m) {
  m.impl("gsam_combine_", &gsam_combine_cuda);
  m.impl("gsam_restore_sgd_", &gsam_restore_sgd_cuda);
}

}  // namespace saf::cuda
