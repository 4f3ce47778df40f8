// Device copies of the ESAM / R-SAM row plans (csrc/mt_plan_esam.h, RowPlan), cached by content
// as csrc/cuda/mt_plan_cuda.h's PlanCache does for element plans (whose upload takes a Plan):
// an identical plan seen before on the device costs nothing, a new one one pinned asynchronous
// copy on the op's stream. Entries used from another stream are recorded on it; entries made
// while the stream is captured into a CUDA graph are never evicted.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "mt_plan_esam.h"

namespace saf::cuda {

class RowPlanCache {
 public:
  static RowPlanCache& instance() {
    static RowPlanCache cache;
    return cache;
  }

  const void* upload(const mt::RowPlan& plan, const c10::cuda::CUDAStream& stream) {
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
    const bool capturing =
        cudaStreamIsCapturing(stream.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
    if (entries_.size() >= kMaxEntries) evict_one();
    entries_.push_back(Entry{std::move(bytes), host, dev, device, stream.id(), ++tick_, capturing});
    return dev.data_ptr();
  }

 private:
  struct Entry {
    std::vector<uint8_t> key;
    at::Tensor host;
    at::Tensor dev;
    c10::DeviceIndex device;
    c10::StreamId stream;
    uint64_t tick;
    bool permanent;
  };
  static constexpr size_t kMaxEntries = 8;

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

}  // namespace saf::cuda
