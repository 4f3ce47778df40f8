// CPU implementation of saf_kernels::ema_update_: one multi-tensor plan (streams ema, model;
// csrc/mt_plan.h), chunks split over threads, each handled by the build for this CPU's
// instruction set (csrc/cpu/kernels/ema.cpp).
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "mt_plan.h"

namespace saf::cpu {

void ema_update_cpu(at::TensorList ema, at::TensorList model, double decay,
                    const std::optional<at::Tensor>& decay_tensor) {
  const mt::Plan plan = mt::ema_plan(ema, model, decay, decay_tensor, kCpuChunk);
  if (decay_tensor) {
    decay = decay_tensor->item<double>();  // a CPU scalar: no synchronisation
    TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "saf_kernels.ema_update_: decay must be in [0, 1], got ", decay);
  }
  const MtKernels k = mt_kernels();
  const double weight = 1.0 - decay;
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) { k.ema(t, start, n, weight); });
  mt::bump_versions(ema);
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
}

}  // namespace saf::cpu
