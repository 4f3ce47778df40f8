// CPU implementation of saf_kernels::philox_ (schema: csrc/ops.cpp; generator:
// csrc/include/saf/philox.h): the counter-based streams of the ESAM / R-SAM ops as a tensor, for
// tests and for users who want the same random numbers on every backend. Plain scalar code: this
// op is a utility, not on a training step's path.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mt_plan.h"
#include "saf/philox.h"

namespace saf::cpu {

namespace {

// The value of position pos as double (kind as in the schema).
inline double philox_value(uint64_t key, uint64_t offset, uint64_t pos, int64_t kind, uint32_t thr) {
  const rng::Words w = rng::philox4x32_10(rng::counter_of(offset, pos), key);
  const int lane = int(pos & 3);
  switch (kind) {
    case 0: return double(w.w[lane]);
    case 1: return double(rng::uniform(w.w[lane]));
    case 2: return double(rng::normals(w).n[lane]);
    default: return rng::keep(w.w[lane], thr) ? 1.0 : 0.0;
  }
}

}  // namespace

void philox_cpu(at::Tensor& out, int64_t seed, int64_t offset, int64_t kind, double p) {
  mt::check_philox(out, offset, kind, p);
  const uint64_t key = mt::philox_key(seed), off = uint64_t(offset);
  const uint32_t thr = rng::bernoulli_threshold(p);
  at::Tensor buf = kind == 0 ? out : at::empty({out.numel()}, out.options().dtype(at::kDouble));
  if (kind == 0) {
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = int64_t(philox_value(key, off, uint64_t(i), 0, thr));
    });
  } else {
    double* o = buf.data_ptr<double>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = philox_value(key, off, uint64_t(i), kind, thr);
    });
    out.copy_(buf.view(out.sizes()));
  }
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) { m.impl("philox_", &philox_cpu); }

}  // namespace saf::cpu
