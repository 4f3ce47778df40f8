// Device copies of multi-tensor plans (csrc/mt_plan.h's Plan, element or row chunks), cached in
// one cache keyed by the plan's serialised bytes (rules: csrc/mt_plan_cache.h).
//
// An identical plan seen before on the device costs no copy: gradients re-allocated by
// zero_grad(set_to_none=True) usually get the same addresses from the caching allocator, so a
// training loop hits the cache. A new plan (a changed learning rate or rho, new tensors) is one
// pinned asynchronous copy on the op's stream; another stream that finds it waits for that copy
// (an event). While the op's stream is captured into a CUDA graph every plan the graph reads is
// complete and permanent (never evicted, never freed), so a graph stays valid whatever runs
// between its capture and its replays. Nothing here waits for the device outside a capture.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cuda/cuda_check.h"
#include "mt_plan.h"
#include "mt_plan_cache.h"

namespace saf::cuda {

class PlanCache {
 public:
  static PlanCache& instance();

  // Device address of the plan's bytes, valid for work enqueued on `stream` (and for replays of
  // a graph being captured on it).
  const void* upload(const mt::Plan& plan, const c10::cuda::CUDAStream& stream) {
    std::vector<uint8_t> bytes(size_t(plan.bytes()));
    plan.write(bytes.data());
    return upload_bytes(std::move(bytes), stream);
  }

  const void* upload_bytes(std::vector<uint8_t>&& bytes, const c10::cuda::CUDAStream& stream);
  mt::PlanCacheStats stats();
};

// A float32 view of an optional device scalar (GradScaler's tensors already are float32).
inline at::Tensor as_f32(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

inline const float* f32_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// What every multi-tensor CUDA wrapper does before its launches (params not empty): the device
// guard, the current stream, the plan's cached device copy, whether the float64 instantiation of
// the kernels is needed, and the scratch of a reduction's two stages.
struct MtCall {
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream stream;
  const void* plan;
  int64_t n_chunks;
  bool f64;
  at::TensorOptions opts;

  MtCall(const mt::Plan& p, at::TensorList params)
      : guard(params[0].device()),
        stream(c10::cuda::getCurrentCUDAStream()),
        plan(PlanCache::instance().upload(p, stream)),
        n_chunks(p.n_chunks()),
        f64(mt::any_f64(params)),
        opts(params[0].options()) {}

  // Stage 1 of a reduction: k partial sums per chunk, float64, sum j of chunk c at j * n_chunks + c
  // (a tensor, so that a collective can reduce it before the finalize stage reads it).
  at::Tensor partials(int64_t k = 1) const { return at::empty({k * std::max<int64_t>(1, n_chunks)}, opts.dtype(at::kDouble)); }
  // Float64 device scalars the finalize writes for the element pass (coef, or GSAM's 3 coefs).
  at::Tensor coefs(int64_t k = 1) const { return at::empty({k}, opts.dtype(at::kDouble)); }
  // What the op returns (a norm, GSAM's stats): float64 if any param is, else float32.
  at::Tensor result(at::IntArrayRef shape) const { return at::empty(shape, opts.dtype(f64 ? at::kDouble : at::kFloat)); }

  // The sums a reduction's finalize reads, k per column: this call's partials (one column per
  // chunk) written by launch(double*), which returns a cudaError_t; or, in sharded training,
  // `reduced`: the k sums over every shard, already all-reduced (one column; nothing launched).
  struct Sums {
    at::Tensor t;
    int64_t n;
    double* data() const { return t.data_ptr<double>(); }
  };
  template <class Launch>
  Sums sums(int64_t k, const std::optional<at::Tensor>& reduced, const char* op, Launch&& launch) const {
    if (reduced) return {reduced->to(at::kDouble).reshape({k}).contiguous(), 1};
    at::Tensor p = partials(k);
    SAF_CUDA_CHECK(launch(p.data_ptr<double>()), op);
    return {p, n_chunks};
  }
  // The partial-sum stage alone (sam_sumsq, esam_sumsq, rsam_sumsq, gsam_sums): this call's k sums
  // over its chunks in float64 (0-dim for k = 1), for a collective to reduce across the shards.
  template <class Launch>
  at::Tensor local_sums(int64_t k, const char* op, Launch&& launch) const {
    at::Tensor p = partials(k);
    if (n_chunks == 0) {
      p.zero_();  // every shard empty
    } else {
      SAF_CUDA_CHECK(launch(p.data_ptr<double>()), op);
    }
    at::Tensor s = p.view({k, std::max<int64_t>(1, n_chunks)}).sum(1);
    return k == 1 ? s.reshape({}) : s;
  }
};

}  // namespace saf::cuda
