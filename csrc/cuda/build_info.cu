// What the CUDA half of the extension was compiled for, for `python -m saf_kernels.check`.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_runtime.h>

#include "cuda/launchers.h"

namespace saf::cuda {
namespace {

__global__ void probe_kernel() {}

#define SAF_STR2(x) #x
#define SAF_STR(x) SAF_STR2(x)

}  // namespace

const char* cuda_arch_list() {
  // nvcc (11.5 and later) defines the list of the -gencode architectures, e.g. 800,900.
#ifdef __CUDA_ARCH_LIST__
  return SAF_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int cuda_runtime_built() { return CUDART_VERSION; }

cudaError_t kernel_versions(int device, int* binary, int* ptx) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, probe_kernel);
  cudaSetDevice(previous);
  *binary = attr.binaryVersion;  // the SASS the runtime picked for this device (e.g. 90), 0 if none
  *ptx = attr.ptxVersion;
  return err;
}

}  // namespace saf::cuda
