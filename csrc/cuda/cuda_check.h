// The one error check of the torch-side CUDA wrappers (csrc/cuda/*_cuda.cpp): a launcher's
// cudaError_t becomes a torch error naming the op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define SAF_CUDA_CHECK(expr, what)                                                                      \
  do {                                                                                                  \
    const cudaError_t err_ = (expr);                                                                    \
    TORCH_CHECK(err_ == cudaSuccess, "saf_kernels.", what, ": CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)
