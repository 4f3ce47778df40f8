// CPU implementation of saf_kernels::ema_update_: one multi-tensor plan (streams ema, model),
// chunks split over threads, each handled by the build for this CPU's instruction set
// (csrc/cpu/kernels/ema.cpp).
#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "mt_plan.h"

namespace saf::cpu {

void ema_update_cpu(at::TensorList ema, at::TensorList model, double decay,
                    const std::optional<at::Tensor>& decay_tensor) {
  const char* op = "saf_kernels.ema_update_";
  mt::Plan plan(op, {{"ema", ema}, {"model", model}}, kCpuChunk);
  if (decay_tensor) {
    mt::check_scalar_tensor(decay_tensor, ema.empty() ? decay_tensor->device() : ema[0].device(), op, "decay");
    decay = decay_tensor->item<double>();  // a CPU scalar: no synchronisation
  }
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ", decay);
  const MtKernels k = mt_kernels();
  const double weight = 1.0 - decay;
  parallel_chunks(plan, [&](int64_t, const mt::TensorEntry& t, int64_t start, int64_t n) { k.ema(t, start, n, weight); });
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
}

}  // namespace saf::cpu
