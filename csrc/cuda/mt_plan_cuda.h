// Device copies of multi-tensor plans (csrc/mt_plan.h), cached.
//
// A plan is serialised on the host; if an identical plan (same bytes: addresses, sizes, dtypes,
// per-tensor scalars) was uploaded before on this device, its device copy is reused and the
// step costs no copy at all. Otherwise the bytes go through pinned memory with one asynchronous
// copy on the op's stream (the caching host allocator keeps the pinned block until the copy has
// run). Gradients re-allocated by zero_grad(set_to_none=True) usually get the same addresses
// from the caching allocator, so a training loop hits the cache; a changed learning rate or rho
// is a miss and costs one small copy.
//
// Entries are used read-only. An entry used from another stream than the one it was uploaded
// on is recorded on that stream, so that evicting it cannot free memory a queued kernel reads.
// Entries created while the stream is being captured into a CUDA graph are never evicted (the
// graph replays their copy).
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "mt_plan.h"

namespace saf::cuda {

class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache cache;
    return cache;
  }

  // Device address of the plan's bytes, valid for work enqueued on `stream`.
  const void* upload(const mt::Plan& plan, const c10::cuda::CUDAStream& stream) {
    std::vector<uint8_t> bytes(size_t(plan.bytes()));
    plan.write(bytes.data());
    const c10::DeviceIndex device = stream.device_index();
    std::lock_guard<std::mutex> lock(mu_);
    for (Entry& e : entries_) {
      if (e.device == device && e.key == bytes) {
        e.tick = ++tick_;
        if (e.stream != stream.id()) e.dev.record_stream(stream.unwrap());
        return e.dev.data_ptr();
      }
    }
    const int64_t n = int64_t(bytes.size());
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
    at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    dev.copy_(host, /*non_blocking=*/true);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const bool capturing = cudaStreamIsCapturing(stream.stream(), &status) == cudaSuccess &&
                           status != cudaStreamCaptureStatusNone;
    if (entries_.size() >= kMaxEntries) evict_one();
    entries_.push_back(Entry{std::move(bytes), host, dev, device, stream.id(), ++tick_, capturing});
    return dev.data_ptr();
  }

 private:
  struct Entry {
    std::vector<uint8_t> key;
    at::Tensor host;  // kept while the entry lives: a captured graph re-reads it
    at::Tensor dev;
    c10::DeviceIndex device;
    c10::StreamId stream;
    uint64_t tick;
    bool permanent;
  };
  static constexpr size_t kMaxEntries = 32;

  void evict_one() {
    size_t victim = entries_.size();
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (!entries_[i].permanent && (victim == entries_.size() || entries_[i].tick < entries_[victim].tick)) victim = i;
    }
    if (victim < entries_.size()) entries_.erase(entries_.begin() + std::ptrdiff_t(victim));
  }

  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t tick_ = 0;
};

// A float32 view of an optional device scalar (GradScaler's tensors already are float32).
inline at::Tensor as_f32(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

inline const float* f32_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace saf::cuda
