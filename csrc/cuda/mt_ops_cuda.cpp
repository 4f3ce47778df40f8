// One registration table for the CUDA kernels of every multi-tensor op (declared in
// mt_ops_cuda.h, defined in csrc/cuda/<method>_cuda.cpp).
#include <torch/library.h>

#include "cuda/mt_ops_cuda.h"

namespace saf::cuda {

TORCH_LIBRARY_IMPL(saf_kernels, CUDA, m) {
  m.impl("sam_perturb_", &sam_perturb_cuda);
  m.impl("sam_sumsq", &sam_sumsq_cuda);
  m.impl("sam_restore_", &sam_restore_cuda);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_cuda);
  m.impl("sam_restore_adamw_", &sam_restore_adamw_cuda);
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("philox_", &philox_cuda);
  m.impl("esam_perturb_", &esam_perturb_cuda);
  m.impl("esam_sumsq", &esam_sumsq_cuda);
  m.impl("esam_restore_", &esam_restore_cuda);
  m.impl("rsam_noise_", &rsam_noise_cuda);
  m.impl("rsam_perturb_", &rsam_perturb_cuda);
  m.impl("rsam_sumsq", &rsam_sumsq_cuda);
  m.impl("gsam_combine_", &gsam_combine_cuda);
  m.impl("gsam_restore_sgd_", &gsam_restore_sgd_cuda);
  m.impl("gsam_sums", &gsam_sums_cuda);
  m.impl("looksam_gv_", &looksam_gv_cuda);
  m.impl("looksam_combine_", &looksam_combine_cuda);
  m.impl("msam_sgd_", &msam_sgd_cuda);
  m.impl("msam_adamw_", &msam_adamw_cuda);
}

}  // namespace saf::cuda
