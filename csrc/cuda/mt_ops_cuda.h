// The torch-side CUDA entry points of the multi-tensor ops, one per registered op: defined in
// csrc/cuda/<method>_cuda.cpp (plan, checks, launches), registered together in mt_ops_cuda.cpp so
// that a method's file is its wrappers and nothing else.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace saf::cuda {

// sam_cuda.cpp
at::Tensor sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                            at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::IntArrayRef flags, double eps,
                            int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq);
at::Tensor sam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                          at::IntArrayRef flags);
void sam_restore_cuda(at::TensorList params, at::TensorList stash, int64_t stash_mode);
void sam_restore_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                          at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                          at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                          int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf);
void sam_restore_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, at::TensorList steps, at::ArrayRef<double> lr,
                            at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                            at::ArrayRef<double> weight_decay, at::IntArrayRef flags, int64_t stash_mode,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// ema_cuda.cpp
void ema_update_cuda(at::TensorList ema, at::TensorList model, double decay,
                     const std::optional<at::Tensor>& decay_tensor);

// esam_cuda.cpp
void philox_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t kind, double p);
at::Tensor esam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                             at::IntArrayRef flags, double eps, int64_t seed, int64_t offset, int64_t stash_mode,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sumsq);
at::Tensor esam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                           at::ArrayRef<double> beta, at::IntArrayRef flags, int64_t seed, int64_t offset);
void esam_restore_cuda(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t seed,
                       int64_t offset, int64_t stash_mode);

// rsam_cuda.cpp
void rsam_noise_cuda(at::TensorList params, at::TensorList stash, at::ArrayRef<double> stdev, int64_t seed,
                     int64_t offset);
at::Tensor rsam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, double lam, double eps,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& sumsq);
at::Tensor rsam_sumsq_cuda(at::TensorList params, at::TensorList grads, at::TensorList stash, double lam,
                           const std::optional<at::Tensor>& grad_scale);

// gsam_cuda.cpp
at::Tensor gsam_combine_cuda(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                             at::TensorList stash, double alpha, double eps, int64_t stash_mode, bool restore,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& old_grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums);
at::Tensor gsam_restore_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                                 at::TensorList stash, at::TensorList momentum_buffers, at::ArrayRef<double> lr,
                                 at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                                 at::ArrayRef<double> dampening, at::IntArrayRef flags, double alpha, double eps,
                                 int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& old_grad_scale,
                                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& sums);
at::Tensor gsam_sums_cuda(at::TensorList grads, at::TensorList old_grads);

// looksam_cuda.cpp
at::Tensor looksam_gv_cuda(at::TensorList gv, const at::Tensor& gv_norm, at::TensorList grads, at::TensorList old_grads,
                           double eps, const std::optional<at::Tensor>& sums);
at::Tensor looksam_combine_cuda(at::TensorList grads, at::TensorList gv, const at::Tensor& gv_norm, double alpha,
                                double eps, const std::optional<at::Tensor>& sumsq);

// msam_cuda.cpp
at::Tensor msam_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const at::Tensor& inv_norm, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> rho_prev, at::ArrayRef<double> rho,
                         double eps);
at::Tensor msam_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList steps, const at::Tensor& inv_norm,
                           at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                           at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay, at::ArrayRef<double> rho_prev,
                           at::ArrayRef<double> rho, double norm_eps);

}  // namespace saf::cuda
