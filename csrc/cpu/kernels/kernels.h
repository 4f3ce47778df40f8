// Entry points of the per-instruction-set CPU kernels (csrc/cpu/kernels/*.cpp). Each is compiled
// into namespace saf::cpu::<CAPABILITY>; the declarations below are repeated per capability.
#pragma once

#include <cstdint>

#include "saf/trajectory_loss.h"

#define SAF_CPU_KERNEL_DECLS                                                                 \
  /* Rows [begin, end) of the fused trajectory loss; returns the first bad-label row or -1. */ \
  int64_t trajectory_loss_rows(const TrajectoryArgs& a, int64_t begin, int64_t end);

namespace saf::cpu {
namespace DEFAULT {
SAF_CPU_KERNEL_DECLS
}
#if defined(SAF_KERNELS_X86)
namespace AVX2 {
SAF_CPU_KERNEL_DECLS
}
namespace AVX512 {
SAF_CPU_KERNEL_DECLS
}
#endif
}  // namespace saf::cpu
