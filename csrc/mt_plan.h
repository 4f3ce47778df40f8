// Torch-side construction of a multi-tensor plan (layout: csrc/include/saf/multi_tensor.h),
// shared by the CPU and CUDA op wrappers. All argument checks of the multi-tensor ops live here,
// in C++, so that a step over hundreds of tensors pays no per-tensor Python cost.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "saf/multi_tensor.h"
#include "torch_utils.h"

namespace saf::mt {

struct StreamSpec {
  const char* name;
  at::TensorList tensors;
  bool scalar = false;  // one element per tensor (e.g. AdamW's step), not a full stream
};

class Plan {
 public:
  // Checks the lists (equal lengths, floating dtypes, one device, equal shapes and dense layouts
  // with the same strides as the first stream) and lays out the chunks. Empty tensors get an
  // entry but no chunk.
  Plan(const std::string& op, const std::vector<StreamSpec>& streams, int64_t chunk_size)
      : op_(op), chunk_size_(chunk_size) {
    TORCH_CHECK(!streams.empty() && streams.size() <= size_t(kMaxLists), op, ": bad stream count");
    const int64_t n = int64_t(streams[0].tensors.size());
    chunks_.reserve(size_t(n));
    for (const auto& s : streams) {
      TORCH_CHECK_VALUE(int64_t(s.tensors.size()) == n, op, ": ", s.name, " has ", s.tensors.size(),
                        " tensors but ", streams[0].name, " has ", n);
    }
    entries_.resize(n);
    int64_t offset = 0;
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& p = streams[0].tensors[i];
      TensorEntry& e = entries_[i];
      std::memset(&e, 0, sizeof(e));
      for (int k = 0; k < kMaxLists; ++k) e.dtype[k] = -1;
      bool aligned = true;
      for (size_t k = 0; k < streams.size(); ++k) {
        const at::Tensor& t = streams[k].tensors[i];
        // The message pieces are only evaluated when a check fails: a step over hundreds of
        // tensors pays for the comparisons alone.
#define SAF_WHERE op, ": ", streams[k].name, "[", i, "]"
        TORCH_CHECK_VALUE(t.defined(), SAF_WHERE, " is undefined (None)");
        TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), SAF_WHERE, " has dtype ", t.scalar_type(),
                         "; expected float32, float16, bfloat16 or float64");
        TORCH_CHECK_VALUE(t.device() == streams[0].tensors[0].device(), SAF_WHERE, " is on ", t.device(), " but ",
                          streams[0].name, "[0] is on ", streams[0].tensors[0].device());
        TORCH_CHECK_VALUE(!t.is_sparse(), SAF_WHERE, " is sparse; only dense tensors are supported");
        if (streams[k].scalar) {
          TORCH_CHECK_VALUE(t.numel() == 1, SAF_WHERE, " must have one element, got shape ", t.sizes());
        } else if (k > 0) {
          TORCH_CHECK_VALUE(t.sizes() == p.sizes(), SAF_WHERE, " has shape ", t.sizes(), " but ", streams[0].name,
                            "[", i, "] has shape ", p.sizes());
          TORCH_CHECK_VALUE(t.numel() <= 1 || t.strides() == p.strides(), SAF_WHERE, " has strides ", t.strides(),
                            " but ", streams[0].name, "[", i, "] has strides ", p.strides(),
                            " (the lists must share one memory layout)");
        }
        TORCH_CHECK_VALUE(t.numel() <= 1 || t.is_non_overlapping_and_dense(), SAF_WHERE, " is not dense (strides ",
                          t.strides(), "); pass a contiguous tensor");
#undef SAF_WHERE
        e.ptr[k] = t.data_ptr();
        e.dtype[k] = int32_t(to_dtype(t.scalar_type()));
        const int64_t vec_bytes = 4 * t.element_size();
        aligned = aligned && reinterpret_cast<uintptr_t>(e.ptr[k]) % uintptr_t(vec_bytes) == 0;
      }
      e.numel = p.numel();
      e.rng_offset = offset;
      e.flags = aligned ? kAligned : 0;
      offset += e.numel;
      const int64_t nc = (e.numel + chunk_size - 1) / chunk_size;
      TORCH_CHECK(nc < (int64_t(1) << 31), op, ": tensor ", i, " is too large (", e.numel, " elements)");
      for (int64_t c = 0; c < nc; ++c) chunks_.push_back(ChunkEntry{int32_t(i), int32_t(c)});
    }
    n_streams_ = int32_t(streams.size());
    total_ = offset;
  }

  int64_t n_tensors() const { return int64_t(entries_.size()); }
  int64_t n_chunks() const { return int64_t(chunks_.size()); }
  int64_t chunk_size() const { return chunk_size_; }
  int64_t total_elements() const { return total_; }
  TensorEntry& entry(int64_t i) { return entries_[i]; }
  const TensorEntry& entry(int64_t i) const { return entries_[i]; }
  const ChunkEntry& chunk(int64_t c) const { return chunks_[c]; }
  // Elements in chunk c.
  int64_t chunk_len(int64_t c) const {
    const ChunkEntry& ce = chunks_[c];
    return std::min(chunk_size_, entries_[ce.tensor].numel - int64_t(ce.chunk) * chunk_size_);
  }

  // Per-tensor scalars: one value per tensor (lists of length 1 are broadcast).
  void set_param(int k, at::ArrayRef<double> values, const char* name) {
    check_len(values.size(), name);
    for (int64_t i = 0; i < n_tensors(); ++i) entries_[i].param[k] = values[values.size() == 1 ? 0 : i];
  }
  void set_flags(at::IntArrayRef flags, int32_t allowed) {
    check_len(flags.size(), "flags");
    for (int64_t i = 0; i < n_tensors(); ++i) {
      const int64_t f = flags[flags.size() == 1 ? 0 : i];
      TORCH_CHECK_VALUE((f & ~int64_t(allowed)) == 0, op_, ": flags[", i, "] = ", f, " has unknown bits");
      entries_[i].flags |= int32_t(f);
    }
  }

  int64_t bytes() const { return plan_bytes(n_tensors(), n_chunks()); }

  // Serialises the plan into dst (bytes() bytes).
  void write(uint8_t* dst) const {
    std::memset(dst, 0, size_t(bytes()));
    Header h{};
    h.n_tensors = n_tensors();
    h.n_chunks = n_chunks();
    h.chunk_size = chunk_size_;
    h.tensors_offset = align16(sizeof(Header));
    h.chunks_offset = h.tensors_offset + align16(n_tensors() * int64_t(sizeof(TensorEntry)));
    h.n_lists = n_streams_;
    std::memcpy(dst, &h, sizeof(h));
    if (n_tensors()) std::memcpy(dst + h.tensors_offset, entries_.data(), entries_.size() * sizeof(TensorEntry));
    if (n_chunks()) std::memcpy(dst + h.chunks_offset, chunks_.data(), chunks_.size() * sizeof(ChunkEntry));
  }

 private:
  static bool is_supported_float(at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
  }
  void check_len(size_t len, const char* name) const {
    TORCH_CHECK_VALUE(int64_t(len) == n_tensors() || (len == 1 && n_tensors() > 0), op_, ": ", name, " has ", len,
                      " values for ", n_tensors(), " tensors");
  }

  std::string op_;
  int64_t chunk_size_;
  int32_t n_streams_ = 0;
  int64_t total_ = 0;
  std::vector<TensorEntry> entries_;
  std::vector<ChunkEntry> chunks_;
};

