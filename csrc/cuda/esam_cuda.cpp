// Torch-side wrappers of the CUDA ESAM kernels and philox_ (csrc/cuda/esam.cu): plans and checks
// (csrc/mt_plan.h, shared with the CPU ops), the cached device plan, scratch, launch.
// Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

void philox_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t kind, double p) {
  mt::check_philox(out, offset, kind, p);
  const int32_t dtype = kind == 0 ? kPhiloxInt64 : int32_t(to_dtype(out.scalar_type()));
  const c10::cuda::CUDAGuard guard(out.device());
  SAF_CUDA_CHECK(philox_launch(out.data_ptr(), dtype, out.numel(), mt::philox_key(seed), uint64_t(offset), kind,
                               rng::bernoulli_threshold(p), c10::cuda::getCurrentCUDAStream()),
                 "philox_");
}

at::Tensor esam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                             at::IntArrayRef flags, double eps, int64_t seed, int64_t offset, int64_t stash_mode,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::esam_perturb_plan(params, grads, stash, rho, eta, beta, flags, eps, offset, stash_mode,
                                              grad_scale, found_inf, mt_chunk_size());
  mt::check_sumsq(params, sumsq, "saf_kernels.esam_perturb_");
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.esam_perturb_: empty parameter list on CUDA");
  const MtCall call(plan, params);
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  at::Tensor coef = call.coefs(), norm = call.result({});
  const at::Tensor gs = as_f32(grad_scale), fi = as_f32(found_inf);
  const auto s = call.sums(1, sumsq, "esam_perturb_", [&](double* p) {
    return esam_norm_launch(call.plan, call.n_chunks, call.f64, key, off, p, call.stream);
  });
  SAF_CUDA_CHECK(sam_coef_launch(s.data(), s.n, f32_ptr(gs), f32_ptr(fi), eps,
                                 norm.data_ptr(), call.f64, coef.data_ptr<double>(), call.stream),
                 "esam_perturb_");
  SAF_CUDA_CHECK(esam_perturb_launch(call.plan, call.n_chunks, call.f64, key, off, coef.data_ptr<double>(),
                                     stash_mode, call.stream),
                 "esam_perturb_");
  mt::bump_versions(params, stash);
  return norm;
}

at::Tensor esam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                           at::ArrayRef<double> beta, at::IntArrayRef flags, int64_t seed, int64_t offset) {
  const mt::Plan plan = mt::esam_sumsq_plan(params, grads, eta, beta, flags, offset, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.esam_sumsq: empty parameter list on CUDA");
  const MtCall call(plan, params);
  return call.local_sums(1, "esam_sumsq", [&](double* p) {
    return esam_norm_launch(call.plan, call.n_chunks, call.f64, mt::philox_key(seed), uint64_t(offset), p, call.stream);
  });
}

void esam_restore_cuda(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t seed,
                       int64_t offset, int64_t stash_mode) {
  const mt::Plan plan = mt::esam_restore_plan(params, stash, beta, offset, stash_mode, mt_chunk_size());
  if (params.empty()) return;
  const MtCall call(plan, params);
  if (stash_mode == mt::sam::COPY) {
    // Bit exact, the mask is not needed: the SAM restore (the stash fills the same slots).
    SAF_CUDA_CHECK(sam_restore_launch(call.plan, call.n_chunks, call.f64, stash_mode, call.stream), "esam_restore_");
  } else {
    SAF_CUDA_CHECK(esam_restore_delta_launch(call.plan, call.n_chunks, call.f64, mt::philox_key(seed),
                                             uint64_t(offset), call.stream),
                   "esam_restore_");
  }
  mt::bump_versions(params);
}

}  // namespace saf::cuda
