// Host entry points of the .cu kernels (raw pointers and a stream; no torch types).
#pragma once

#include <cuda_runtime.h>

#include "saf/trajectory_loss.h"

namespace saf::cuda {

cudaError_t trajectory_loss_launch(const TrajectoryArgs& a, cudaStream_t stream);

// Writes 1 / #(labels != ignore_index) (0 if none) as float, or double if f64, to out.
cudaError_t inv_valid_count_launch(const int64_t* labels, int64_t n, int64_t ignore_index, void* out, bool f64,
                                   cudaStream_t stream);

// Build facts (build_info.cu): the architectures nvcc compiled for ("800,900"), the CUDA runtime
// version compiled against, and for a device the binary and PTX versions of the kernel image the
// runtime loaded (binary 0: none matched, the PTX was compiled at load time).
const char* cuda_arch_list();
int cuda_runtime_built();
cudaError_t kernel_versions(int device, int* binary, int* ptx);

}  // namespace saf::cuda
