// Host entry points of the multi-tensor .cu kernels (sam.cu, ema.cu, esam.cu, rsam.cu, gsam.cu,
// looksam.cu, msam.cu): a plan already in device memory (csrc/include/saf/multi_tensor.h), raw
// pointers and a stream; no torch types. A reduction is two launches: a partial-sum stage (*_norm / *_dots: k sums per
// chunk into a float64 array, sum j of chunk c at j * n_chunks + c) and a one-block finalize
// (*_coef) that sums them in a fixed order; a collective may sit between the two.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace saf::cuda {

// Chunk length the plans for these kernels must be built with. Every launcher takes f64: true
// when the plan holds float64 tensors (a separate instantiation; see multi_tensor.cuh).
int64_t mt_chunk_size();

// Pass 1 of sam_perturb_: partials[c] = sum over chunk c of (T g)^2.
cudaError_t sam_norm_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream);

// One block: sums the partials in a fixed order, writes the norm of the unscaled gradients
// (float, or double if norm_f64) to norm_out and the perturbation coefficient (0: perturb
// nothing) to coef_out. grad_scale and found_inf are optional float32 device scalars.
cudaError_t sam_coef_launch(const double* partials, int64_t n_chunks, const float* grad_scale,
                            const float* found_inf, double eps, void* norm_out, bool norm_f64, double* coef_out,
                            cudaStream_t stream);

// Pass 2: w += rho T^2 g coef with the stash written (stash_mode 0 copy, 1 delta).
cudaError_t sam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, const double* coef, int64_t stash_mode,
                               cudaStream_t stream);

cudaError_t sam_restore_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode, cudaStream_t stream);

// Restore + torch.optim.SGD / AdamW step; found_inf > 0 restores only.
cudaError_t sam_restore_sgd_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                   const float* grad_scale, const float* found_inf, cudaStream_t stream);
cudaError_t sam_restore_adamw_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                     const float* grad_scale, const float* found_inf, cudaStream_t stream);

// ema = lerp(ema, model, 1 - decay); decay from decay_dev (a float64 device scalar) if given.
cudaError_t ema_update_launch(const void* plan, int64_t n_chunks, bool f64, double decay, const double* decay_dev,
                              cudaStream_t stream);

// ---- ESAM, R-SAM, GSAM, philox_; the norm's finalize is sam_coef_launch ----

// philox_: n values of the stream into out (dtype: 0 f32, 1 f16, 2 bf16, 3 f64, 4 int64 words).
constexpr int32_t kPhiloxInt64 = 4;
cudaError_t philox_launch(void* out, int32_t dtype, int64_t n, uint64_t key, uint64_t offset, int64_t kind,
                          uint32_t threshold, cudaStream_t stream);

// ESAM pass 1: partials[c] = sum over chunk c of (keep T g)^2.
cudaError_t esam_norm_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                             double* partials, cudaStream_t stream);
// ESAM pass 2: w += keep rho / beta T^2 g coef, stash written (coef from sam_coef_launch).
cudaError_t esam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                const double* coef, int64_t stash_mode, cudaStream_t stream);
// ESAM delta-mode restore: w -= stash where the regenerated mask keeps the element.
cudaError_t esam_restore_delta_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                      cudaStream_t stream);

// R-SAM noise over a row plan (chunks of whole rows): stash = w, w += std_mult std ||row|| z.
// The *_mult arguments carry a factor common to every tensor (the schedules' std_t and rho_t)
// outside the plan, so that the cached device plan stays the same from step to step.
cudaError_t rsam_noise_launch(const void* row_plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                              double std_mult, cudaStream_t stream);
// R-SAM: partials of ||lam g / grad_scale + (w - stash)||^2, then w = stash + rho d coef.
cudaError_t rsam_norm_launch(const void* plan, int64_t n_chunks, bool f64, double lam, const float* grad_scale,
                             double* partials, cudaStream_t stream);
cudaError_t rsam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, double lam, const float* grad_scale,
                                const double* coef, double rho_mult, cudaStream_t stream);

// GSAM: partials (3 arrays of n_chunks: <old_g, g>, |old_g|^2, |g|^2), then one block computing
// coefs[0..2] = (c_new, c_old, apply) and stats (cos, ||old_g||, ||g||; float or double).
cudaError_t gsam_dots_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream);
cudaError_t gsam_coef_launch(const double* partials, int64_t n_chunks, const float* grad_scale,
                             const float* old_grad_scale, const float* found_inf, double alpha, double eps,
                             double* coefs, void* stats, bool stats_f64, cudaStream_t stream);
// g = c_new g + c_old old_g (if apply), w restored from the stash (if restore).
cudaError_t gsam_combine_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, bool restore,
                                int64_t stash_mode, cudaStream_t stream);
// Restore + torch.optim.SGD with the combined gradient (apply false: restore only).
cudaError_t gsam_sgd_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, int64_t stash_mode,
                            cudaStream_t stream);

// ---- LookSAM, Momentum-SAM; their reductions reuse gsam_dots_launch / sam_norm_launch and
// LookSAM's reuse step gsam_combine_launch, over plans in those slots (csrc/mt_plan.h) ----

// looksam_gv_: one block over gsam_dots' partials: coefs[0..1] = (c, applies) and the stats
// (cos, |g|, |g_s|; float or double); then gv = g_s - c g with partials[c] = sum over chunk c of
// the stored gv^2 (nothing when c does not apply); then one block: gv_norm = sqrt(sum) if it applies.
cudaError_t looksam_gv_coef_launch(const double* partials, int64_t n_chunks, double eps, double* coefs, void* stats,
                                   bool stats_f64, cudaStream_t stream);
cudaError_t looksam_gv_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, double* partials,
                              cudaStream_t stream);
cudaError_t looksam_norm_launch(const double* partials, int64_t n_chunks, const double* coefs, void* gv_norm,
                                bool norm_f64, cudaStream_t stream);
// looksam_combine_: one block over sam_norm's partials of |g|^2: GSAM's coefs (1, coef, applies)
// for gsam_combine_launch, and |g| into norm_out.
cudaError_t looksam_combine_coef_launch(const double* partials, int64_t n_chunks, const void* gv_norm, bool norm_f64,
                                        double alpha, double eps, double* coefs, void* norm_out, bool out_f64,
                                        cudaStream_t stream);

// Momentum-SAM pass 1 (un-perturb with rho_prev * inv, the buffer / moments, the step), partials[c]
// = sum over chunk c of the stored buffer's (exp_avg's) squares; inv is a one-element device
// tensor of dtype inv_dt. Then one block: inv = 1 / (|buf| + eps), |buf| into norm_out; then
// pass 2: w -= rho inv buf (inv as stored).
cudaError_t msam_sgd_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                            double* partials, cudaStream_t stream);
cudaError_t msam_adamw_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                              double* partials, cudaStream_t stream);
cudaError_t msam_inv_launch(const double* partials, int64_t n_chunks, double eps, void* inv, int32_t inv_dt,
                            void* norm_out, bool out_f64, cudaStream_t stream);
cudaError_t msam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                                cudaStream_t stream);

}  // namespace saf::cuda
