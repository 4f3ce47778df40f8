// The bookkeeping of the device plan cache (csrc/cuda/mt_plan_cuda.h), free of CUDA and torch so
// that its rules are unit-tested on any machine (tests/test_plan_cache.py compiles it with a fake
// device). One cache serves every plan kind (element and row chunks of mt::Plan): the key is the plan's
// serialised bytes (addresses, sizes, dtypes, per-tensor scalars), so equal bytes mean an equal
// device copy whoever built them.
//
// The rules, each one the answer to a way a cached plan can be read wrong:
//   * Eager miss: an asynchronous upload on the op's stream (Dev::upload_async: pinned bytes, one
//     copy, an event recorded after it). At most kMaxEvictable such entries; the least recently
//     used one is evicted (its memory is freed once every stream that used it is past it).
//   * Eager hit from another stream than the uploader's: that stream first waits for the
//     upload's event (Dev::wait, once per stream and entry), so it never reads the plan before
//     the copy has landed; the wait also records the stream on the memory for the eviction.
//   * Any call while the op's stream is being captured into a CUDA graph: the graph may replay
//     at any later time, from any stream, so what it reads must be complete and must never be
//     freed. A hit waits on the host for its upload (Dev::finish, only during capture, which is
//     set-up work) and becomes permanent; a miss is uploaded synchronously outside the graph
//     (Dev::upload_sync) into memory that is never freed, and is permanent too. The graph then
//     holds no copy node and depends on no evictable entry. Permanent entries do not count
//     against kMaxEvictable and are never evicted.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace saf::mt {

struct PlanCacheStats {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;
  int64_t stream_waits = 0;     // an eager hit ordered after another stream's upload
  int64_t capture_hits = 0;     // hits while the stream was capturing (made permanent)
  int64_t capture_uploads = 0;  // misses while capturing (uploaded synchronously, permanent)
  int64_t entries = 0;
  int64_t permanent = 0;

  std::vector<int64_t> as_vector() const {
    return {hits, misses, evictions, stream_waits, capture_hits, capture_uploads, entries, permanent};
  }
};

// Dev provides:
//   using Buffer   (movable; owns the device copy; Buffer::data() -> const void*)
//   using StreamId (equality-comparable)
//   Buffer upload_async(const std::vector<uint8_t>&, int device, StreamId)
//   Buffer upload_sync(const std::vector<uint8_t>&, int device)
//   void wait(Buffer&, StreamId)     // the stream waits for the upload
//   void finish(Buffer&)             // the host waits for the upload
template <class Dev>
class PlanCacheCore {
 public:
  using Buffer = typename Dev::Buffer;
  using StreamId = typename Dev::StreamId;
  static constexpr size_t kMaxEvictable = 32;

  explicit PlanCacheCore(Dev dev = Dev()) : dev_(std::move(dev)) {}

  // Device address of `bytes`' copy on `device`, valid for work enqueued on `stream` now and,
  // when `capturing`, for any replay of the graph being captured.
  const void* get(std::vector<uint8_t>&& bytes, int device, StreamId stream, bool capturing) {
    std::lock_guard<std::mutex> lock(mu_);
    Entry* e = find(bytes, device);
    if (e != nullptr) {
      ++stats_.hits;
      e->tick = ++tick_;
      if (capturing) {
        ++stats_.capture_hits;
        if (!e->complete) {
          dev_.finish(e->buf);
          e->complete = true;
        }
        make_permanent(*e);
      } else if (!e->complete && !e->ordered(stream)) {
        dev_.wait(e->buf, stream);
        e->streams.push_back(stream);
        ++stats_.stream_waits;
      }
      return e->buf.data();
    }
    ++stats_.misses;
    auto fresh = std::make_unique<Entry>();
    fresh->device = device;
    fresh->tick = ++tick_;
    if (capturing) {
      ++stats_.capture_uploads;
      fresh->buf = dev_.upload_sync(bytes, device);
      fresh->complete = true;
      fresh->permanent = true;
      ++stats_.permanent;
    } else {
      while (evictable_ >= kMaxEvictable && evict_one()) {
      }
      fresh->buf = dev_.upload_async(bytes, device, stream);
      fresh->streams.push_back(stream);
      ++evictable_;
    }
    fresh->key = std::move(bytes);
    entries_.push_back(std::move(fresh));
    stats_.entries = int64_t(entries_.size());
    return entries_.back()->buf.data();
  }

  PlanCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  struct Entry {
    std::vector<uint8_t> key;
    int device = 0;
    Buffer buf{};
    std::vector<StreamId> streams;  // ordered after the upload (the uploader's first)
    uint64_t tick = 0;
    bool complete = false;  // the upload has finished (known on the host)
    bool permanent = false;
    bool ordered(const StreamId& s) const {
      for (const StreamId& x : streams) {
        if (x == s) return true;
      }
      return false;
    }
  };

  Entry* find(const std::vector<uint8_t>& bytes, int device) {
    for (auto& e : entries_) {
      if (e->device == device && e->key.size() == bytes.size() &&
          std::memcmp(e->key.data(), bytes.data(), bytes.size()) == 0) {
        return e.get();
      }
    }
    return nullptr;
  }

  void make_permanent(Entry& e) {
    if (e.permanent) return;
    e.permanent = true;
    --evictable_;
    ++stats_.permanent;
  }

  bool evict_one() {
    size_t victim = entries_.size();
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (!entries_[i]->permanent && (victim == entries_.size() || entries_[i]->tick < entries_[victim]->tick)) {
        victim = i;
      }
    }
    if (victim == entries_.size()) return false;
    entries_.erase(entries_.begin() + std::ptrdiff_t(victim));
    --evictable_;
    ++stats_.evictions;
    stats_.entries = int64_t(entries_.size());
    return true;
  }

  Dev dev_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Entry>> entries_;
  size_t evictable_ = 0;
  uint64_t tick_ = 0;
  PlanCacheStats stats_;
};

}  // namespace saf::mt
