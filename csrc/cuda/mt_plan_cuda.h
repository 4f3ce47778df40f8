// Device copies of multi-tensor plans (csrc/mt_plan.h's Plan, csrc/mt_plan_esam.h's RowPlan),
// cached in one cache keyed by the plan's serialised bytes (rules: csrc/mt_plan_cache.h).
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
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "mt_plan_cache.h"

namespace saf::cuda {

class PlanCache {
 public:
  static PlanCache& instance();

  // Device address of the plan's bytes (P: mt::Plan or mt::RowPlan), valid for work enqueued
  // on `stream` (and for replays of a graph being captured on it).
  template <class P>
  const void* upload(const P& plan, const c10::cuda::CUDAStream& stream) {
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

}  // namespace saf::cuda
