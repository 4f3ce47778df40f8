// Torch-side helpers shared by the CPU and CUDA op wrappers (never included by .cu files).
#pragma once

#include <ATen/ATen.h>

#include "saf/common.h"

namespace saf {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK(false, "saf_kernels: unsupported dtype ", t, " (expected float32, float16, bfloat16 or float64)");
  }
}

// A 2-D tensor whose rows are contiguous (the kernels take a row stride).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) ? t : t.contiguous();
}

inline int64_t row_stride(const at::Tensor& t) {
  return t.size(1) <= 1 ? t.size(1) : t.stride(0);
}

// Checks shared by every backend of saf_kernels::trajectory_loss.
inline void check_trajectory_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& labels, double temperature,
                                       int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "saf_kernels.trajectory_loss: reduction must be 0 (none), 1 (sum) or 2 (mean), got ", reduction);
  TORCH_CHECK(logits.dim() == 2, "saf_kernels.trajectory_loss: logits must be 2-D [B, C], got shape ",
              logits.sizes());
  TORCH_CHECK(target.sizes() == logits.sizes(), "saf_kernels.trajectory_loss: target_logits shape ",
              target.sizes(), " differs from logits shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "saf_kernels.trajectory_loss: logits need at least one class");
  TORCH_CHECK(target.device() == logits.device(), "saf_kernels.trajectory_loss: target_logits is on ",
              target.device(), " but logits are on ", logits.device());
  to_dtype(logits.scalar_type());
  to_dtype(target.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "saf_kernels.trajectory_loss: temperature must be a finite number > 0, got ", temperature);
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == logits.size(0),
                "saf_kernels.trajectory_loss: labels must have shape [", logits.size(0), "], got ", labels->sizes());
    TORCH_CHECK(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt,
                "saf_kernels.trajectory_loss: labels must be int64 or int32, got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == logits.device(), "saf_kernels.trajectory_loss: labels are on ",
                labels->device(), " but logits are on ", logits.device());
  }
}

}  // namespace saf
