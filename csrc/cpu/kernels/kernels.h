// Entry points of the per-instruction-set CPU kernels (csrc/cpu/kernels/*.cpp). Each is compiled
// into namespace saf::cpu::<CAPABILITY>; the declarations below are repeated per capability.
#pragma once

#include <cstdint>

#include "saf/multi_tensor.h"
#include "saf/trajectory_loss.h"

#define SAF_CPU_KERNEL_DECLS                                                                 \
  /* Rows [begin, end) of the fused trajectory loss; returns the first bad-label row or -1. */ \
  int64_t trajectory_loss_rows(const TrajectoryArgs& a, int64_t begin, int64_t end);         \
  /* Rows [begin, end) of probability targets: the first with a value < 0 or non-finite, or -1. */ \
  int64_t probability_check_rows(const void* y, DType dtype, int64_t row_stride, int64_t cols, int64_t begin, \
                                 int64_t end);                                                \
  SAF_CPU_MT_KERNEL_DECLS                                                                    \
  SAF_CPU_ESAM_KERNEL_DECLS                                                                  \
  SAF_CPU_CHEAP_KERNEL_DECLS

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

// ---- ESAM, R-SAM, GSAM kernels (csrc/cpu/kernels/{esam,rsam,gsam}.cpp); key / offset: Philox ----
#define SAF_CPU_ESAM_KERNEL_DECLS                                                                        \
  /* ESAM: sum of (keep T g)^2 over the chunk (keep: Bernoulli(beta) at each element's position). */     \
  double esam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, uint64_t key, uint64_t offset); \
  /* w += keep rho / beta T^2 g coef; stash w (copy) or the rounded perturbation (delta). */              \
  void esam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double coef, int64_t mode,  \
                          uint64_t key, uint64_t offset);                                                 \
  /* copy: w = stash; delta: w -= stash where the regenerated mask keeps the element. */                \
  void esam_restore_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, int64_t mode, uint64_t key, \
                          uint64_t offset);                                                               \
  /* R-SAM: rows [row0, row0 + nrows): stash = w; w += std * ||row|| * N(0, 1). */                        \
  void rsam_noise_chunk(const mt::TensorEntry& t, int64_t row0, int64_t nrows, uint64_t key, uint64_t offset); \
  /* R-SAM: sum of d^2, d = lam * g * inv_scale + (w - stash); then w = stash + rho d coef. */           \
  double rsam_norm_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale); \
  void rsam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double lam, double inv_scale, \
                          double coef);                                                                   \
  /* GSAM: out[0..2] = sum old_g g, sum old_g^2, sum g^2 over the chunk. */                             \
  void gsam_dots_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double* out);                 \
  /* GSAM: g = c_new g + c_old old_g (if apply), w = restored (if restore). */                           \
  void gsam_combine_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old, \
                          bool apply, bool restore, int64_t mode);                                        \
  /* GSAM: restore + torch.optim.SGD with c_new g + c_old old_g (apply false: restore only). */          \
  void gsam_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c_new, double c_old,     \
                      bool apply, int64_t mode);
// ---- end ESAM, R-SAM, GSAM kernels ----

// ---- LookSAM, Momentum-SAM kernels (csrc/cpu/kernels/{looksam,msam}.cpp; their reductions and
// LookSAM's reuse step are GSAM's and SAM's chunk kernels over plans in those slots) ----
#define SAF_CPU_CHEAP_KERNEL_DECLS                                                                       \
  /* LookSAM: gv = g_s - c g (the stored values); returns the sum of gv^2 over the chunk. */            \
  double looksam_gv_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double c);               \
  /* Momentum-SAM pass 1: un-perturb (rho_prev inv_prev), buffer / moments, step; returns the sum of   \
     the stored buffer's (exp_avg's) squares over the chunk. */                                         \
  double msam_sgd_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev);          \
  double msam_adamw_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv_prev);        \
  /* Momentum-SAM pass 2 (both): w -= rho inv buf. */                                                   \
  void msam_perturb_chunk(const mt::TensorEntry& t, int64_t start, int64_t n, double inv);
// ---- end LookSAM, Momentum-SAM kernels ----

// Every multi-tensor chunk kernel above, X(name) for name##_chunk (csrc/cpu/multi_tensor.h's table).
#define SAF_MT_KERNELS(X)                                                                              \
  X(sam_norm) X(sam_perturb) X(sam_restore) X(sam_restore_sgd) X(sam_restore_adamw) X(ema) X(esam_norm) \
      X(esam_perturb) X(esam_restore) X(rsam_noise) X(rsam_norm) X(rsam_perturb) X(gsam_dots)            \
          X(gsam_combine) X(gsam_sgd) X(looksam_gv) X(msam_sgd) X(msam_adamw) X(msam_perturb)

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
