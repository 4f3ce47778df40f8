// Torch-side plans and argument checks of the ESAM, R-SAM and GSAM multi-tensor ops (layout and
// math: csrc/include/saf/multi_tensor.h; random numbers: csrc/include/saf/philox.h), shared by
// the CPU and CUDA wrappers. Built on csrc/mt_plan.h's Plan, which does the per-tensor checks.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "mt_plan.h"
#include "saf/multi_tensor.h"
#include "saf/philox.h"

namespace saf::mt {

// rng_offset of every tensor padded to a multiple of 4, so that the 4 words of one Philox counter
// serve 4 neighbouring elements of one tensor (saf/philox.h). Returns the total padded length.
inline int64_t pad_rng_offsets(Plan& plan) {
  int64_t off = 0;
  for (int64_t i = 0; i < plan.n_tensors(); ++i) {
    plan.entry(i).rng_offset = off;
    off += (plan.entry(i).numel + 3) / 4 * 4;
  }
  return off;
}

inline void check_unit_interval(at::ArrayRef<double> v, const char* op, const char* name) {
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK_VALUE(v[i] > 0.0 && v[i] <= 1.0, op, ": ", name, "[", i, "] must be in (0, 1], got ", v[i]);
  }
}

inline void check_offset(int64_t offset, const char* op) {
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

// A plan whose chunks are whole rows (output units) of each tensor: chunk c of tensor t covers
// rows [c * param[CHUNK_ROWS], ...) of param[ROW_LEN] elements each, so one CUDA block / CPU task
// sees every element of its rows and can reduce over them without a second pass. The tensor
// entries (and their checks) come from a Plan; the chunk list is this class's own.
class RowPlan {
 public:
  RowPlan(Plan&& base, int64_t chunk_elems) : base_(std::move(base)) {
    for (int64_t i = 0; i < base_.n_tensors(); ++i) {
      TensorEntry& e = base_.entry(i);
      const int64_t R = int64_t(e.param[rsam::ROW_LEN]);
      if (e.numel == 0) continue;
      const int64_t rows = e.numel / R;
      const int64_t per = std::max<int64_t>(1, chunk_elems / R);
      e.param[rsam::CHUNK_ROWS] = double(per);
      const int64_t nc = (rows + per - 1) / per;
      TORCH_CHECK(nc < (int64_t(1) << 31), "too many rows");
      for (int64_t c = 0; c < nc; ++c) chunks_.push_back(ChunkEntry{int32_t(i), int32_t(c)});
    }
  }

  const Plan& base() const { return base_; }
  int64_t n_tensors() const { return base_.n_tensors(); }
  int64_t n_chunks() const { return int64_t(chunks_.size()); }
  const TensorEntry& entry(int64_t i) const { return base_.entry(i); }
  const ChunkEntry& chunk(int64_t c) const { return chunks_[c]; }
  int64_t row_len(int64_t t) const { return int64_t(entry(t).param[rsam::ROW_LEN]); }
  // First row and row count of chunk c.
  void rows_of(int64_t c, int64_t& row0, int64_t& nrows) const {
    const ChunkEntry& ce = chunks_[c];
    const TensorEntry& e = entry(ce.tensor);
    const int64_t per = int64_t(e.param[rsam::CHUNK_ROWS]);
    const int64_t rows = e.numel / int64_t(e.param[rsam::ROW_LEN]);
    row0 = int64_t(ce.chunk) * per;
    nrows = std::min(per, rows - row0);
  }
  int64_t chunk_elems(int64_t c) const {
    int64_t r0, nr;
    rows_of(c, r0, nr);
    return nr * row_len(chunk(c).tensor);
  }
  int64_t total_elements() const { return base_.total_elements(); }

  int64_t bytes() const { return plan_bytes(n_tensors(), n_chunks()); }

  // Same layout as Plan::write, with this plan's chunks (header chunk_size 0: not element chunks).
  void write(uint8_t* dst) const {
    std::memset(dst, 0, size_t(bytes()));
    Header h{};
    h.n_tensors = n_tensors();
    h.n_chunks = n_chunks();
    h.chunk_size = 0;
    h.tensors_offset = align16(sizeof(Header));
    h.chunks_offset = h.tensors_offset + align16(n_tensors() * int64_t(sizeof(TensorEntry)));
    std::memcpy(dst, &h, sizeof(h));
    for (int64_t i = 0; i < n_tensors(); ++i) {
      std::memcpy(dst + h.tensors_offset + i * int64_t(sizeof(TensorEntry)), &entry(i), sizeof(TensorEntry));
    }
    if (n_chunks()) std::memcpy(dst + h.chunks_offset, chunks_.data(), chunks_.size() * sizeof(ChunkEntry));
  }

 private:
  Plan base_;
  std::vector<ChunkEntry> chunks_;
};

// ---------------------------------------------------------------------------------------------
// ESAM
// ---------------------------------------------------------------------------------------------

inline Plan esam_perturb_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                              at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                              at::IntArrayRef flags, double eps, int64_t offset, int64_t stash_mode,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              int64_t chunk) {
  const char* op = "saf_kernels.esam_perturb_";
  check_stash_mode(stash_mode, op);
  check_finite_nonneg(rho, op, "rho");
  check_finite_nonneg(eta, op, "eta");
  check_unit_interval(beta, op, "beta");
  check_offset(offset, op);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(esam::RHO, rho, "rho");
  plan.set_param(esam::ETA, eta, "eta");
  plan.set_param(esam::BETA, beta, "beta");
  plan.set_flags(flags, esam::kAdaptive);
  pad_rng_offsets(plan);
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

inline Plan esam_restore_plan(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t offset,
                              int64_t stash_mode, int64_t chunk) {
  const char* op = "saf_kernels.esam_restore_";
  check_stash_mode(stash_mode, op);
  check_unit_interval(beta, op, "beta");
  check_offset(offset, op);
  Plan plan(op, {{"params", params}, {"stash", stash}, {"stash", stash}}, chunk);
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(esam::BETA, beta, "beta");
  pad_rng_offsets(plan);
  return plan;
}

// ---------------------------------------------------------------------------------------------
// R-SAM
// ---------------------------------------------------------------------------------------------

inline RowPlan rsam_noise_plan(at::TensorList params, at::TensorList stash, at::ArrayRef<double> stdev,
                               int64_t offset, int64_t chunk) {
  const char* op = "saf_kernels.rsam_noise_";
  check_finite_nonneg(stdev, op, "std");
  check_offset(offset, op);
  // Element chunks are irrelevant here (RowPlan makes its own); one per tensor keeps Plan cheap.
  Plan plan(op, {{"params", params}, {"stash", stash}, {"stash", stash}}, std::numeric_limits<int64_t>::max() / 4);
  check_same_dtype(params, stash, op, "params", "stash");
  plan.set_param(rsam::STD, stdev, "std");
  for (int64_t i = 0; i < plan.n_tensors(); ++i) {
    const at::Tensor& p = params[i];
    TensorEntry& e = plan.entry(i);
    if (p.dim() < 2 || p.numel() == 0) {
      e.param[rsam::ROW_LEN] = double(std::max<int64_t>(1, p.numel()));
      e.flags |= rsam::kVector;
      continue;
    }
    const int64_t R = p.numel() / p.size(0);
    // Output unit j must be one block of memory: true for contiguous and channels_last tensors.
    TORCH_CHECK_VALUE(p.size(0) == 1 || p.stride(0) == R, op, ": params[", i, "] (shape ", p.sizes(),
                      ", strides ", p.strides(),
                      ") does not keep each output unit W[j, ...] contiguous in memory (stride(0) must be ", R,
                      "); pass a contiguous tensor");
    e.param[rsam::ROW_LEN] = double(R);
  }
  pad_rng_offsets(plan);
  return RowPlan(std::move(plan), chunk);
}

inline Plan rsam_perturb_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                              at::ArrayRef<double> rho, double lam, double eps,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              int64_t chunk) {
  const char* op = "saf_kernels.rsam_perturb_";
  check_finite_nonneg(rho, op, "rho");
  TORCH_CHECK_VALUE(std::isfinite(lam), op, ": lam must be a finite number, got ", lam);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, stash, op, "params", "stash");
  plan.set_param(rsam::RHO, rho, "rho");
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// GSAM
// ---------------------------------------------------------------------------------------------

