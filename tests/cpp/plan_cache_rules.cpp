// The plan cache's rules (csrc/mt_plan_cache.h) on a fake device that logs what the CUDA side
// would do: asynchronous and synchronous uploads, stream waits, host waits, frees. Built and run
// by tests/test_plan_cache.py; exits non-zero with the failed check on stderr.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "mt_plan_cache.h"

namespace {

struct Log {
  int async_uploads = 0, sync_uploads = 0, waits = 0, finishes = 0, live = 0;
};

struct FakeDevice {
  using StreamId = int;
  struct Buffer {
    std::shared_ptr<std::vector<uint8_t>> mem;  // the "device" bytes
    Log* log = nullptr;
    bool complete = false;
    Buffer() = default;
    Buffer(Buffer&& o) noexcept { *this = std::move(o); }
    Buffer& operator=(Buffer&& o) noexcept {
      std::swap(mem, o.mem);
      std::swap(log, o.log);
      std::swap(complete, o.complete);
      return *this;
    }
    ~Buffer() {
      if (mem && log) --log->live;
    }
    const void* data() const { return mem->data(); }
  };
  Log* log;
  Buffer make(const std::vector<uint8_t>& bytes, bool complete) {
    Buffer b;
    b.mem = std::make_shared<std::vector<uint8_t>>(bytes);
    b.log = log;
    b.complete = complete;
    ++log->live;
    return b;
  }
  Buffer upload_async(const std::vector<uint8_t>& bytes, int, StreamId) {
    ++log->async_uploads;
    return make(bytes, false);
  }
  Buffer upload_sync(const std::vector<uint8_t>& bytes, int) {
    ++log->sync_uploads;
    return make(bytes, true);
  }
  void wait(Buffer&, StreamId) { ++log->waits; }
  void finish(Buffer& b) {
    ++log->finishes;
    b.complete = true;
  }
};

int failures = 0;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

std::vector<uint8_t> plan(int i) {
  std::vector<uint8_t> b(64, 0);
  b[0] = uint8_t(i & 0xff);
  b[1] = uint8_t(i >> 8);
  return b;
}

using Cache = saf::mt::PlanCacheCore<FakeDevice>;
constexpr int kMax = int(Cache::kMaxEvictable);
const uint8_t* bytes_at(const void* p) { return static_cast<const uint8_t*>(p); }

void hits_and_lru_eviction() {
  Log log;
  Cache cache(FakeDevice{&log});
  const void* a = cache.get(plan(0), 0, 1, false);
  CHECK(cache.get(plan(0), 0, 1, false) == a);  // a hit: same memory, no upload
  CHECK(log.async_uploads == 1 && log.waits == 0);
  for (int i = 1; i <= kMax; ++i) cache.get(plan(i), 0, 1, false);  // plan(1) is now the oldest
  auto s = cache.stats();
  CHECK(s.entries == kMax && s.evictions == 1 && log.live == kMax);
  cache.get(plan(0), 0, 1, false);  // still there? plan 0 was evicted (least recently used)
  CHECK(cache.stats().misses == kMax + 2);
  CHECK(cache.get(plan(0), 1, 1, false) != nullptr && cache.stats().misses == kMax + 3);  // other device
}

void other_stream_waits_once() {
  Log log;
  Cache cache(FakeDevice{&log});
  cache.get(plan(7), 0, /*stream*/ 1, false);
  cache.get(plan(7), 0, 1, false);
  CHECK(log.waits == 0);                   // the uploader's stream is ordered by itself
  cache.get(plan(7), 0, 2, false);         // another stream: waits for the copy
  cache.get(plan(7), 0, 2, false);         // ... once
  cache.get(plan(7), 0, 3, false);
  CHECK(log.waits == 2 && cache.stats().stream_waits == 2 && log.async_uploads == 1);
}

void capture_hit_becomes_permanent() {
  Log log;
  Cache cache(FakeDevice{&log});
  const void* warm = cache.get(plan(100), 0, 1, false);  // eager warm-up
  const std::vector<uint8_t> want = plan(100);
  CHECK(cache.get(plan(100), 0, /*capture stream*/ 5, true) == warm);
  CHECK(log.finishes == 1 && log.waits == 0);  // complete on the host before the graph uses it
  // Forced misses: far more distinct plans than the cache holds.
  for (int i = 0; i < 4 * kMax; ++i) cache.get(plan(i), 0, 1, false);
  auto s = cache.stats();
  CHECK(s.permanent == 1 && s.entries == kMax + 1);
  // The graph's plan is still there, unchanged, at the same address.
  CHECK(std::vector<uint8_t>(bytes_at(warm), bytes_at(warm) + 64) == want);
  CHECK(cache.get(plan(100), 0, 9, false) == warm && log.waits == 0);  // complete: no wait needed
  CHECK(cache.get(plan(100), 0, 5, true) == warm && log.finishes == 1);
}

void capture_miss_is_synchronous_and_permanent() {
  Log log;
  Cache cache(FakeDevice{&log});
  const void* g = cache.get(plan(200), 0, 5, true);
  CHECK(log.sync_uploads == 1 && log.async_uploads == 0);
  for (int i = 0; i < 4 * kMax; ++i) cache.get(plan(i), 0, 1, false);
  CHECK(std::vector<uint8_t>(bytes_at(g), bytes_at(g) + 64) == plan(200));
  CHECK(cache.get(plan(200), 0, 2, false) == g && log.waits == 0);
  auto s = cache.stats();
  CHECK(s.capture_uploads == 1 && s.permanent == 1 && s.entries == kMax + 1);
  // Permanent entries do not take evictable places: still kMax evictable ones.
  CHECK(log.live == kMax + 1);
}

void many_permanent_entries() {
  Log log;
  Cache cache(FakeDevice{&log});
  for (int i = 0; i < 2 * kMax; ++i) cache.get(plan(1000 + i), 0, 5, true);
  for (int i = 0; i < 2 * kMax; ++i) cache.get(plan(i), 0, 1, false);
  auto s = cache.stats();
  CHECK(s.permanent == 2 * kMax && s.entries == 3 * kMax && s.evictions == kMax);
}

}  // namespace

int main() {
  hits_and_lru_eviction();
  other_stream_waits_once();
  capture_hit_becomes_permanent();
  capture_miss_is_synchronous_and_permanent();
  many_permanent_entries();
  if (failures) return 1;
  std::puts("plan cache rules: ok");
  return 0;
}
