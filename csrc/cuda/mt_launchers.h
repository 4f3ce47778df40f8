// Host entry points of the multi-tensor .cu kernels (sam.cu, ema.cu): a plan already in device
// memory (csrc/include/saf/multi_tensor.h), raw pointers and a stream; no torch types.
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

}  // namespace saf::cuda
