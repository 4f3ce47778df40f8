// Build facts of the CUDA half of the extension (csrc/cuda/build_info.cu), for
// `python -m saf_kernels.check`.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/launchers.h"

namespace saf::cuda {
namespace {

// "key=value" lines: the architectures compiled for and the CUDA runtime version built against.
std::string cuda_build_info() {
  const int v = cuda_runtime_built();
  return std::string("cuda_archs=") + cuda_arch_list() + "\ncuda_runtime_built=" + std::to_string(v / 1000) + "." +
         std::to_string((v % 1000) / 10) + "\n";
}

// [binary version, PTX version] of the kernel image the runtime loaded for `device`.
std::vector<int64_t> cuda_kernel_versions(int64_t device) {
  int binary = 0, ptx = 0;
  SAF_CUDA_CHECK(kernel_versions(int(device), &binary, &ptx), "_cuda_kernel_versions");
  return {binary, ptx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saf_kernels, m) {
  m.def("_cuda_build_info() -> str", &cuda_build_info);
  m.def("_cuda_kernel_versions(int device) -> int[]", &cuda_kernel_versions);
}

}  // namespace saf::cuda
