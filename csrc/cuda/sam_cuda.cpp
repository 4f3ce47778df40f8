// Torch-side wrappers of the CUDA SAM kernels (csrc/cuda/sam.cu): plans and checks
// (csrc/mt_plan.h, shared with the CPU ops), the cached device copy of the plan, scratch, launch.
// Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

namespace {

// The fused restore + optimizer steps: one launch (launch(call, grad_scale, found_inf) as float32
// device pointers), reading found_inf on the device (set: the restore alone).
template <class Launch>
void restore_step(const mt::Plan& plan, at::TensorList params, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const char* op, Launch launch) {
  if (params.empty()) return;
  const MtCall call(plan, params);
  const at::Tensor gs = as_f32(grad_scale), fi = as_f32(found_inf);
  SAF_CUDA_CHECK(launch(call, f32_ptr(gs), f32_ptr(fi)), op);
  mt::bump_versions(params);
}

}  // namespace

at::Tensor sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                            at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::IntArrayRef flags, double eps,
                            int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::sam_perturb_plan(params, grads, stash, rho, eta, flags, eps, stash_mode, grad_scale,
                                             found_inf, mt_chunk_size());
  mt::check_sumsq(params, sumsq, "saf_kernels.sam_perturb_");
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.sam_perturb_: empty parameter list on CUDA");
  const MtCall call(plan, params);
  at::Tensor coef = call.coefs(), norm = call.result({});
  const at::Tensor gs = as_f32(grad_scale), fi = as_f32(found_inf);
  const auto s = call.sums(1, sumsq, "sam_perturb_", [&](double* p) {
    return sam_norm_launch(call.plan, call.n_chunks, call.f64, p, call.stream);
  });
  SAF_CUDA_CHECK(sam_coef_launch(s.data(), s.n, f32_ptr(gs), f32_ptr(fi), eps,
                                 norm.data_ptr(), call.f64, coef.data_ptr<double>(), call.stream),
                 "sam_perturb_");
  SAF_CUDA_CHECK(
      sam_perturb_launch(call.plan, call.n_chunks, call.f64, coef.data_ptr<double>(), stash_mode, call.stream),
      "sam_perturb_");
  mt::bump_versions(params, stash);
  return norm;
}

at::Tensor sam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                          at::IntArrayRef flags) {
  const mt::Plan plan = mt::sam_sumsq_plan(params, grads, eta, flags, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.sam_sumsq: empty parameter list on CUDA");
  const MtCall call(plan, params);
  return call.local_sums(1, "sam_sumsq",
                         [&](double* p) { return sam_norm_launch(call.plan, call.n_chunks, call.f64, p, call.stream); });
}

void sam_restore_cuda(at::TensorList params, at::TensorList stash, int64_t stash_mode) {
  const mt::Plan plan = mt::sam_restore_plan(params, stash, stash_mode, mt_chunk_size());
  if (params.empty()) return;
  const MtCall call(plan, params);
  SAF_CUDA_CHECK(sam_restore_launch(call.plan, call.n_chunks, call.f64, stash_mode, call.stream), "sam_restore_");
  mt::bump_versions(params);
}

void sam_restore_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                          at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                          at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                          int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::sam_sgd_plan(params, grads, stash, momentum_buffers, lr, weight_decay, momentum,
                                         dampening, flags, stash_mode, grad_scale, found_inf, mt_chunk_size());
  restore_step(plan, params, grad_scale, found_inf, "sam_restore_sgd_",
               [&](const MtCall& c, const float* gs, const float* fi) {
                 return sam_restore_sgd_launch(c.plan, c.n_chunks, c.f64, stash_mode, gs, fi, c.stream);
               });
  mt::bump_versions(momentum_buffers);
}

void sam_restore_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, at::TensorList steps, at::ArrayRef<double> lr,
                            at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                            at::ArrayRef<double> weight_decay, at::IntArrayRef flags, int64_t stash_mode,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::sam_adamw_plan(params, grads, stash, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps,
                                           weight_decay, flags, stash_mode, grad_scale, found_inf, mt_chunk_size());
  restore_step(plan, params, grad_scale, found_inf, "sam_restore_adamw_",
               [&](const MtCall& c, const float* gs, const float* fi) {
                 return sam_restore_adamw_launch(c.plan, c.n_chunks, c.f64, stash_mode, gs, fi, c.stream);
               });
  mt::bump_versions(exp_avg, exp_avg_sq);
}

}  // namespace saf::cuda
