// Torch-side wrappers of the CUDA ESAM kernels and philox_ (csrc/cuda/esam.cu): plans and checks
// (csrc/mt_plan_esam.h, shared with the CPU ops), the cached device plan, scratch, launch.
// Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_check.h"
#include "cuda/esam_launchers.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan_esam.h"

namespace saf::cuda {

void philox_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t kind, double p) {
  const char* op = "saf_kernels.philox_";
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, op, ": kind must be 0 (words), 1 (uniform), 2 (normal) or 3 (bernoulli), got ",
                    kind);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(kind != 3 || (p >= 0.0 && p <= 1.0), op, ": p must be in [0, 1], got ", p);
  int32_t dtype;
  if (kind == 0) {
    TORCH_CHECK_TYPE(out.scalar_type() == at::kLong, op, ": kind 0 (raw words) needs an int64 out, got ",
                     out.scalar_type());
    dtype = kPhiloxInt64;
  } else {
    dtype = int32_t(to_dtype(out.scalar_type()));
  }
  const c10::cuda::CUDAGuard guard(out.device());
  SAF_CUDA_CHECK(philox_launch(out.data_ptr(), dtype, out.numel(), mt::philox_key(seed), uint64_t(offset), kind,
                               rng::bernoulli_threshold(p), c10::cuda::getCurrentCUDAStream()),
                 "philox_");
}

at::Tensor esam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                             at::IntArrayRef flags, double eps, int64_t seed, int64_t offset, int64_t stash_mode,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  const mt::Plan plan = mt::esam_perturb_plan(params, grads, stash, rho, eta, beta, flags, eps, offset, stash_mode,
                                              grad_scale, found_inf, mt_chunk_size());
  TORCH_CHECK_VALUE(!params.empty(), "saf_kernels.esam_perturb_: empty parameter list on CUDA");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool f64 = mt::any_f64(params);
  const auto opts = params[0].options();
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  at::Tensor partials = at::empty({std::max<int64_t>(1, plan.n_chunks())}, opts.dtype(at::kDouble));
  at::Tensor coef = at::empty({1}, opts.dtype(at::kDouble));
  at::Tensor norm = at::empty({}, opts.dtype(f64 ? at::kDouble : at::kFloat));
  const at::Tensor gs = as_f32(grad_scale), fi = as_f32(found_inf);
  const void* dplan = PlanCache::instance().upload(plan, stream);
  SAF_CUDA_CHECK(esam_norm_launch(dplan, plan.n_chunks(), f64, key, off, partials.data_ptr<double>(), stream),
                 "esam_perturb_");
  SAF_CUDA_CHECK(sam_coef_launch(partials.data_ptr<double>(), plan.n_chunks(), f32_ptr(gs), f32_ptr(fi), eps,
                                 norm.data_ptr(), f64, coef.data_ptr<double>(), stream),
                 "esam_perturb_");
  SAF_CUDA_CHECK(
    esam_perturb_launch(dplan, plan.n_chunks(), f64, key, off, coef.data_ptr<double>(), stash_mode, stream),
    "esam_perturb_");
  mt::bump_versions(params);
  mt::bump_versions(stash);
  return norm;
}

void esam_restore_cuda(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t seed,
                       int64_t offset, int64_t stash_mode) {
  const mt::Plan plan = mt::esam_restore_plan(params, stash, beta, offset, stash_mode, mt_chunk_size());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const void* dplan = PlanCache::instance().upload(plan, stream);
  if (stash_mode == mt::sam::COPY) {
    // Bit exact, the mask is not needed: the SAM restore (the stash fills the same slots).
    SAF_CUDA_CHECK(sam_restore_launch(dplan, plan.n_chunks(), mt::any_f64(params), stash_mode, stream),
                   "esam_restore_");
  } else {
    SAF_CUDA_CHECK(esam_restore_delta_launch(dplan, plan.n_chunks(), mt::any_f64(params), mt::philox_key(seed),
                                             uint64_t(offset), stream),
                   "esam_restore_");
  }
  mt::bump_versions(params);
}

TORCH_LIBRARY_IMPL(saf_kernels, CUDA, m) {
  m.impl("philox_", &philox_cuda);
  m.impl("esam_perturb_", &esam_perturb_cuda);
  m.impl("esam_restore_", &esam_restore_cuda);
}

}  // namespace saf::cuda
