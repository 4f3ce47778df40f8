// CUDA kernels of the SAM family over a multi-tensor plan in device memory (machinery:
// csrc/include/saf/multi_tensor.cuh; per-element math: csrc/include/saf/multi_tensor.h).
//
// sam_perturb_ = 3 launches whatever the number of tensors: per-chunk partial sums of (T g)^2,
// a one-block finalize (fixed-order sum, norm, coef = 1 / (norm + eps) / grad_scale, or 0 when
// the norm is non-finite or found_inf is set), then the perturbation, which reads coef from
// device memory: no host synchronisation. Restore and the fused restore + SGD / AdamW steps are
// one launch each, and read grad_scale / found_inf from device memory too.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace S = saf::mt::sam;
namespace SG = saf::mt::sgd;
namespace AW = saf::mt::adamw;

// ---- element functors (instantiated by multi_tensor.cuh's kernel templates) ----

// Pass 1 of sam_perturb_: sum over the chunk of (T g)^2.
struct SamNorm {
  static constexpr int kDtype = S::G, kSums = 1;
  template <typename T>
  __device__ __forceinline__ NormCtx<T> chunk(const ChunkRef& c) const {
    return norm_ctx<T>(c);
  }
  template <int N, class C, typename acc_t>
  __device__ __forceinline__ void term(const C& x, int64_t i, acc_t (&a)[1]) const {
    acc_t v[N];
    x.template scaled_grads<N>(i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) a[0] += v[j] * v[j];
  }
};

// Pass 2: w += rho T^2 g coef, the stash written (copy: w raw; delta: the rounded perturbation).
struct SamPerturb : PerturbBase {
  template <typename T>
  __device__ __forceinline__ PerturbCtx<T> chunk(const ChunkRef& c) const {
    const double coef = *coef_dev;
    return perturb_ctx<T>(c, coef, c.t->param[S::RHO] * coef);
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    using T = std::remove_pointer_t<decltype(x.w)>;
    T* stash_t = static_cast<T*>(x.stash);
    acc_t wv[N], gv[N], e[N];
    const Raw<N, T> wr = ld_raw<N>(x.w, i, wv);  // read once: stashed raw, used for the arithmetic
    ld<N>(x.g, i, gv);
#pragma unroll
    for (int j = 0; j < N; ++j) e[j] = saf::mt::sam_e(wv[j], gv[j], x.rc, x.eta, x.adaptive);
    if (mode == S::COPY) {
      st_raw<N>(stash_t, i, wr);
    } else {
      stash_delta<N>(x.stash, x.sdt, i, e);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) wv[j] += e[j];
    st<N>(x.w, i, wv);
  }
};

// The weights before the perturbation (copy mode: a raw copy, bit exact; delta: w - stash).
struct SamRestore {
  static constexpr int kDtype = S::W;
  int64_t mode;
  template <typename T>
  __device__ __forceinline__ RestoreCtx<T> chunk(const ChunkRef& c) const {
    return restore_ctx<T>(c);
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    acc_of<C> v[N];
    if (mode != S::COPY) load_restored<N>(x.w, x.stash, x.sdt, mode, i, v);
    store_restored<N>(x.w, x.stash, mode, i, v);
  }
};

// Restore + torch.optim.SGD; found_inf set: the restore only, state untouched.
struct SamSgd : StepBase {
  template <typename T>
  struct Ctx : StepCtx<T> {
    T* buf;  // same dtype as w (checked on the host)
    SgdParams<opmath_t<T>> p;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    Ctx<T> x;
    static_cast<StepCtx<T>&>(x) = step_ctx<T>(c);
    x.buf = stream_ptr<T>(c.t, SG::BUF, c.start);
    x.p = sgd_params<opmath_t<T>>(c.t);
    return x;
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    acc_t wv[N], gv[N];
    if (!step_inputs<N>(x, mode, x.skip, i, wv, gv)) return;
#pragma unroll
    for (int j = 0; j < N; ++j) gv[j] *= x.inv;
    x.p.step(x.buf, i, wv, gv);
    st<N>(x.w, i, wv);
  }
};

