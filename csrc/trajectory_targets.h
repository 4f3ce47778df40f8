// The trajectory-loss and bank-step wrappers' targets argument (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "torch_utils.h"

namespace saf {

// The op's labels argument split by kind: class labels as contiguous int64 [B], or probability
// targets [B, C] with contiguous rows, read in their own dtype by the kernels (no conversion
// pass); both undefined without labels.
struct SplitTargets {
  at::Tensor labels, probs;
};

inline SplitTargets split_targets(const std::optional<at::Tensor>& labels) {
  SplitTargets out;
  if (labels && is_probability_targets(*labels)) {
    out.probs = rows_contiguous(*labels);
  } else if (labels) {
    out.labels = labels->to(at::kLong).contiguous();
  }
  return out;
}

}  // namespace saf
