// Shared by the CPU (C++) and CUDA (.cu) kernels. No torch headers here: .cu files that include
// this compile with plain nvcc on machines whose torch is a CPU build.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SAF_HD __host__ __device__ __forceinline__
#else
#define SAF_HD inline
#endif

namespace saf {

// Element types crossing the torch-free boundary (kernels take raw pointers and one of these).
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

SAF_HD int dtype_size(DType t) {
  return t == DType::F64 ? 8 : (t == DType::F32 ? 4 : 2);
}

}  // namespace saf
