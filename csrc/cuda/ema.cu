// CUDA kernel of ema_update_ over a multi-tensor plan in device memory (streams: ema, model;
// machinery: csrc/include/saf/multi_tensor.cuh). One launch for any number of tensors; the
// model stream may have another dtype than the EMA (loaded through a block-uniform switch); the
// decay may come from a device scalar, so a decay schedule needs no host synchronisation.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mt_launchers.h"
#include "saf/cuda_utils.cuh"
#include "saf/multi_tensor.cuh"
#include "saf/multi_tensor.h"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace E = saf::mt::ema;

template <bool F64>
__global__ void __launch_bounds__(kBlock) ema_update_kernel(const void* plan, double decay, const double* decay_dev) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const double weight = 1.0 - (decay_dev ? *decay_dev : decay);
  const int32_t mdt = t->dtype[E::MODEL];
  const char* model = static_cast<const char*>(t->ptr[E::MODEL]) + c.start * dtype_size(static_cast<DType>(mdt));
  dispatch_dtype<F64>(t->dtype[E::EMA], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* e = stream_ptr<T>(t, E::EMA, c.start);
    const acc_t wt = acc_t(weight);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t a[N], b[N];
      ld<N>(e, i, a);
      ld_any<N>(model, mdt, i, b);
#pragma unroll
      for (int j = 0; j < N; ++j) a[j] = saf::mt::lerp(a[j], b[j], wt);
      st<N>(e, i, a);
    });
  });
}

}  // namespace

cudaError_t ema_update_launch(const void* plan, int64_t n_chunks, bool f64, double decay, const double* decay_dev,
                              cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  if (f64) {
    ema_update_kernel<true><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, decay, decay_dev);
  } else {
    ema_update_kernel<false><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, decay, decay_dev);
  }
  return cudaGetLastError();
}

}  // namespace saf::cuda
