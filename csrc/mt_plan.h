// Torch-side construction of a multi-tensor plan (layout: csrc/include/saf/multi_tensor.h),
// shared by the CPU and CUDA op wrappers of every multi-tensor op (SAM / ASAM, the fused
// restore + SGD / AdamW, EMA, ESAM, R-SAM, GSAM). All argument checks of these ops live here, in
// C++, so that a step over hundreds of tensors pays no per-tensor Python cost.
//
// One Plan class serves every op: element chunks (chunk_size elements of one tensor), or, after
// chunk_by_rows(), chunks of whole rows (R-SAM's noise, which reduces over each output unit).
// Both serialise to the same layout and share one device cache (csrc/mt_plan_cache.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "saf/multi_tensor.h"
#include "saf/philox.h"
#include "torch_utils.h"

namespace saf::mt {

// Two same-shape tensors order their elements alike when their strides agree on every dimension
// of size > 1 (a size-1 dimension's stride is arbitrary: a [1, 7] view with strides (1, 1) lies
// in memory as a contiguous [1, 7]).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

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
          TORCH_CHECK_VALUE(t.numel() <= 1 || same_layout(t, p), SAF_WHERE, " has strides ", t.strides(),
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

  // The row variant: chunk c of tensor t covers rows [c * param[CHUNK_ROWS], ...) of
  // param[rsam::ROW_LEN] elements each (every tensor's ROW_LEN set by the caller, dividing its
  // numel), about chunk_elems elements per chunk, so that one CUDA block / CPU task sees every
  // element of its rows and can reduce over them without a second pass. The header's chunk_size
  // becomes 0 (not element chunks).
  void chunk_by_rows(int64_t chunk_elems) {
    chunks_.clear();
    rows_ = true;
    for (int64_t i = 0; i < n_tensors(); ++i) {
      TensorEntry& e = entries_[i];
      if (e.numel == 0) continue;
      const int64_t R = int64_t(e.param[rsam::ROW_LEN]);
      const int64_t per = std::max<int64_t>(1, chunk_elems / R);
      e.param[rsam::CHUNK_ROWS] = double(per);
      const int64_t nc = (e.numel / R + per - 1) / per;
      TORCH_CHECK(nc < (int64_t(1) << 31), op_, ": tensor ", i, " has too many rows (", e.numel / R, ")");
      for (int64_t c = 0; c < nc; ++c) chunks_.push_back(ChunkEntry{int32_t(i), int32_t(c)});
    }
  }

  int64_t n_tensors() const { return int64_t(entries_.size()); }
  int64_t n_chunks() const { return int64_t(chunks_.size()); }
  int64_t chunk_size() const { return rows_ ? 0 : chunk_size_; }
  int64_t total_elements() const { return total_; }
  TensorEntry& entry(int64_t i) { return entries_[i]; }
  const TensorEntry& entry(int64_t i) const { return entries_[i]; }
  const ChunkEntry& chunk(int64_t c) const { return chunks_[c]; }
  // Row variant: first row and row count of chunk c.
  void rows_of(int64_t c, int64_t& row0, int64_t& nrows) const {
    const ChunkEntry& ce = chunks_[c];
    const TensorEntry& e = entries_[ce.tensor];
    const int64_t per = int64_t(e.param[rsam::CHUNK_ROWS]);
    row0 = int64_t(ce.chunk) * per;
    nrows = std::min(per, e.numel / int64_t(e.param[rsam::ROW_LEN]) - row0);
  }
  // First element and element count of chunk c (either variant).
  int64_t chunk_start(int64_t c) const {
    if (!rows_) return int64_t(chunks_[c].chunk) * chunk_size_;
    int64_t r0, nr;
    rows_of(c, r0, nr);
    return r0 * int64_t(entries_[chunks_[c].tensor].param[rsam::ROW_LEN]);
  }
  int64_t chunk_len(int64_t c) const {
    const ChunkEntry& ce = chunks_[c];
    if (!rows_) return std::min(chunk_size_, entries_[ce.tensor].numel - int64_t(ce.chunk) * chunk_size_);
    int64_t r0, nr;
    rows_of(c, r0, nr);
    return nr * int64_t(entries_[ce.tensor].param[rsam::ROW_LEN]);
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
    h.chunk_size = chunk_size();
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
  bool rows_ = false;
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
template <class... More>
inline void bump_versions(at::TensorList l, const More&... more) {
  bump_versions(l);
  (bump_versions(more), ...);
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

inline void check_unit_interval(at::ArrayRef<double> v, const char* op, const char* name) {
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK_VALUE(v[i] > 0.0 && v[i] <= 1.0, op, ": ", name, "[", i, "] must be in (0, 1], got ", v[i]);
  }
}

inline void check_offset(int64_t offset, const char* op) {
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

// A copy-mode stash holds the weights themselves: same dtype as the params.
inline void check_copy_stash(at::TensorList params, at::TensorList stash, int64_t stash_mode, const char* op) {
  if (stash_mode == sam::COPY) check_same_dtype(params, stash, op, "params", "stash", " (stash_mode copy keeps the weights)");
}

// GradScaler's tensors (grad_scale, found_inf, GSAM's old_grad_scale), each optional, on the
// params' device.
inline void check_amp(at::TensorList params, const char* op, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& old_grad_scale = std::nullopt) {
  if (params.empty()) return;
  check_scalar_tensor(grad_scale, params[0].device(), op, "grad_scale");
  check_scalar_tensor(old_grad_scale, params[0].device(), op, "old_grad_scale");
  check_scalar_tensor(found_inf, params[0].device(), op, "found_inf");
}

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

// The 64-bit Philox key of a seed given as a torch int (two's complement bits).
inline uint64_t philox_key(int64_t seed) { return static_cast<uint64_t>(seed); }

// philox_'s arguments (both backends): kind 0 raw words into int64, 1-3 values into a float.
inline void check_philox(const at::Tensor& out, int64_t offset, int64_t kind, double p) {
  const char* op = "saf_kernels.philox_";
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, op, ": kind must be 0 (words), 1 (uniform), 2 (normal) or 3 (bernoulli), got ",
                    kind);
  check_offset(offset, op);
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  if (kind == 0) {
    TORCH_CHECK_TYPE(out.scalar_type() == at::kLong, op, ": kind 0 (raw words) needs an int64 out, got ",
                     out.scalar_type());
  } else {
    TORCH_CHECK_TYPE(out.is_floating_point(), op, ": kinds 1-3 need a floating out, got ", out.scalar_type());
  }
  TORCH_CHECK_VALUE(kind != 3 || (p >= 0.0 && p <= 1.0), op, ": p must be in [0, 1], got ", p);
}

// torch.optim.SGD's hyper-parameters and flags in sgd's slots (fused restore + SGD of SAM and
// GSAM); without momentum buffers the params stand in for the unused stream.
inline void set_sgd(Plan& plan, bool has_buf, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                    const char* op) {
  plan.set_param(sgd::LR, lr, "lr");
  plan.set_param(sgd::WD, weight_decay, "weight_decay");
  plan.set_param(sgd::MOMENTUM, momentum, "momentum");
  plan.set_param(sgd::DAMPENING, dampening, "dampening");
  plan.set_flags(flags, sgd::kNesterov | sgd::kMaximize | sgd::kFirstRun);
  for (int64_t i = 0; i < plan.n_tensors(); ++i) {
    TORCH_CHECK_VALUE(has_buf || plan.entry(i).param[sgd::MOMENTUM] == 0.0, op, ": momentum[", i,
                      "] != 0 needs momentum_buffers");
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
                             const std::optional<at::Tensor>& found_inf, int64_t chunk,
                             const char* op = "saf_kernels.sam_perturb_") {
  check_stash_mode(stash_mode, op);
  check_finite_nonneg(rho, op, "rho");
  check_finite_nonneg(eta, op, "eta");
  check_eps(eps, op);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_copy_stash(params, stash, stash_mode, op);
  plan.set_param(sam::RHO, rho, "rho");
  plan.set_param(sam::ETA, eta, "eta");
  plan.set_flags(flags, sam::kAdaptive);
  check_amp(params, op, grad_scale, found_inf);
  return plan;
}

// The plan of sam_perturb_'s partial-sum stage alone (sam_sumsq): its streams w and g (the
// gradients stand in for the stash, never read), eta and the adaptive flags.
inline Plan sam_sumsq_plan(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                           at::IntArrayRef flags, int64_t chunk, const char* op = "saf_kernels.sam_sumsq") {
  check_finite_nonneg(eta, op, "eta");
  Plan plan(op, {{"params", params}, {"grads", grads}, {"grads", grads}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  plan.set_param(sam::ETA, eta, "eta");
  plan.set_flags(flags, sam::kAdaptive);
  return plan;
}

// sam_perturb_'s optional sumsq: a one-element floating tensor on the params' device.
inline void check_sumsq(at::TensorList params, const std::optional<at::Tensor>& sumsq, const char* op) {
  if (!params.empty()) check_scalar_tensor(sumsq, params[0].device(), op, "sumsq");
}

inline Plan sam_restore_plan(at::TensorList params, at::TensorList stash, int64_t stash_mode, int64_t chunk,
                             const char* op = "saf_kernels.sam_restore_") {
  check_stash_mode(stash_mode, op);
  // No gradients here: the stash fills slot G too.
  Plan plan(op, {{"params", params}, {"stash", stash}, {"stash", stash}}, chunk);
  check_copy_stash(params, stash, stash_mode, op);
  return plan;
}

inline Plan sam_sgd_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                         at::TensorList momentum_buffers, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                         at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, at::IntArrayRef flags,
                         int64_t stash_mode, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, int64_t chunk) {
  const char* op = "saf_kernels.sam_restore_sgd_";
  check_stash_mode(stash_mode, op);
  const bool has_buf = !momentum_buffers.empty();
  Plan plan(op,
            {{"params", params}, {"grads", grads}, {"stash", stash},
             {"momentum_buffers", has_buf ? momentum_buffers : params}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, momentum_buffers, op, "params", "momentum_buffers");
  check_copy_stash(params, stash, stash_mode, op);
  set_sgd(plan, has_buf, lr, weight_decay, momentum, dampening, flags, op);
  check_amp(params, op, grad_scale, found_inf);
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
  check_copy_stash(params, stash, stash_mode, op);
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
  check_amp(params, op, grad_scale, found_inf);
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

// ---- ESAM ----

inline Plan esam_perturb_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                              at::ArrayRef<double> rho, at::ArrayRef<double> eta, at::ArrayRef<double> beta,
                              at::IntArrayRef flags, double eps, int64_t offset, int64_t stash_mode,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              int64_t chunk) {
  const char* op = "saf_kernels.esam_perturb_";
  check_unit_interval(beta, op, "beta");
  check_offset(offset, op);
  // The streams, flags and rho / eta slots of sam_perturb_ (esam's enums name the same slots).
  Plan plan =
      sam_perturb_plan(params, grads, stash, rho, eta, flags, eps, stash_mode, grad_scale, found_inf, chunk, op);
  plan.set_param(esam::BETA, beta, "beta");
  pad_rng_offsets(plan);
  return plan;
}

// The plan of esam_perturb_'s partial-sum stage alone (esam_sumsq): sam_sumsq's streams and
// slots, beta and the padded Philox positions (the mask drawn as esam_perturb_ draws it).
inline Plan esam_sumsq_plan(at::TensorList params, at::TensorList grads, at::ArrayRef<double> eta,
                            at::ArrayRef<double> beta, at::IntArrayRef flags, int64_t offset, int64_t chunk) {
  const char* op = "saf_kernels.esam_sumsq";
  check_unit_interval(beta, op, "beta");
  check_offset(offset, op);
  Plan plan = sam_sumsq_plan(params, grads, eta, flags, chunk, op);
  plan.set_param(esam::BETA, beta, "beta");
  pad_rng_offsets(plan);
  return plan;
}

inline Plan esam_restore_plan(at::TensorList params, at::TensorList stash, at::ArrayRef<double> beta, int64_t offset,
                              int64_t stash_mode, int64_t chunk) {
  const char* op = "saf_kernels.esam_restore_";
  check_unit_interval(beta, op, "beta");
  check_offset(offset, op);
  Plan plan = sam_restore_plan(params, stash, stash_mode, chunk, op);
  plan.set_param(esam::BETA, beta, "beta");
  pad_rng_offsets(plan);
  return plan;
}

// ---- R-SAM ----

// Row plan (Plan::chunk_by_rows): output unit j of a tensor with 2+ dims is the slice W[j, ...]
// (contiguous); a tensor with fewer dims is one unit (flag rsam::kVector).
inline Plan rsam_noise_plan(at::TensorList params, at::TensorList stash, at::ArrayRef<double> stdev, int64_t offset,
                            int64_t chunk) {
  const char* op = "saf_kernels.rsam_noise_";
  check_finite_nonneg(stdev, op, "std");
  check_offset(offset, op);
  // Element chunks are irrelevant here (chunk_by_rows replaces them); one per tensor keeps it cheap.
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
  plan.chunk_by_rows(chunk);
  return plan;
}

// The plan of rsam_perturb_'s partial-sum stage (rsam_sumsq; rho unset) and, with rho, of
// rsam_perturb_ itself.
inline Plan rsam_sumsq_plan(at::TensorList params, at::TensorList grads, at::TensorList stash, double lam,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            int64_t chunk, const char* op = "saf_kernels.rsam_sumsq") {
  TORCH_CHECK_VALUE(std::isfinite(lam), op, ": lam must be a finite number, got ", lam);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"stash", stash}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, stash, op, "params", "stash");
  check_amp(params, op, grad_scale, found_inf);
  return plan;
}

inline Plan rsam_perturb_plan(at::TensorList params, at::TensorList grads, at::TensorList stash,
                              at::ArrayRef<double> rho, double lam, double eps,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              int64_t chunk) {
  const char* op = "saf_kernels.rsam_perturb_";
  check_finite_nonneg(rho, op, "rho");
  check_eps(eps, op);
  Plan plan = rsam_sumsq_plan(params, grads, stash, lam, grad_scale, found_inf, chunk, op);
  plan.set_param(rsam::RHO, rho, "rho");
  return plan;
}

// ---- GSAM ----

inline void check_gsam_scalars(double alpha, double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be a finite number, got ", alpha);
  check_eps(eps, op);
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
  if (restore) check_copy_stash(params, stash, stash_mode, op);
  check_amp(params, op, grad_scale, found_inf, old_grad_scale);
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
  check_copy_stash(params, stash, stash_mode, op);
  set_sgd(plan, has_buf, lr, weight_decay, momentum, dampening, flags, op);
  check_amp(params, op, grad_scale, found_inf, old_grad_scale);
  return plan;
}

// The plan of the GSAM ops' partial-sum stage alone (gsam_sums): G = grads, OLD_G = old_grads;
// the unused slots repeat grads.
inline Plan gsam_sums_plan(at::TensorList grads, at::TensorList old_grads, int64_t chunk) {
  const char* op = "saf_kernels.gsam_sums";
  Plan plan(op, {{"grads", grads}, {"grads", grads}, {"grads", grads}, {"grads", grads}, {"old_grads", old_grads}},
            chunk);
  check_same_dtype(grads, old_grads, op, "grads", "old_grads");
  return plan;
}

// The GSAM ops' optional sums: 3 floating values on the tensors' device.
inline void check_sums(at::TensorList params, const std::optional<at::Tensor>& sums, const char* op) {
  if (!sums.has_value() || params.empty()) return;
  TORCH_CHECK_VALUE(sums->numel() == 3 && sums->is_floating_point(), op,
                    ": sums must be 3 floating values [<old_g, g>, |old_g|^2, |g|^2], got shape ", sums->sizes(), " ",
                    sums->scalar_type());
  TORCH_CHECK_VALUE(sums->device() == params[0].device(), op, ": sums is on ", sums->device(),
                    " but the tensors are on ", params[0].device());
}

// ---- LookSAM, Momentum-SAM ----

// A one-element state tensor of an op (LookSAM's gv_norm: float32 or float64; Momentum-SAM's
// inv_norm: any float dtype) on the tensors' device.
inline void check_state_scalar(const at::Tensor& t, at::TensorList tensors, const char* op, const char* name,
                               bool any_float) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(t.numel() == 1 && t.is_floating_point(), op, ": ", name,
                    " must be a one-element floating tensor, got shape ", t.sizes(), " ", st);
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || (any_float && (st == at::kHalf || st == at::kBFloat16)),
                   op, ": ", name, " must be ", any_float ? "float32, float16, bfloat16 or float64" : "float32 or float64",
                   ", got ", st);
  if (!tensors.empty()) {
    TORCH_CHECK_VALUE(t.device() == tensors[0].device(), op, ": ", name, " is on ", t.device(),
                      " but the tensors are on ", tensors[0].device());
  }
}

// looksam_gv_ in GSAM's slots, so that GSAM's partial sums serve as they are: G = g_s (grads),
// OLD_G = g (old_grads), gsam's dots giving <g, g_s>, |g|^2, |g_s|^2; gv in slot looksam::GV
// (= gsam::W); the unused slots repeat gv.
inline Plan looksam_gv_plan(at::TensorList gv, const at::Tensor& gv_norm, at::TensorList grads,
                            at::TensorList old_grads, double eps, int64_t chunk) {
  const char* op = "saf_kernels.looksam_gv_";
  check_eps(eps, op);
  static_assert(int(looksam::GV) == int(gsam::W) && int(looksam::GS) == int(gsam::G),
                "looksam_gv_ lives in gsam's slots");
  Plan plan(op, {{"gv", gv}, {"grads", grads}, {"gv", gv}, {"gv", gv}, {"old_grads", old_grads}}, chunk);
  check_same_dtype(gv, grads, op, "gv", "grads");
  check_same_dtype(gv, old_grads, op, "gv", "old_grads");
  check_state_scalar(gv_norm, gv, op, "gv_norm", false);
  return plan;
}

// looksam_combine_ in GSAM's slots: g += coef * gv is gsam_combine_'s g = c_new g + c_old old_g
// with c_new = 1, c_old = coef, old_g = gv, no restore; |g|^2 is sam_perturb_'s norm of slot
// sam::G without the adaptive flag. The unused slots repeat grads.
inline Plan looksam_combine_plan(at::TensorList grads, at::TensorList gv, const at::Tensor& gv_norm, double alpha,
                                 double eps, int64_t chunk) {
  const char* op = "saf_kernels.looksam_combine_";
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be a finite number, got ", alpha);
  check_eps(eps, op);
  static_assert(int(gsam::G) == int(sam::G), "the norm pass reads gsam's G");
  Plan plan(op, {{"grads", grads}, {"grads", grads}, {"grads", grads}, {"grads", grads}, {"gv", gv}}, chunk);
  check_same_dtype(grads, gv, op, "grads", "gv");
  check_state_scalar(gv_norm, grads, op, "gv_norm", false);
  return plan;
}

// Momentum-SAM's per-tensor values (msam's slots; empty lists take none).
inline void set_msam_params(Plan& plan, const char* op,
                            std::initializer_list<std::tuple<int, at::ArrayRef<double>, const char*>> values) {
  for (const auto& [slot, v, name] : values) {
    check_finite_nonneg(v, op, name);
    if (plan.n_tensors()) plan.set_param(slot, v, name);
  }
}

inline Plan msam_sgd_plan(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                          const at::Tensor& inv_norm, at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                          at::ArrayRef<double> momentum, at::ArrayRef<double> rho_prev, at::ArrayRef<double> rho,
                          double eps, int64_t chunk) {
  const char* op = "saf_kernels.msam_sgd_";
  check_eps(eps, op);
  Plan plan(op, {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers}}, chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, momentum_buffers, op, "params", "momentum_buffers");
  set_msam_params(plan, op, {{msam::LR, lr, "lr"}, {msam::WD, weight_decay, "weight_decay"},
                             {msam::MOMENTUM, momentum, "momentum"}, {msam::RHO_PREV, rho_prev, "rho_prev"},
                             {msam::RHO, rho, "rho"}});
  check_state_scalar(inv_norm, params, op, "inv_norm", true);
  return plan;
}

inline Plan msam_adamw_plan(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, at::TensorList steps, const at::Tensor& inv_norm,
                            at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                            at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay, at::ArrayRef<double> rho_prev,
                            at::ArrayRef<double> rho, double norm_eps, int64_t chunk) {
  const char* op = "saf_kernels.msam_adamw_";
  TORCH_CHECK_VALUE(std::isfinite(norm_eps) && norm_eps >= 0, op, ": eps must be a finite number >= 0, got ", norm_eps);
  Plan plan(op,
            {{"params", params}, {"grads", grads}, {"exp_avg", exp_avg}, {"exp_avg_sq", exp_avg_sq},
             {"steps", steps, /*scalar=*/true}},
            chunk);
  check_same_dtype(params, grads, op, "params", "grads");
  check_same_dtype(params, exp_avg, op, "params", "exp_avg");
  check_same_dtype(params, exp_avg_sq, op, "params", "exp_avg_sq");
  for (const auto& [b, name] : {std::pair{beta1, "beta1"}, std::pair{beta2, "beta2"}}) {
    for (size_t i = 0; i < b.size(); ++i) {
      TORCH_CHECK_VALUE(b[i] >= 0.0 && b[i] < 1.0, op, ": ", name, "[", i, "] must be in [0, 1), got ", b[i]);
    }
  }
  set_msam_params(plan, op, {{msam::LR, lr, "lr"}, {msam::BETA1, beta1, "beta1"}, {msam::BETA2, beta2, "beta2"},
                             {msam::EPS, eps, "eps"}, {msam::ADAMW_WD, weight_decay, "weight_decay"},
                             {msam::RHO_PREV, rho_prev, "rho_prev"}, {msam::RHO, rho, "rho"}});
  check_state_scalar(inv_norm, params, op, "inv_norm", true);
  return plan;
}

}  // namespace saf::mt
