// Build facts of the CPU half of the extension, for `python -m saf_kernels.check`
// (csrc/cuda/build_info_cuda.cpp adds the CUDA half in CUDA builds).
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/isa_dispatch.h"

namespace saf {
namespace {

// "key=value" lines: the instruction sets compiled (setup.py builds the kernels under
// csrc/cpu/kernels once per set on x86), the one chosen at run time, the torch it was built for.
std::string build_info() {
  static const char* const kIsa[] = {"DEFAULT", "AVX2", "AVX512"};
  std::string s;
#if defined(SAF_KERNELS_X86)
  s += "cpu_isas=DEFAULT,AVX2,AVX512\n";
#else
  s += "cpu_isas=DEFAULT\n";
#endif
  s += std::string("cpu_isa_selected=") + kIsa[int(cpu::cpu_isa())] + "\n";
  s += "torch_built=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
       std::to_string(TORCH_VERSION_PATCH) + "\n";
#if defined(SAF_KERNELS_CUDA)
  s += "cuda_built=1\n";
#else
  s += "cuda_built=0\n";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saf_kernels, m) { m.def("_build_info() -> str", &build_info); }

}  // namespace saf
