// Host entry points of the .cu kernels (raw pointers and a stream; no torch types).
#pragma once

#include <cuda_runtime.h>

#include "saf/trajectory_loss.h"

namespace saf::cuda {

cudaError_t trajectory_loss_launch(const TrajectoryArgs& a, cudaStream_t stream);

// Writes 1 / #(labels != ignore_index) (0 if none) as float, or double if f64, to out.
cudaError_t inv_valid_count_launch(const int64_t* labels, int64_t n, int64_t ignore_index, void* out, bool f64,
                                   cudaStream_t stream);

}  // namespace saf::cuda
