// Torch-side wrappers of the CUDA LookSAM kernels (csrc/cuda/looksam.cu, and GSAM's / SAM's
// passes over plans in their slots): plans and checks (csrc/mt_plan.h), the cached device plan,
// scratch, launches. Nothing here waits for the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

at::Tensor looksam_gv_cuda(at::TensorList gv, const at::Tensor& gv_norm, at::TensorList grads, at::TensorList old_grads,
                           double eps, const std::optional<at::Tensor>& sums) {
  const mt::Plan plan = mt::looksam_gv_plan(gv, gv_norm, grads, old_grads, eps, mt_chunk_size());
  mt::check_sums(gv, sums, "saf_kernels.looksam_gv_");
  TORCH_CHECK_VALUE(!gv.empty(), "saf_kernels.looksam_gv_: empty tensor list on CUDA");
  const MtCall call(plan, gv);
  const char* op = "looksam_gv_";
  at::Tensor coefs = call.coefs(2), stats = call.result({3});
  const bool norm_f64 = gv_norm.scalar_type() == at::kDouble;
  const auto dots = call.sums(
      3, sums, op, [&](double* p) { return gsam_dots_launch(call.plan, call.n_chunks, call.f64, p, call.stream); });
  SAF_CUDA_CHECK(looksam_gv_coef_launch(dots.data(), dots.n, eps, coefs.data_ptr<double>(), stats.data_ptr(), call.f64,
                                        call.stream),
                 op);
  // |gv|^2's partials: in the dots' scratch once their finalize has read it (one stream), or in
  // one of their own when the dots came all-reduced.
  const at::Tensor scratch = sums ? call.partials(1) : dots.t;
  double* part = scratch.data_ptr<double>();
  SAF_CUDA_CHECK(looksam_gv_launch(call.plan, call.n_chunks, call.f64, coefs.data_ptr<double>(), part, call.stream), op);
  SAF_CUDA_CHECK(looksam_norm_launch(part, call.n_chunks, coefs.data_ptr<double>(), gv_norm.data_ptr(), norm_f64,
                                     call.stream),
                 op);
  mt::bump_versions(gv, at::TensorList(gv_norm));
  return stats;
}

at::Tensor looksam_combine_cuda(at::TensorList grads, at::TensorList gv, const at::Tensor& gv_norm, double alpha,
                                double eps, const std::optional<at::Tensor>& sumsq) {
  const mt::Plan plan = mt::looksam_combine_plan(grads, gv, gv_norm, alpha, eps, mt_chunk_size());
  mt::check_sumsq(grads, sumsq, "saf_kernels.looksam_combine_");
  TORCH_CHECK_VALUE(!grads.empty(), "saf_kernels.looksam_combine_: empty tensor list on CUDA");
  const MtCall call(plan, grads);
  const char* op = "looksam_combine_";
  at::Tensor coefs = call.coefs(3), out = call.result({});
  const bool norm_f64 = gv_norm.scalar_type() == at::kDouble;
  const auto s = call.sums(
      1, sumsq, op, [&](double* p) { return sam_norm_launch(call.plan, call.n_chunks, call.f64, p, call.stream); });
  SAF_CUDA_CHECK(looksam_combine_coef_launch(s.data(), s.n, gv_norm.data_ptr(), norm_f64,
                                             alpha, eps, coefs.data_ptr<double>(), out.data_ptr(), call.f64,
                                             call.stream),
                 op);
  SAF_CUDA_CHECK(gsam_combine_launch(call.plan, call.n_chunks, call.f64, coefs.data_ptr<double>(), /*restore=*/false,
                                     mt::sam::COPY, call.stream),
                 op);
  mt::bump_versions(grads);
  return out;
}

}  // namespace saf::cuda
