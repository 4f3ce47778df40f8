// CUDA kernel of ema_update_ over a multi-tensor plan in device memory (streams: ema, model;
// machinery: csrc/include/saf/multi_tensor.cuh). One launch for any number of tensors; the
// model stream may have another dtype than the EMA (loaded through a block-uniform switch); the
// decay may come from a device scalar, so a decay schedule needs no host synchronisation.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace E = saf::mt::ema;

// ema = lerp(ema, model, weight), weight = 1 - decay (decay from decay_dev if given).
struct EmaUpdate {
  static constexpr int kDtype = E::EMA;
  double decay;
  const double* decay_dev;
  template <typename T>
  struct Ctx {
    T* e;
    const void* model;
    int32_t mdt;
    opmath_t<T> wt;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    const double weight = 1.0 - (decay_dev ? *decay_dev : decay);
    return {stream_ptr<T>(c.t, E::EMA, c.start), stream_bytes(c.t, E::MODEL, c.start), c.t->dtype[E::MODEL],
            opmath_t<T>(weight)};
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    acc_of<C> a[N], b[N];
    ld<N>(x.e, i, a);
    ld_any<N>(x.model, x.mdt, i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) a[j] = saf::mt::lerp(a[j], b[j], x.wt);
    st<N>(x.e, i, a);
  }
};

}  // namespace

cudaError_t ema_update_launch(const void* plan, int64_t n_chunks, bool f64, double decay, const double* decay_dev,
                              cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, EmaUpdate{decay, decay_dev});
}

}  // namespace saf::cuda
