// Host entry points of the ESAM / R-SAM / GSAM .cu kernels (esam.cu, rsam.cu, gsam.cu): plans
// already in device memory (csrc/include/saf/multi_tensor.h), raw pointers and a stream; no
// torch types. Element plans are built with mt_chunk_size() (mt_launchers.h); the norm's
// finalize is sam_coef_launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace saf::cuda {

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

}  // namespace saf::cuda
