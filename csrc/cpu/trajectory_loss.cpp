// CPU implementation of saf_kernels::trajectory_loss: rows split over threads with
// at::parallel_for, each range handled by the build for this CPU's instruction set.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/isa_dispatch.h"
#include "cpu/kernels/kernels.h"
#include "saf/trajectory_loss.h"
#include "torch_utils.h"
#include "trajectory_targets.h"

namespace saf::cpu {


template <typename acc_t>
static at::Tensor sum_rows(const at::Tensor& rows) {
  // Sequential and in double: the same bits whatever the thread count.
  const acc_t* r = rows.data_ptr<acc_t>();
  double s = 0;
  for (int64_t i = 0; i < rows.numel(); ++i) s += double(r[i]);
  return at::scalar_tensor(s, rows.options());
}

std::tuple<at::Tensor, at::Tensor> trajectory_loss_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                       const std::optional<at::Tensor>& labels_in,
                                                       double temperature, double ce_weight, double kl_weight,
                                                       double label_smoothing, int64_t ignore_index,
                                                       int64_t reduction, bool need_grad) {
  check_trajectory_loss_args(logits_in, target_in, labels_in, temperature, label_smoothing, reduction);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = rows_contiguous(target_in);
  // Class labels, or probability targets [B, C] (every row labelled; read in their own dtype).
  const SplitTargets targets = split_targets(labels_in);
  const at::Tensor &labels = targets.labels, &probs = targets.probs;
  const bool soft = probs.defined();

  const int64_t B = logits.size(0), C = logits.size(1);
  const bool f64 = logits.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  at::Tensor rows = at::empty({B}, logits.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor grad = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());

  double scale = 1.0;
  if (static_cast<Reduction>(reduction) == Reduction::Mean) {
    int64_t n = B;  // every row, unless class labels mark some ignored
    if (labels.defined()) {
      const int64_t* y = labels.data_ptr<int64_t>();
      n = 0;
      for (int64_t i = 0; i < B; ++i) n += y[i] != ignore_index;
    }
    scale = n > 0 ? 1.0 / double(n) : 0.0;
  }

  TrajectoryArgs a = trajectory_args(logits, target, targets, need_grad ? grad.data_ptr() : nullptr, rows,
                                     {temperature, ce_weight, kl_weight, label_smoothing, ignore_index, scale});

  const auto kernel = SAF_ISA_PICK(cpu_isa(), trajectory_loss_rows);
  std::atomic<int64_t> bad{-1};
  // About 16K elements per task: small rows are batched, large rows get one task each.
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    const int64_t r = kernel(a, begin, end);
    if (r >= 0) {
      int64_t cur = bad.load();
      while ((cur < 0 || r < cur) && !bad.compare_exchange_weak(cur, r)) {
      }
    }
  });
  const int64_t b = bad.load();
  if (b >= 0 && soft) TORCH_CHECK_VALUE(false, "saf_kernels.trajectory_loss: ", bad_probability_message(probs, b));
  TORCH_CHECK_INDEX(b < 0, "saf_kernels.trajectory_loss: label ", b >= 0 ? labels[b].item<int64_t>() : 0,
                    " of row ", b, " is outside [0, ", C, ") and is not ignore_index (", ignore_index, ")");
  if (static_cast<Reduction>(reduction) == Reduction::None) return {rows, grad};
  return {f64 ? sum_rows<double>(rows) : sum_rows<float>(rows), grad};
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("trajectory_loss", &trajectory_loss_cpu);
}

}  // namespace saf::cpu
