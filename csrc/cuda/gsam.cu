// CUDA kernels of GSAM (math: csrc/include/saf/multi_tensor.h, namespace gsam and gsam_coef).
//
// gsam_combine_ / gsam_restore_sgd_ = 3 launches whatever the number of tensors: per-chunk
// partial sums of <old_g, g>, |old_g|^2, |g|^2 (one pass reading both gradients), a one-block
// finalize (fixed-order sums: deterministic; the coefficients c_new, c_old and the stats in
// device memory), then one pass: the combined gradient written into g (+ restore), or the
// restore and a torch.optim.SGD step with the combined gradient, never written. No host sync.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/esam_launchers.h"
#include "saf/cuda_utils.cuh"
#include "saf/multi_tensor.cuh"
#include "saf/multi_tensor.h"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace G = saf::mt::gsam;
namespace S = saf::mt::sam;
namespace SG = saf::mt::sgd;

__device__ __forceinline__ char* stream_bytes(const TensorEntry* t, int s, int64_t start) {
  return static_cast<char*>(t->ptr[s]) + start * dtype_size(static_cast<DType>(t->dtype[s]));
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) gsam_dots_kernel(const void* plan, int64_t n_chunks, double* partials) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  double dot = 0, oo = 0, gg = 0;
  dispatch_dtype<F64>(t->dtype[G::G], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    const T* g = stream_ptr<T>(t, G::G, c.start);
    const T* o = stream_ptr<T>(t, G::OLD_G, c.start);
    acc_t a = 0, b = 0, d = 0;
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t gv[N], ov[N];
      ld<N>(g, i, gv);
      ld<N>(o, i, ov);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        a += ov[j] * gv[j];
        b += ov[j] * ov[j];
        d += gv[j] * gv[j];
      }
    });
    dot = double(a);
    oo = double(b);
    gg = double(d);
  });
  const double s0 = block_sum(dot);
  const double s1 = block_sum(oo);
  const double s2 = block_sum(gg);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s0;
    partials[n_chunks + blockIdx.x] = s1;
    partials[2 * n_chunks + blockIdx.x] = s2;
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    gsam_coef_kernel(const double* partials, int64_t n, const float* grad_scale, const float* old_grad_scale,
                     const float* found_inf, double alpha, double eps, double* coefs, void* stats, bool stats_f64) {
  const double dot = sum_partials(partials, n);
  const double oo = sum_partials(partials + n, n);
  const double gg = sum_partials(partials + 2 * n, n);
  if (threadIdx.x == 0) {
    const double inv_new = grad_scale ? 1.0 / double(*grad_scale) : 1.0;
    const double inv_old = old_grad_scale ? 1.0 / double(*old_grad_scale) : 1.0;
    const bool skip = found_inf != nullptr && *found_inf > 0.0f;
    const saf::mt::GsamCoef r = saf::mt::gsam_coef(dot, oo, gg, inv_new, inv_old, alpha, eps, skip);
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

// The restored weights of N elements (copy mode: the stash; delta mode: w - stash).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_restored(const T* w, const void* stash, int32_t sdt, int64_t mode, int64_t i,
                                              acc_t (&out)[N]) {
  if (mode == S::COPY) {
    ld<N>(static_cast<const T*>(stash), i, out);
  } else {
    acc_t e[N];
    ld<N>(w, i, out);
    ld_any<N>(stash, sdt, i, e);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] -= e[j];
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_restored(T* w, const void* stash, int64_t mode, int64_t i, const acc_t (&v)[N]) {
  if (mode == S::COPY) {
    copy_raw<N>(w, static_cast<const T*>(stash), i);  // bit exact
  } else {
    st<N>(w, i, v);
  }
}

template <bool F64>
__global__ void __launch_bounds__(kBlock)
    gsam_combine_kernel(const void* plan, const double* coefs, bool restore, int64_t mode) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool apply = coefs[2] != 0.0;
  const int32_t sdt = t->dtype[G::STASH];
  const void* stash = stream_bytes(t, G::STASH, c.start);
  dispatch_dtype<F64>(t->dtype[G::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, G::W, c.start);
    T* g = stream_ptr<T>(t, G::G, c.start);
    const T* o = stream_ptr<T>(t, G::OLD_G, c.start);
    const acc_t cn = acc_t(coefs[0]), co = acc_t(coefs[1]);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      if (restore) {
        acc_t v[N];
        if (mode != S::COPY) load_restored<N>(w, stash, sdt, mode, i, v);
        store_restored<N>(w, stash, mode, i, v);
      }
      if (apply) {
        acc_t gv[N], ov[N];
        ld<N>(g, i, gv);
        if (co != acc_t(0)) {  // else old_g is not read (alpha = 0, or 0 * inf)
          ld<N>(o, i, ov);
#pragma unroll
          for (int j = 0; j < N; ++j) gv[j] = cn * gv[j] + co * ov[j];
        } else {
#pragma unroll
          for (int j = 0; j < N; ++j) gv[j] = cn * gv[j];
        }
        st<N>(g, i, gv);
      }
    });
  });
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) gsam_sgd_kernel(const void* plan, const double* coefs, int64_t mode) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool apply = coefs[2] != 0.0;
  const int32_t sdt = t->dtype[G::STASH];
  const void* stash = stream_bytes(t, G::STASH, c.start);
  const bool nesterov = t->flags & SG::kNesterov, maximize = t->flags & SG::kMaximize;
  const bool first = t->flags & SG::kFirstRun;
  dispatch_dtype<F64>(t->dtype[G::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, G::W, c.start);
    const T* g = stream_ptr<T>(t, G::G, c.start);
    const T* o = stream_ptr<T>(t, G::OLD_G, c.start);
    T* buf = stream_ptr<T>(t, G::BUF, c.start);  // same dtype as w (checked on the host)
    const acc_t lr = acc_t(t->param[SG::LR]), wd = acc_t(t->param[SG::WD]);
    const acc_t mom = acc_t(t->param[SG::MOMENTUM]), damp = acc_t(t->param[SG::DAMPENING]);
    const acc_t cn = acc_t(coefs[0]), co = acc_t(coefs[1]);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t wv[N];
      load_restored<N>(w, stash, sdt, mode, i, wv);
      if (!apply) {  // found_inf: the restore only, state untouched
        store_restored<N>(w, stash, mode, i, wv);
        return;
      }
      acc_t gv[N], ov[N], bv[N];
      ld<N>(g, i, gv);
      if (co != acc_t(0)) {
        ld<N>(o, i, ov);
      } else {  // old_g is not read (alpha = 0, or 0 * inf)
#pragma unroll
        for (int j = 0; j < N; ++j) ov[j] = acc_t(0);
      }
      if (mom != acc_t(0) && !first) ld<N>(buf, i, bv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        wv[j] = saf::mt::sgd_step(wv[j], cn * gv[j] + co * ov[j], bv[j], lr, wd, mom, damp, nesterov, maximize, first);
      }
      if (mom != acc_t(0)) st<N>(buf, i, bv);
      st<N>(w, i, wv);
    });
  });
}

}  // namespace

#define SAF_GSAM_LAUNCH(kernel, ...)                                               \
  do {                                                                             \
    if (n_chunks == 0) return cudaSuccess;                                         \
    if (f64) {                                                                     \
      kernel<true><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);        \
    } else {                                                                       \
      kernel<false><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);       \
    }                                                                              \
    return cudaGetLastError();                                                     \
  } while (0)

cudaError_t gsam_dots_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream) {
  SAF_GSAM_LAUNCH(gsam_dots_kernel, plan, n_chunks, partials);
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
  SAF_GSAM_LAUNCH(gsam_combine_kernel, plan, coefs, restore, stash_mode);
}

cudaError_t gsam_sgd_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, int64_t stash_mode,
                            cudaStream_t stream) {
  SAF_GSAM_LAUNCH(gsam_sgd_kernel, plan, coefs, stash_mode);
}

}  // namespace saf::cuda
