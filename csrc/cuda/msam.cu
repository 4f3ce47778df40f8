// CUDA kernels of Momentum-SAM (math: csrc/include/saf/multi_tensor.h, namespace msam,
// msam_sgd_buf, msam_adamw_moments, msam_adamw_w, adamw_coefs).
//
// msam_sgd_ / msam_adamw_ = 3 launches whatever the number of tensors: pass 1 (un-perturb with
// rho_prev * the previous inv_norm, the buffer / moments, the step) writing the partial sums of
// the stored buffer's squares; a one-block finalize storing inv_norm = 1 / (|buf| + eps) in its
// dtype; pass 2, w -= rho inv_norm buf with inv_norm as stored. Pass 1 reads inv_norm before the
// finalize overwrites it (launches on one stream run in order). No host synchronisation.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace M = saf::mt::msam;

// What both pass-1 functors share: the dtype stream, one sum, inv_norm's address and dtype.
struct MsamPass1 {
  static constexpr int kDtype = M::W, kSums = 1;
  const void* inv;
  int32_t inv_dt;
  // The tensor's un-perturbation factor rho_prev * inv_prev.
  template <typename acc_t>
  __device__ __forceinline__ acc_t up(const TensorEntry* t) const {
    return acc_t(t->param[M::RHO_PREV] * load_scalar(inv, inv_dt));
  }
};

struct MsamSgd : MsamPass1 {
  template <typename T>
  struct Ctx {
    T* w;
    const T* g;
    T* b;
    opmath_t<T> lr, wd, mom, up;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    using acc_t = opmath_t<T>;
    return {stream_ptr<T>(c.t, M::W, c.start), stream_ptr<T>(c.t, M::G, c.start), stream_ptr<T>(c.t, M::BUF, c.start),
            acc_t(c.t->param[M::LR]),          acc_t(c.t->param[M::WD]),          acc_t(c.t->param[M::MOMENTUM]),
            up<acc_t>(c.t)};
  }
  template <int N, typename T, typename acc_t>
  __device__ __forceinline__ void term(const Ctx<T>& x, int64_t i, acc_t (&a)[1]) const {
    acc_t w[N], g[N], b[N];
    ld<N>(x.w, i, w);
    ld<N>(x.g, i, g);
    ld<N>(x.b, i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) b[j] = saf::mt::msam_sgd_buf(w[j], g[j], b[j], x.wd, x.mom, x.up);
    st<N>(x.b, i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t r = as_stored<T>(b[j]);  // the step uses the buffer as stored
      w[j] = w[j] - x.lr * r;
      a[0] += r * r;
    }
    st<N>(x.w, i, w);
  }
};

struct MsamAdamw : MsamPass1 {
  template <typename T>
  struct Ctx {
    T* w;
    const T* g;
    T* m;
    T* v;
    opmath_t<T> b1, omb1, b2, omb2, eps, up;
    saf::mt::AdamWCoefs<opmath_t<T>> c;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    using acc_t = opmath_t<T>;
    const TensorEntry* t = c.t;
    const double b1 = t->param[M::BETA1], b2 = t->param[M::BETA2];
    const double step = load_scalar(t->ptr[M::STEP], t->dtype[M::STEP]);
    return {stream_ptr<T>(t, M::W, c.start),
            stream_ptr<T>(t, M::G, c.start),
            stream_ptr<T>(t, M::BUF, c.start),
            stream_ptr<T>(t, M::EXP_AVG_SQ, c.start),
            acc_t(b1),
            acc_t(1.0 - b1),
            acc_t(b2),
            acc_t(1.0 - b2),
            acc_t(t->param[M::EPS]),
            up<acc_t>(t),
            saf::mt::adamw_coefs<acc_t>(t->param[M::LR], b1, b2, t->param[M::ADAMW_WD], step)};
  }
  template <int N, typename T, typename acc_t>
  __device__ __forceinline__ void term(const Ctx<T>& x, int64_t i, acc_t (&a)[1]) const {
    acc_t w[N], g[N], m[N], v[N];
    ld<N>(x.w, i, w);
    ld<N>(x.g, i, g);
    ld<N>(x.m, i, m);
    ld<N>(x.v, i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) m[j] = saf::mt::msam_adamw_moments(w[j], g[j], m[j], v[j], x.b1, x.omb1, x.b2, x.omb2, x.up);
    st<N>(x.m, i, m);
    st<N>(x.v, i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t r = as_stored<T>(m[j]);  // the step uses exp_avg as stored, v unrounded
      w[j] = saf::mt::msam_adamw_w(w[j], r, v[j], x.eps, x.c);
      a[0] += r * r;
    }
    st<N>(x.w, i, w);
  }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    msam_inv_kernel(const double* partials, int64_t n, double eps, void* inv, int32_t inv_dt, void* norm_out,
                    bool out_f64) {
  const double norm = sqrt(sum_partials(partials, n));
  if (threadIdx.x == 0) {
    store_scalar(inv, inv_dt, 0, 1.0 / (norm + eps));
    store_scalar(norm_out, acc_code(out_f64), 0, norm);
  }
}

// Pass 2 (SGD and AdamW): w -= rho inv buf, inv read back as stored.
struct MsamPerturb {
  static constexpr int kDtype = M::W;
  const void* inv;
  int32_t inv_dt;
  template <typename T>
  struct Ctx {
    T* w;
    const T* b;
    opmath_t<T> down;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    return {stream_ptr<T>(c.t, M::W, c.start), stream_ptr<T>(c.t, M::BUF, c.start),
            opmath_t<T>(c.t->param[M::RHO] * load_scalar(inv, inv_dt))};
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    acc_of<C> w[N], b[N];
    ld<N>(x.w, i, w);
    ld<N>(x.b, i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) w[j] = w[j] - x.down * b[j];
    st<N>(x.w, i, w);
  }
};

}  // namespace

cudaError_t msam_sgd_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                            double* partials, cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, MsamSgd{{inv, inv_dt}});
}

cudaError_t msam_adamw_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                              double* partials, cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, MsamAdamw{{inv, inv_dt}});
}

cudaError_t msam_inv_launch(const double* partials, int64_t n_chunks, double eps, void* inv, int32_t inv_dt,
                            void* norm_out, bool out_f64, cudaStream_t stream) {
  msam_inv_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, eps, inv, inv_dt, norm_out, out_f64);
  return cudaGetLastError();
}

cudaError_t msam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, const void* inv, int32_t inv_dt,
                                cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, MsamPerturb{inv, inv_dt});
}

}  // namespace saf::cuda
