// Torch-side helpers shared by the CPU and CUDA op wrappers (never included by .cu files).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>
#include <string>

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

// The row stride in elements of a tensor from rows_contiguous: stride(0) whatever the width (a
// [B, 1] view such as x[:, :1] keeps the row stride of x; an expanded tensor has 0).
inline int64_t row_stride(const at::Tensor& t) {
  return t.stride(0);
}

// Targets of the cross-entropy term: class indices [B] (int64/int32), or probabilities [B, C]
// (a floating dtype), as F.cross_entropy's target.
inline bool is_probability_targets(const at::Tensor& targets) {
  return at::isFloatingType(targets.scalar_type());
}

inline void check_targets(const char* fn, const at::Tensor& targets, const at::Tensor& logits) {
  TORCH_CHECK(targets.device() == logits.device(), fn, ": labels are on ", targets.device(), " but logits are on ",
              logits.device());
  if (is_probability_targets(targets)) {
    to_dtype(targets.scalar_type());
    TORCH_CHECK(targets.dim() == 2 && targets.sizes() == logits.sizes(), fn,
                ": probability targets must have the logits' shape ", logits.sizes(), ", got ", targets.sizes());
    return;
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), fn, ": labels must have shape [",
              logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, fn,
              ": labels must be int64 or int32 class indices or floating probabilities, got ",
              targets.scalar_type());
}

// "probability targets of row r hold v at column c": the error of a row the CPU kernel flagged
// (a host tensor; an error path, so a plain scan).
inline std::string bad_probability_message(const at::Tensor& targets, int64_t row) {
  const at::Tensor r = targets.select(0, row).to(at::kDouble).contiguous();
  const double* v = r.data_ptr<double>();
  int64_t c = 0;
  while (c + 1 < r.numel() && std::isfinite(v[c]) && v[c] >= 0) ++c;
  std::ostringstream os;
  os << "probability targets must be finite and >= 0; row " << row << " holds " << v[c] << " at column " << c;
  return os.str();
}

// Checks shared by every backend of saf_kernels::trajectory_loss.
inline void check_trajectory_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& labels, double temperature,
                                       double label_smoothing, int64_t reduction) {
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
    check_targets("saf_kernels.trajectory_loss", *labels, logits);
    TORCH_CHECK(!is_probability_targets(*labels) || label_smoothing == 0.0,
                "saf_kernels.trajectory_loss: label_smoothing (", label_smoothing,
                ") applies to class-index labels; fold it into the probability targets");
  }
}

}  // namespace saf
