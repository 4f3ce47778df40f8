// CUDA kernels of GSAM (math: csrc/include/saf/multi_tensor.h, namespace gsam and gsam_coef).
//
// gsam_combine_ / gsam_restore_sgd_ = 3 launches whatever the number of tensors: per-chunk
// partial sums of <old_g, g>, |old_g|^2, |g|^2 (one pass reading both gradients), a one-block
// finalize (fixed-order sums: deterministic; the coefficients c_new, c_old and the stats in
// device memory), then one pass: the combined gradient written into g (+ restore), or the
// restore and a torch.optim.SGD step with the combined gradient, never written. No host sync.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace G = saf::mt::gsam;
namespace S = saf::mt::sam;

// Pass 1: sums over the chunk of old_g g, old_g^2, g^2 (one pass reading both gradients).
struct GsamDots {
  static constexpr int kDtype = G::G, kSums = 3;
  template <typename T>
  struct Ctx {
    const T* g;
    const T* o;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    return {stream_ptr<T>(c.t, G::G, c.start), stream_ptr<T>(c.t, G::OLD_G, c.start)};
  }
  template <int N, class C, typename acc_t>
  __device__ __forceinline__ void term(const C& x, int64_t i, acc_t (&a)[3]) const {
    acc_t gv[N], ov[N];
    ld<N>(x.g, i, gv);
    ld<N>(x.o, i, ov);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      a[0] += ov[j] * gv[j];
      a[1] += ov[j] * ov[j];
      a[2] += gv[j] * gv[j];
    }
  }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    gsam_coef_kernel(const double* partials, int64_t n, const float* grad_scale, const float* old_grad_scale,
                     const float* found_inf, double alpha, double eps, double* coefs, void* stats, bool stats_f64) {
  const double dot = sum_partials(partials, n);
  const double oo = sum_partials(partials + n, n);
  const double gg = sum_partials(partials + 2 * n, n);
  if (threadIdx.x == 0) {
    const saf::mt::GsamCoef r = saf::mt::gsam_coef(dot, oo, gg, inv_scale_of(grad_scale), inv_scale_of(old_grad_scale),
                                                   alpha, eps, found_inf_of(found_inf));
    coefs[0] = r.c_new;
    coefs[1] = r.c_old;
    coefs[2] = r.apply ? 1.0 : 0.0;
    const double st[3] = {r.cos, r.norm_old, r.norm_new};
    for (int j = 0; j < 3; ++j) {
      if (stats_f64) {
        static_cast<double*>(stats)[j] = st[j];
      } else {
        static_cast<float*>(stats)[j] = float(st[j]);
      }
    }
  }
}

// The pointers and coefficients of a combine pass (coefs: c_new, c_old, apply from the finalize).
template <typename T>
struct CombineCtx {
  T* w;
  T* g;
  const T* o;
  T* buf;  // same dtype as w (checked on the host); SGD only
  const void* stash;
  int32_t sdt;
  bool apply;
  opmath_t<T> cn, co;
};

template <typename T>
__device__ __forceinline__ CombineCtx<T> combine_ctx(const ChunkRef& c, const double* coefs) {
  return {stream_ptr<T>(c.t, G::W, c.start), stream_ptr<T>(c.t, G::G, c.start), stream_ptr<T>(c.t, G::OLD_G, c.start),
          stream_ptr<T>(c.t, G::BUF, c.start), stream_bytes(c.t, G::STASH, c.start), c.t->dtype[G::STASH],
          coefs[2] != 0.0, opmath_t<T>(coefs[0]), opmath_t<T>(coefs[1])};
}

// g = c_new g + c_old old_g (if apply), w restored from the stash (if restore).
struct GsamCombine {
  static constexpr int kDtype = G::W;
  const double* coefs;
  bool restore;
  int64_t mode;
  template <typename T>
  __device__ __forceinline__ CombineCtx<T> chunk(const ChunkRef& c) const {
    return combine_ctx<T>(c, coefs);
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    if (restore) {
      acc_t v[N];
      if (mode != S::COPY) load_restored<N>(x.w, x.stash, x.sdt, mode, i, v);
      store_restored<N>(x.w, x.stash, mode, i, v);
    }
    if (x.apply) {
      acc_t gv[N], ov[N];
      ld<N>(x.g, i, gv);
      if (x.co != acc_t(0)) {  // else old_g is not read (alpha = 0, or 0 * inf)
        ld<N>(x.o, i, ov);
#pragma unroll
        for (int j = 0; j < N; ++j) gv[j] = x.cn * gv[j] + x.co * ov[j];
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) gv[j] = x.cn * gv[j];
      }
      st<N>(x.g, i, gv);
    }
  }
};

// Restore + torch.optim.SGD with the combined gradient (apply false: restore only).
struct GsamSgd {
  static constexpr int kDtype = G::W;
  const double* coefs;
  int64_t mode;
  template <typename T>
  struct Ctx : CombineCtx<T> {
    SgdParams<opmath_t<T>> p;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    Ctx<T> x;
    static_cast<CombineCtx<T>&>(x) = combine_ctx<T>(c, coefs);
    x.p = sgd_params<opmath_t<T>>(c.t);
    return x;
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    acc_t wv[N], gv[N], ov[N];
    if (!step_inputs<N>(x, mode, !x.apply, i, wv, gv)) return;  // found_inf: the restore only
    if (x.co != acc_t(0)) {
      ld<N>(x.o, i, ov);
    } else {  // old_g is not read (alpha = 0, or 0 * inf)
#pragma unroll
      for (int j = 0; j < N; ++j) ov[j] = acc_t(0);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) gv[j] = x.cn * gv[j] + x.co * ov[j];
    x.p.step(x.buf, i, wv, gv);
    st<N>(x.w, i, wv);
  }
};

}  // namespace

cudaError_t gsam_dots_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, GsamDots{});
}

cudaError_t gsam_coef_launch(const double* partials, int64_t n_chunks, const float* grad_scale,
                             const float* old_grad_scale, const float* found_inf, double alpha, double eps,
                             double* coefs, void* stats, bool stats_f64, cudaStream_t stream) {
  gsam_coef_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, grad_scale, old_grad_scale, found_inf,
                                                       alpha, eps, coefs, stats, stats_f64);
  return cudaGetLastError();
}

cudaError_t gsam_combine_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, bool restore,
                                int64_t stash_mode, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, GsamCombine{coefs, restore, stash_mode});
}

cudaError_t gsam_sgd_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, int64_t stash_mode,
                            cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, GsamSgd{coefs, stash_mode});
}

}  // namespace saf::cuda
