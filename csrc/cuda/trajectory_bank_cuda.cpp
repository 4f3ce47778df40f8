// Torch-side wrappers of the CUDA trajectory-bank kernels: checks, allocation, stream, launches.
// The bank's values and tags may be in pinned host memory (reached through unified virtual
// addressing); its claims and state are always on the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_check.h"
#include "bank_checks.h"
#include "cuda/trajectory_bank_launchers.h"
#include "trajectory_targets.h"

namespace saf::cuda {
namespace {

static BankPrepassArgs prepass_args(const at::Tensor& ids, const at::Tensor& labels, const at::Tensor& epochs,
                                    const at::Tensor& claims, const at::Tensor& state, const at::Tensor& mode,
                                    const at::Tensor& counts, const at::Tensor& scales, int64_t num_samples,
                                    int64_t delay, int64_t epoch, int64_t ignore_index, bool use_past, bool record,
                                    bool duplicates_are_errors) {
  BankPrepassArgs p{};
  p.ids = ids.data_ptr<int64_t>();
  p.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  p.tags = epochs.data_ptr<int32_t>() + epoch % delay;
  p.claims = claims.data_ptr<int32_t>();
  p.state = state.data_ptr<int64_t>();
  p.row_mode = mode.data_ptr<uint8_t>();
  p.counts = counts.data_ptr<int64_t>();
  p.scales = scales.data_ptr();
  p.rows = ids.size(0);
  p.num_samples = num_samples;
  p.tag_stride = delay;
  p.ignore_index = ignore_index;
  p.epoch = epoch;
  p.delay = delay;
  p.use_past = use_past;
  p.record = record;
  p.duplicates_are_errors = duplicates_are_errors;
  p.f64 = scales.scalar_type() == at::kDouble;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> saf_bank_step_cuda(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& labels_in, const at::Tensor& ids_in,
    const at::Tensor& values, const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state,
    int64_t epoch, double temperature, double ce_weight, double kl_weight, double label_smoothing,
    int64_t ignore_index, bool use_past, bool record, bool need_grad) {
  check_bank_step_args(logits_in, labels_in, ids_in, values, epochs, claims, state, epoch, temperature,
                       label_smoothing);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  // Class labels, or probability targets [B, C] (every row labelled; read in their own dtype).
  const SplitTargets targets = split_targets(labels_in);
  const at::Tensor &labels = targets.labels, &probs = targets.probs;
  const bool soft = probs.defined();
  const int64_t B = logits.size(0), C = logits.size(1), N = values.size(0), S = values.size(1);
  const bool f64 = logits.scalar_type() == at::kDouble;
  const auto opts = logits.options();
  const auto acc = f64 ? at::kDouble : at::kFloat;

  at::Tensor rows = at::empty({B}, opts.dtype(acc));
  // The step kernel's last block writes the loss: no fill launch unless there is no block.
  at::Tensor loss = B > 0 ? at::empty({}, opts.dtype(acc)) : at::zeros({}, opts.dtype(acc));
  at::Tensor grad = need_grad ? at::empty({B, C}, opts) : at::empty({0}, opts);
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  at::Tensor scales = at::empty({2}, opts.dtype(acc));
  at::Tensor mode = at::empty({B}, opts.dtype(at::kByte));

  const BankPrepassArgs p = prepass_args(ids, labels, epochs, claims, state, mode, counts, scales, N, S, epoch,
                                         ignore_index, use_past, record, /*duplicates_are_errors=*/true);
  SAF_CUDA_CHECK(bank_prepass_launch(p, stream), "saf_bank_step");

  TrajectoryArgs a{};
  a.logits = logits.data_ptr();
  a.target = static_cast<char*>(values.data_ptr()) + (epoch % S) * C * values.element_size();
  a.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.row_loss = rows.data_ptr();
  a.scale_dev = scales.data_ptr();
  a.kl_scale_dev = static_cast<char*>(scales.data_ptr()) + scales.element_size();
  a.rows = B;
  a.cols = C;
  a.logits_stride = row_stride(logits);
  a.target_stride = S * C;
  a.grad_stride = C;
  a.logits_dtype = to_dtype(logits.scalar_type());
  a.target_dtype = to_dtype(values.scalar_type());
  a.p = TrajectoryParams{temperature, ce_weight, kl_weight, label_smoothing, ignore_index, 1.0};
  a.target_index = ids.data_ptr<int64_t>();
  a.row_mode = mode.data_ptr<uint8_t>();
  if (soft) {
    a.soft = probs.data_ptr();
    a.soft_stride = row_stride(probs);
    a.soft_dtype = to_dtype(probs.scalar_type());
  }
  SAF_CUDA_CHECK(bank_step_launch(a, loss.data_ptr(), state.data_ptr<int64_t>() + kStateDone, stream),
                 "saf_bank_step");
  return {loss, grad, counts};
}

void saf_bank_record_cuda(const at::Tensor& rows_in, const at::Tensor& ids_in, const at::Tensor& values,
                          const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state,
                          int64_t epoch) {
  check_bank_record_args(rows_in, ids_in, values, epochs, claims, state, epoch);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor rows = rows_contiguous(rows_in);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t B = rows.size(0), C = rows.size(1), N = values.size(0), S = values.size(1);
  const auto opts = rows.options();
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  at::Tensor scales = at::empty({2}, opts.dtype(at::kFloat));
  at::Tensor mode = at::empty({B}, opts.dtype(at::kByte));
  // Repeated ids in a gathered batch are legitimate (DistributedSampler padding): skipped, no flag.
  const BankPrepassArgs p = prepass_args(ids, at::Tensor(), epochs, claims, state, mode, counts, scales, N, S, epoch,
                                         -100, /*use_past=*/false, /*record=*/true, /*duplicates_are_errors=*/false);
  SAF_CUDA_CHECK(bank_prepass_launch(p, stream), "saf_bank_record");
  BankRecordArgs r{};
  r.src = rows.data_ptr();
  r.ids = ids.data_ptr<int64_t>();
  r.mode = mode.data_ptr<uint8_t>();
  r.slot = static_cast<char*>(values.data_ptr()) + (epoch % S) * C * values.element_size();
  r.rows = B;
  r.cols = C;
  r.src_stride = row_stride(rows);
  r.slot_stride = S * C;
  r.src_dtype = to_dtype(rows.scalar_type());
  r.bank_dtype = to_dtype(values.scalar_type());
  SAF_CUDA_CHECK(bank_record_launch(r, stream), "saf_bank_record");
}

}  // namespace

TORCH_LIBRARY_IMPL(saf_kernels, CUDA, m) {
  m.impl("saf_bank_step", &saf_bank_step_cuda);
  m.impl("saf_bank_record", &saf_bank_record_cuda);
}

}  // namespace saf::cuda
