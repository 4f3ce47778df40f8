// The CUDA side of the plan cache (declared in csrc/cuda/mt_plan_cuda.h; rules in
// csrc/mt_plan_cache.h): how a plan's bytes reach the device, how a stream is ordered after
// another stream's upload, and what happens while a stream is being captured into a CUDA graph.
#include "cuda/mt_plan_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace saf::cuda {
namespace {

// Lets this thread make calls that an ongoing stream capture would otherwise forbid (a host
// wait, a synchronous copy on a stream outside the graph), as torch's caching allocator does.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

struct CudaPlanDevice {
  using StreamId = c10::cuda::CUDAStream;

  // Eager uploads: torch memory (pinned bytes, device bytes) and the event after the copy.
  // Uploads made during a capture: cudaMalloc'ed device bytes, never freed (the entry is
  // permanent; a graph may replay from them at any time).
  struct Buffer {
    at::Tensor host, dev;
    void* raw = nullptr;
    cudaEvent_t event = nullptr;

    Buffer() = default;
    Buffer(Buffer&& o) noexcept { swap(o); }
    Buffer& operator=(Buffer&& o) noexcept {
      swap(o);
      return *this;
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() {
      if (event != nullptr) cudaEventDestroy(event);  // released once the event has completed
    }
    const void* data() const { return raw != nullptr ? raw : dev.data_ptr(); }
    void swap(Buffer& o) noexcept {
      std::swap(host, o.host);
      std::swap(dev, o.dev);
      std::swap(raw, o.raw);
      std::swap(event, o.event);
    }
  };

  Buffer upload_async(const std::vector<uint8_t>& bytes, int device, const StreamId& stream) {
    const int64_t n = int64_t(bytes.size());
    Buffer b;
    b.host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(b.host.data_ptr(), bytes.data(), bytes.size());
    b.dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::DeviceIndex(device)));
    b.dev.copy_(b.host, /*non_blocking=*/true);  // on the current stream, which is `stream`
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&b.event, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(b.event, stream.stream()));
    return b;
  }

  Buffer upload_sync(const std::vector<uint8_t>& bytes, int device) {
    const RelaxedCaptureMode relaxed;
    Buffer b;
    C10_CUDA_CHECK(cudaMalloc(&b.raw, bytes.size()));
    // A stream of our own, outside any capture and non-blocking (the legacy stream would
    // implicitly join a capturing blocking stream and invalidate the capture).
    const cudaStream_t side = side_stream(device);
    C10_CUDA_CHECK(cudaMemcpyAsync(b.raw, bytes.data(), bytes.size(), cudaMemcpyHostToDevice, side));
    C10_CUDA_CHECK(cudaStreamSynchronize(side));
    return b;
  }

  void wait(Buffer& b, const StreamId& stream) {
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), b.event, 0));
    b.dev.record_stream(stream.unwrap());  // eviction frees the copy only after this stream's work
  }

  void finish(Buffer& b) {
    const RelaxedCaptureMode relaxed;
    C10_CUDA_CHECK(cudaEventSynchronize(b.event));
  }

  cudaStream_t side_stream(int device) {
    auto it = side_.find(device);
    if (it == side_.end()) {
      cudaStream_t s = nullptr;
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));  // kept for the process
      it = side_.emplace(device, s).first;
    }
    return it->second;
  }

  std::unordered_map<int, cudaStream_t> side_;  // guarded by the cache's lock
};

mt::PlanCacheCore<CudaPlanDevice>& core() {
  // Never destroyed: captured graphs may outlive static destruction order, and freeing CUDA
  // memory at process exit is pointless.
  static auto* cache = new mt::PlanCacheCore<CudaPlanDevice>();
  return *cache;
}

std::vector<int64_t> plan_cache_stats() { return PlanCache::instance().stats().as_vector(); }

}  // namespace

PlanCache& PlanCache::instance() {
  static PlanCache cache;
  return cache;
}

const void* PlanCache::upload_bytes(std::vector<uint8_t>&& bytes, const c10::cuda::CUDAStream& stream) {
  return core().get(std::move(bytes), int(stream.device_index()), stream, is_capturing(stream.stream()));
}

mt::PlanCacheStats PlanCache::stats() { return core().stats(); }

// Counters of the plan cache, for tests and `python -m saf_kernels.check`: [hits, misses,
// evictions, stream_waits, capture_hits, capture_uploads, entries, permanent].
TORCH_LIBRARY_FRAGMENT(saf_kernels, m) { m.def("_plan_cache_stats() -> int[]", &plan_cache_stats); }

}  // namespace saf::cuda
