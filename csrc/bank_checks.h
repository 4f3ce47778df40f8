// Argument checks of saf_kernels::saf_bank_step / saf_bank_record, shared by the CPU and CUDA
// wrappers (torch side; never included by .cu files). Metadata only: no host synchronisation.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "saf/trajectory_bank.h"
#include "torch_utils.h"

namespace saf {

// Where the bank may live for logits on `dev`: the same device, or pinned host memory for CUDA
// logits (the CUDA kernels reach it through unified virtual addressing).
inline bool bank_storage_ok(const at::Tensor& t, const at::Device& dev) {
  if (t.device() == dev) return true;
  return dev.is_cuda() && t.device().is_cpu() && t.is_pinned();
}

inline void check_bank_storage(const char* fn, const at::Tensor& values, const at::Tensor& epochs,
                               const at::Tensor& claims, const at::Tensor& state, int64_t classes,
                               const at::Device& dev) {
  TORCH_CHECK(values.dim() == 3, fn, ": bank values must be [num_samples, delay, classes], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16 ||
                  values.scalar_type() == at::kHalf,
              fn, ": bank values must be float32, bfloat16 or float16, got ", values.scalar_type());
  TORCH_CHECK(values.size(2) == classes, fn, ": the bank holds ", values.size(2), " classes but logits have ",
              classes);
  TORCH_CHECK(values.size(1) >= 1, fn, ": the bank needs at least one slot (delay >= 1), got shape ",
              values.sizes());
  TORCH_CHECK(values.is_contiguous(), fn, ": bank values must be contiguous");
  TORCH_CHECK(epochs.scalar_type() == at::kInt && epochs.dim() == 2 && epochs.size(0) == values.size(0) &&
                  epochs.size(1) == values.size(1) && epochs.is_contiguous(),
              fn, ": bank epochs must be a contiguous int32 tensor of shape [", values.size(0), ", ",
              values.size(1), "], got ", epochs.scalar_type(), " ", epochs.sizes());
  TORCH_CHECK(claims.scalar_type() == at::kInt && claims.dim() == 1 && claims.size(0) == values.size(0) &&
                  claims.is_contiguous(),
              fn, ": bank claims must be a contiguous int32 tensor of shape [", values.size(0), "], got ",
              claims.scalar_type(), " ", claims.sizes());
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.size(0) == kBankStateSize &&
                  state.is_contiguous(),
              fn, ": bank state must be a contiguous int64 tensor of shape [", int64_t(kBankStateSize), "], got ",
              state.scalar_type(), " ", state.sizes());
  TORCH_CHECK(bank_storage_ok(values, dev) && bank_storage_ok(epochs, dev), fn, ": bank values (", values.device(),
              values.is_pinned() ? ", pinned" : "", ") and epochs (", epochs.device(),
              ") must be on the logits' device (", dev, ") or, for CUDA logits, in pinned host memory");
  TORCH_CHECK(claims.device() == dev && state.device() == dev, fn, ": bank claims (", claims.device(),
              ") and state (", state.device(), ") must be on the logits' device (", dev, ")");
}

inline void check_ids(const char* fn, const at::Tensor& ids, int64_t rows, const at::Device& dev) {
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == rows, fn, ": sample ids must have shape [", rows, "], got ",
              ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, fn,
              ": sample ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == dev, fn, ": sample ids are on ", ids.device(), " but logits are on ", dev);
}

inline void check_epoch(const char* fn, int64_t epoch) {
  TORCH_CHECK(epoch >= 0 && epoch < std::numeric_limits<int32_t>::max(), fn,
              ": epoch must be in [0, 2^31 - 1), got ", epoch);
}

inline void check_bank_step_args(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                                 const at::Tensor& ids, const at::Tensor& values, const at::Tensor& epochs,
                                 const at::Tensor& claims, const at::Tensor& state, int64_t epoch,
                                 double temperature, double label_smoothing) {
  const char* fn = "saf_kernels.saf_bank_step";
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be 2-D [B, C], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, fn, ": logits need at least one class");
  to_dtype(logits.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), fn,
              ": temperature must be a finite number > 0, got ", temperature);
  check_epoch(fn, epoch);
  check_ids(fn, ids, logits.size(0), logits.device());
  if (labels) {
    check_targets(fn, *labels, logits);
    TORCH_CHECK(!is_probability_targets(*labels) || label_smoothing == 0.0, fn, ": label_smoothing (",
                label_smoothing, ") applies to class-index labels; fold it into the probability targets");
  }
  check_bank_storage(fn, values, epochs, claims, state, logits.size(1), logits.device());
}

inline void check_bank_record_args(const at::Tensor& rows, const at::Tensor& ids, const at::Tensor& values,
                                   const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state,
                                   int64_t epoch) {
  const char* fn = "saf_kernels.saf_bank_record";
  TORCH_CHECK(rows.dim() == 2, fn, ": rows must be 2-D [B, C], got shape ", rows.sizes());
  to_dtype(rows.scalar_type());
  check_epoch(fn, epoch);
  check_ids(fn, ids, rows.size(0), rows.device());
  check_bank_storage(fn, values, epochs, claims, state, rows.size(1), rows.device());
}

}  // namespace saf
