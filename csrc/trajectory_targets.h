// The trajectory-loss and bank-step wrappers' targets argument (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "saf/trajectory_loss.h"
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

// The kernels' arguments of a trajectory loss over logits [B, C] and target (rows contiguous),
// with the split targets (class labels or probabilities), the gradient's memory (nullptr: loss
// only; rows of C elements) and the per-row losses; shared by the CPU and CUDA wrappers.
inline TrajectoryArgs trajectory_args(const at::Tensor& logits, const at::Tensor& target, const SplitTargets& targets,
                                      void* grad, const at::Tensor& rows, const TrajectoryParams& p) {
  TrajectoryArgs a{};
  a.logits = logits.data_ptr();
  a.target = target.data_ptr();
  a.labels = targets.labels.defined() ? targets.labels.data_ptr<int64_t>() : nullptr;
  a.grad = grad;
  a.row_loss = rows.data_ptr();
  a.scale_dev = nullptr;
  a.rows = logits.size(0);
  a.cols = logits.size(1);
  a.logits_stride = row_stride(logits);
  a.target_stride = row_stride(target);
  a.grad_stride = logits.size(1);
  a.logits_dtype = to_dtype(logits.scalar_type());
  a.target_dtype = to_dtype(target.scalar_type());
  a.p = p;
  if (targets.probs.defined()) {
    a.soft = targets.probs.data_ptr();
    a.soft_stride = row_stride(targets.probs);
    a.soft_dtype = to_dtype(targets.probs.scalar_type());
  }
  return a;
}

}  // namespace saf