inline void check_gsam_scalars(double alpha, double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be a finite number, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

inline Plan gsam_combine_plan(at::TensorList params, at::TensorList grads, at::TensorList old_grads,
                              at::TensorList stash, double alpha, double eps, int64_t stash_mode, bool restore,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& old_grad_scale,
                              const std::optional<at::Tensor>& found_inf, int64_t chunk) {
  const char* op = "saf_kernels.gsam_combine_";
  check_stash_mode(stash_mode, op);
  check_gsam_scalars(alpha, eps, op);
  // Without a restore there is no stash: the params stand in for the unused streams.
  TORCH_CHECK_VALUE(!restore || stash.size() == params.size(), op, ": restore=True needs one stash tensor per param (",
                    params.size(), "), got ", stash.size());
  at::TensorList st = restore ? stash : params;
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", st}, {"params", params}, {"old_grads", old_grads}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, old_grads, op, "params", "old_grads");
  if (restore && stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(old_grad_scale, params[0].device(), op, "old_grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

inline Plan gsam_sgd_plan(at::TensorList params, at::TensorList grads, at::TensorList old_grads, at::TensorList stash,
                          at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                          at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                          double alpha, double eps, int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& old_grad_scale, const std::optional<at::Tensor>& found_inf,
                          int64_t chunk) {
  const char* op = "saf_kernels.gsam_restore_sgd_";
  check_stash_mode(stash_mode, op);
  check_gsam_scalars(alpha, eps, op);
  const bool has_buf = !momentum_buffers.empty();
  Plan plan(op,
            {{"params", params}, {"grads", grads}, {"stash", stash},
             {"momentum_buffers", has_buf ? momentum_buffers : params}, {"old_grads", old_grads}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, old_grads, op, "params", "old_grads");
  check_same_dtype(params, momentum_buffers, op, "params", "momentum_buffers");
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash (copy mode)");
  plan.set_param(sgd::LR, lr, "lr");
  plan.set_param(sgd::WD, weight_decay, "weight_decay");
  plan.set_param(sgd::MOMENTUM, momentum, "momentum");
  plan.set_param(sgd::DAMPENING, dampening, "dampening");
  plan.set_flags(flags, sgd::kNesterov | sgd::kMaximize | sgd::kFirstRun);
  for (int64_t i = 0; i < plan.n_tensors(); ++i) {
    TORCH_CHECK_VALUE(has_buf || plan.entry(i).param[sgd::MOMENTUM] == 0.0, op, ": momentum[", i,
                      "] != 0 needs momentum_buffers");
  }
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(old_grad_scale, params[0].device(), op, "old_grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

// The 64-bit Philox key of a seed given as a torch int (two's complement bits).
inline uint64_t philox_key(int64_t seed) { return static_cast<uint64_t>(seed); }

}  // namespace saf::mt
