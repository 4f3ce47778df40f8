// CPU implementation of the Momentum-SAM ops (schemas: csrc/ops.cpp; plans: csrc/mt_plan.h;
// kernels: csrc/cpu/kernels/msam.cpp). Pass 1 (un-perturb, buffer / moments, step) returns the
// per-chunk sums of the stored buffer's squares, summed in chunk order (deterministic); then
// inv_norm = 1 / (|buf| + eps) is stored in its dtype and, as stored, drives pass 2 (w -= rho inv
// buf), so that the next step un-perturbs with exactly that value.
#include <torch/library.h>

#include <cmath>

#include "cpu/multi_tensor.h"

namespace saf::cpu {

namespace {

// pass1(k, entry, start, n, inv_prev) -> the chunk's sum of squares of the buffer.
template <typename Pass1>
at::Tensor msam_run(const mt::Plan& plan, at::TensorList params, at::TensorList bufs, at::TensorList more,
                    const at::Tensor& inv_norm, double eps, Pass1 pass1) {
  const MtKernels k = mt_kernels();
  const double inv_prev = inv_norm.item<double>();
  const auto s = ordered_sums<1>(
      chunk_partials<1>(plan, [&](const mt::TensorEntry& t, int64_t start, int64_t n, double* out) {
        out[0] = pass1(k, t, start, n, inv_prev);
      }));
  const double norm = std::sqrt(s[0]);
  const double inv = set_state_scalar(inv_norm, 1.0 / (norm + eps));
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) {
    k.msam_perturb(t, start, n, inv);
  });
  mt::bump_versions(params, bufs, more);
  return norm_result(norm, params);
}

}  // namespace

at::Tensor msam_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        const at::Tensor& inv_norm, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                        at::ArrayRef<double> momentum, at::ArrayRef<double> rho_prev, at::ArrayRef<double> rho,
                        double eps) {
  const mt::Plan plan = mt::msam_sgd_plan(params, grads, momentum_buffers, inv_norm, lr, weight_decay, momentum,
                                          rho_prev, rho, eps, kCpuChunk);
  if (params.empty()) return at::zeros({});
  return msam_run(plan, params, momentum_buffers, {}, inv_norm, eps,
                  [](const MtKernels& k, const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
                    return k.msam_sgd(t, start, n, inv_prev);
                  });
}

at::Tensor msam_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                          at::TensorList exp_avg_sq, at::TensorList steps, const at::Tensor& inv_norm,
                          at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                          at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay, at::ArrayRef<double> rho_prev,
                          at::ArrayRef<double> rho, double norm_eps) {
  const mt::Plan plan = mt::msam_adamw_plan(params, grads, exp_avg, exp_avg_sq, steps, inv_norm, lr, beta1, beta2, eps,
                                            weight_decay, rho_prev, rho, norm_eps, kCpuChunk);
  if (params.empty()) return at::zeros({});
  return msam_run(plan, params, exp_avg, exp_avg_sq, inv_norm, norm_eps,
                  [](const MtKernels& k, const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev) {
                    return k.msam_adamw(t, start, n, inv_prev);
                  });
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("msam_sgd_", &msam_sgd_cpu);
  m.impl("msam_adamw_", &msam_adamw_cpu);
}

}  // namespace saf::cpu
