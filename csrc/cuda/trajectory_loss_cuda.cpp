// Torch-side wrapper of the CUDA trajectory-loss kernel: checks, allocation, stream, launch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_check.h"
#include "cuda/launchers.h"
#include "torch_utils.h"
#include "trajectory_targets.h"

namespace saf::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> trajectory_loss_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                        const std::optional<at::Tensor>& labels_in,
                                                        double temperature, double ce_weight, double kl_weight,
                                                        double label_smoothing, int64_t ignore_index,
                                                        int64_t reduction, bool need_grad) {
  check_trajectory_loss_args(logits_in, target_in, labels_in, temperature, label_smoothing, reduction);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor logits = rows_contiguous(logits_in);
  at::Tensor target = rows_contiguous(target_in);
  // The kernel pairs float64 only with float64 (a rare, test-only combination).
  const bool f64 = logits.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  const at::Tensor logits_k = f64 ? logits.to(at::kDouble) : logits;
  if (f64) target = target.to(at::kDouble);
  // Class labels, or probability targets [B, C] (every row labelled; read in their own dtype).
  const SplitTargets targets = split_targets(labels_in);
  const at::Tensor& labels = targets.labels;

  const int64_t B = logits.size(0), C = logits.size(1);
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty({B}, logits.options().dtype(acc));
  at::Tensor grad = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor grad_k = (need_grad && logits_k.scalar_type() != grad.scalar_type()) ? at::empty_like(logits_k) : grad;

  TrajectoryArgs a = trajectory_args(logits_k, target, targets, need_grad ? grad_k.data_ptr() : nullptr, rows,
                                     {temperature, ce_weight, kl_weight, label_smoothing, ignore_index, 1.0});

  at::Tensor scale;
  if (static_cast<Reduction>(reduction) == Reduction::Mean && B > 0) {
    if (labels.defined()) {
      scale = at::empty({}, logits.options().dtype(acc));
      SAF_CUDA_CHECK(inv_valid_count_launch(a.labels, B, ignore_index, scale.data_ptr(), f64, stream),
                     "trajectory_loss");
      a.scale_dev = scale.data_ptr();
    } else {
      a.p.scale = 1.0 / double(B);
    }
  }
  SAF_CUDA_CHECK(trajectory_loss_launch(a, stream), "trajectory_loss");
  if (need_grad && grad_k.data_ptr() != grad.data_ptr()) grad.copy_(grad_k);
  if (static_cast<Reduction>(reduction) == Reduction::None) return {rows, grad};
  return {rows.sum(), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(saf_kernels, CUDA, m) {
  m.impl("trajectory_loss", &trajectory_loss_cuda);
}

}  // namespace saf::cuda