// Checks shared by the backends of the SAM ops.
inline void check_same_dtype(at::TensorList a, at::TensorList b, const char* op, const char* na, const char* nb,
                             const char* why = "") {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    TORCH_CHECK_TYPE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", nb, "[", i, "] has dtype ", b[i].scalar_type(),
                     " but ", na, "[", i, "] has dtype ", a[i].scalar_type(), why);
  }
}

inline void check_finite_nonneg(at::ArrayRef<double> v, const char* op, const char* name) {
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(v[i]) && v[i] >= 0, op, ": ", name, "[", i, "] must be a finite number >= 0, got ",
                      v[i]);
  }
}

inline void check_stash_mode(int64_t mode, const char* op) {
  TORCH_CHECK_VALUE(mode == sam::COPY || mode == sam::DELTA, op, ": stash_mode must be 0 (copy) or 1 (delta), got ",
                    mode);
}

// An optional one-element floating tensor on `device` (GradScaler's scale or found_inf flag).
inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const at::Device& device, const char* op,
                                const char* name) {
  if (!t) return;
  TORCH_CHECK_VALUE(t->numel() == 1, op, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK_TYPE(t->is_floating_point(), op, ": ", name, " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " is on ", t->device(), " but the tensors are on ", device);
}

// Kernels write through raw pointers; bump the autograd version counters as an in-place torch op
// would, so that a graph that saved one of these tensors reports the modification.
inline void bump_versions(at::TensorList l) {
  for (const auto& t : l) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

inline bool any_f64(at::TensorList l) {
  for (const auto& t : l) {
    if (t.scalar_type() == at::kDouble) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// The plans of each op, with every check, shared by the CPU and CUDA wrappers.
// ---------------------------------------------------------------------------------------------

inline Plan sam_perturb_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                             at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::IntArrayRef flags, double eps,
                             int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, int64_t chunk) {
  const char* op = "saf_kernels.sam_perturb_";
  check_stash_mode(stash_mode, op);
  check_finite_nonneg(rho, op, "rho");
  check_finite_nonneg(eta, op, "eta");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash", " (stash_mode copy keeps the weights)");
  plan.set_param(sam::RHO, rho, "rho");
  plan.set_param(sam::ETA, eta, "eta");
  plan.set_flags(flags, sam::kAdaptive);
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

inline Plan sam_restore_plan(at::TensorList params, at::TensorList stash, int64_t stash_mode, int64_t chunk) {
  const char* op = "saf_kernels.sam_restore_";
  check_stash_mode(stash_mode, op);
  // No gradients here: the stash fills slot G too.
  Plan plan(op, {{"params", params}, {"stash", stash}, {"stash", stash}}, chunk);
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash", " (stash_mode copy keeps the weights)");
  return plan;
}

inline Plan sam_sgd_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                         at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                         int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, int64_t chunk) {
  const char* op = "saf_kernels.sam_restore_sgd_";
  check_stash_mode(stash_mode, op);
  // Without momentum there is no buffer: the params stand in for the unused stream.
  const bool has_buf = !momentum_buffers.empty();
  Plan plan(op,
            {{"params", params}, {"grads", grads}, {"stash", stash},
             {"momentum_buffers", has_buf ? momentum_buffers : params}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, momentum_buffers, op, "params", "momentum_buffers");
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash", " (stash_mode copy keeps the weights)");
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
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

inline Plan sam_adamw_plan(at::TensorList params, at::TensorList grads, at::TensorList stash, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList steps, at::ArrayRef<double> lr,
                           at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                           at::ArrayRef<double> weight_decay, at::IntArrayRef flags, int64_t stash_mode,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           int64_t chunk) {
  const char* op = "saf_kernels.sam_restore_adamw_";
  check_stash_mode(stash_mode, op);
  Plan plan(op,
            {{"params", params}, {"grads", grads}, {"stash", stash}, {"exp_avg", exp_avg},
             {"exp_avg_sq", exp_avg_sq}, {"steps", steps, /*scalar=*/true}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, exp_avg, op, "params", "exp_avg");
  check_same_dtype(params, exp_avg_sq, op, "params", "exp_avg_sq");
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash", " (stash_mode copy keeps the weights)");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_TYPE(steps[i].scalar_type() == at::kFloat, op, ": steps[", i, "] must be float32, got ",
                     steps[i].scalar_type());
  }
  plan.set_param(adamw::LR, lr, "lr");
  plan.set_param(adamw::BETA1, beta1, "beta1");
  plan.set_param(adamw::BETA2, beta2, "beta2");
  plan.set_param(adamw::EPS, eps, "eps");
  plan.set_param(adamw::WD, weight_decay, "weight_decay");
  plan.set_flags(flags, adamw::kMaximize);
  if (!params.empty()) {
    check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
    check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
  }
  return plan;
}

inline Plan ema_plan(at::TensorList ema, at::TensorList model, double decay, const std::optional<at::Tensor>& decay_tensor,
                     int64_t chunk) {
  const char* op = "saf_kernels.ema_update_";
  Plan plan(op, {{"ema", ema}, {"model", model}}, chunk);
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ", decay);
  if (decay_tensor && !ema.empty()) check_scalar_tensor(decay_tensor, ema[0].device(), op, "decay");
  return plan;
}

}  // namespace saf::mt