// Restore + torch.optim.AdamW; found_inf set: the restore only, state untouched.
struct SamAdamW : StepBase {
  template <typename T>
  struct Ctx : StepCtx<T> {
    T* m;  // same dtype as w (checked on the host)
    T* v;
    bool maximize;
    saf::mt::AdamWCoefs<opmath_t<T>> k;
    opmath_t<T> beta1, beta2, eps;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    using acc_t = opmath_t<T>;
    const TensorEntry* t = c.t;
    const double step = double(*static_cast<const float*>(t->ptr[AW::STEP]));
    Ctx<T> x;
    static_cast<StepCtx<T>&>(x) = step_ctx<T>(c);
    x.m = stream_ptr<T>(t, AW::EXP_AVG, c.start);
    x.v = stream_ptr<T>(t, AW::EXP_AVG_SQ, c.start);
    x.maximize = (t->flags & AW::kMaximize) != 0;
    x.k = saf::mt::adamw_coefs<acc_t>(t->param[AW::LR], t->param[AW::BETA1], t->param[AW::BETA2], t->param[AW::WD],
                                      step);
    x.beta1 = acc_t(t->param[AW::BETA1]);
    x.beta2 = acc_t(t->param[AW::BETA2]);
    x.eps = acc_t(t->param[AW::EPS]);
    return x;
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    acc_t wv[N], gv[N], mv[N], vv[N];
    if (!step_inputs<N>(x, mode, x.skip, i, wv, gv)) return;
    ld<N>(x.m, i, mv);
    ld<N>(x.v, i, vv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      wv[j] = saf::mt::adamw_step(wv[j], gv[j] * x.inv, mv[j], vv[j], x.beta1, x.beta2, x.eps, x.k, x.maximize);
    }
    st<N>(x.m, i, mv);
    st<N>(x.v, i, vv);
    st<N>(x.w, i, wv);
  }
};

// The one-block finalize of sam_perturb_ (also ESAM's and R-SAM's): the fixed-order sum of the
// partials, the norm, coef = 1 / (norm + eps) / grad_scale (0: perturb nothing).
__global__ void __launch_bounds__(kFinalizeThreads)
    sam_coef_kernel(const double* partials, int64_t n, const float* grad_scale, const float* found_inf, double eps,
                    void* norm_out, bool norm_f64, double* coef_out) {
  const double s = sum_partials(partials, n);
  if (threadIdx.x == 0) {
    const saf::mt::SamCoef r = saf::mt::sam_coef(s, inv_scale_of(grad_scale), eps, found_inf_of(found_inf));
    if (norm_f64) {
      *static_cast<double*>(norm_out) = r.norm;
    } else {
      *static_cast<float*>(norm_out) = float(r.norm);
    }
    *coef_out = r.coef;
  }
}

}  // namespace

int64_t mt_chunk_size() { return kChunk; }

cudaError_t sam_norm_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, SamNorm{});
}

cudaError_t sam_coef_launch(const double* partials, int64_t n_chunks, const float* grad_scale,
                            const float* found_inf, double eps, void* norm_out, bool norm_f64, double* coef_out,
                            cudaStream_t stream) {
  sam_coef_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, grad_scale, found_inf, eps, norm_out,
                                                      norm_f64, coef_out);
  return cudaGetLastError();
}

cudaError_t sam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, const double* coef, int64_t stash_mode,
                               cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, SamPerturb{{coef, stash_mode}});
}

cudaError_t sam_restore_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, SamRestore{stash_mode});
}

cudaError_t sam_restore_sgd_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                   const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, SamSgd{{stash_mode, grad_scale, found_inf}});
}

cudaError_t sam_restore_adamw_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                     const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, SamAdamW{{stash_mode, grad_scale, found_inf}});
}

}  // namespace saf::cuda
