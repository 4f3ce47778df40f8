// Torch-side wrappers of the CUDA Momentum-SAM kernels (csrc/cuda/msam.cu): plans and checks
// (csrc/mt_plan.h), the cached device plan, scratch, 3 launches. inv_norm stays on the device:
// nothing here waits for it.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"
#include "torch_utils.h"

namespace saf::cuda {

namespace {

using Pass1 = cudaError_t (*)(const void*, int64_t, bool, const void*, int32_t, double*, cudaStream_t);

// Pass 1, the finalize (inv_norm, |buf|), pass 2; returns |buf|.
at::Tensor msam_run(const mt::Plan& plan, at::TensorList params, const at::Tensor& inv_norm, double eps, Pass1 pass1,
                    const char* op) {
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.", op, ": empty parameter list on CUDA");
  const MtCall call(plan, params);
  at::Tensor partials = call.partials(1), out = call.result({});
  const int32_t dt = int32_t(to_dtype(inv_norm.scalar_type()));
  void* inv = inv_norm.data_ptr();
  SAF_CUDA_CHECK(pass1(call.plan, call.n_chunks, call.f64, inv, dt, partials.data_ptr<double>(), call.stream), op);
  SAF_CUDA_CHECK(
      msam_inv_launch(partials.data_ptr<double>(), call.n_chunks, eps, inv, dt, out.data_ptr(), call.f64, call.stream),
      op);
  SAF_CUDA_CHECK(msam_perturb_launch(call.plan, call.n_chunks, call.f64, inv, dt, call.stream), op);
  mt::bump_versions(params, at::TensorList(inv_norm));
  return out;
}

}  // namespace

at::Tensor msam_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const at::Tensor& inv_norm, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> rho_prev, at::ArrayRef<double> rho,
                         double eps) {
  const mt::Plan plan = mt::msam_sgd_plan(params, grads, momentum_buffers, inv_norm, lr, weight_decay, momentum,
                                          rho_prev, rho, eps, mt_chunk_size());
  at::Tensor out = msam_run(plan, params, inv_norm, eps, &msam_sgd_launch, "msam_sgd_");
  mt::bump_versions(momentum_buffers);
  return out;
}

at::Tensor msam_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList steps, const at::Tensor& inv_norm,
                           at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                           at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay, at::ArrayRef<double> rho_prev,
                           at::ArrayRef<double> rho, double norm_eps) {
  const mt::Plan plan = mt::msam_adamw_plan(params, grads, exp_avg, exp_avg_sq, steps, inv_norm, lr, beta1, beta2, eps,
                                            weight_decay, rho_prev, rho, norm_eps, mt_chunk_size());
  at::Tensor out = msam_run(plan, params, inv_norm, norm_eps, &msam_adamw_launch, "msam_adamw_");
  mt::bump_versions(exp_avg, exp_avg_sq);
  return out;
}

}  // namespace saf::cuda
