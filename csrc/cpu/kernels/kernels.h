// Entry points of the per-instruction-set CPU kernels (csrc/cpu/kernels/*.cpp). Each is compiled
// into namespace saf::cpu::<CAPABILITY>; the declarations below are repeated per capability.
#pragma once

#include <cstdint>

#include "saf/multi_tensor.h"
#include "saf/trajectory_loss.h"

#define SAF_CPU_KERNEL_DECLS                                                                 \
  /* Rows [begin, end) of the fused trajectory loss; returns the first bad-label row or -1. */ \
  int64_t trajectory_loss_rows(const TrajectoryArgs& a, int64_t begin, int64_t end);         \
  SAF_CPU_MT_KERNEL_DECLS

// ---- multi-tensor kernels (SAM family, EMA): elements [start, start + n) of one plan entry ----
#define SAF_CPU_MT_KERNEL_DECLS                                                                         \
  /* Sum of (T g)^2 (T = |w| + eta where adaptive, else 1). */                                          \
  double sam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n);                            \
  /* w += rho T^2 g coef; stash w (copy mode) or the rounded perturbation (delta mode). */              \
  void sam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode); \
  void sam_restore_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode);             \
  /* Restore, then torch.optim.SGD / AdamW on the restored weights with g * inv_scale. */               \
  void sam_restore_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode,          \
                             double inv_scale);                                                          \
  void sam_restore_adamw_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode,        \
                               double inv_scale);                                                        \
  /* ema = lerp(ema, model, weight), weight = 1 - decay. */                                              \
  void ema_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double weight);
// ---- end multi-tensor kernels ----

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
