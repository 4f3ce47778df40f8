// Torch-side wrapper of the CUDA ema_update_ kernel (csrc/cuda/ema.cu): plan and checks
// (csrc/mt_plan.h), cached device copy of the plan, launch. No host synchronisation: a decay
// tensor is read by the kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_check.h"
#include "cuda/mt_launchers.h"
#include "cuda/mt_ops_cuda.h"
#include "cuda/mt_plan_cuda.h"
#include "mt_plan.h"

namespace saf::cuda {

void ema_update_cuda(at::TensorList ema, at::TensorList model, double decay,
                     const std::optional<at::Tensor>& decay_tensor) {
  const mt::Plan plan = mt::ema_plan(ema, model, decay, decay_tensor, mt_chunk_size());
  if (ema.empty()) return;
  const MtCall call(plan, ema);
  const at::Tensor d = decay_tensor ? decay_tensor->to(at::kDouble).contiguous() : at::Tensor();
  SAF_CUDA_CHECK(ema_update_launch(call.plan, call.n_chunks, call.f64, decay,
                                   d.defined() ? d.data_ptr<double>() : nullptr, call.stream),
                 "ema_update_");
  mt::bump_versions(ema);
}

}  // namespace saf::cuda
