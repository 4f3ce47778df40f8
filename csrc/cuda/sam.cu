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
namespace S = saf::mt::sam;
namespace SG = saf::mt::sgd;
namespace AW = saf::mt::adamw;

// x rounded to the dtype dt and widened back: what a delta-mode stash holds.
template <typename acc_t>
__device__ __forceinline__ acc_t round_to(acc_t x, int32_t dt) {
  switch (static_cast<DType>(dt)) {
    case DType::F32: return acc_t(float(x));
    case DType::F16: return acc_t(__half2float(__float2half_rn(float(x))));
    case DType::BF16: return acc_t(__bfloat162float(__float2bfloat16_rn(float(x))));
    default: return x;
  }
}

__device__ __forceinline__ char* stream_bytes(const TensorEntry* t, int s, int64_t start) {
  return static_cast<char*>(t->ptr[s]) + start * dtype_size(static_cast<DType>(t->dtype[s]));
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) sam_norm_kernel(const void* plan, double* partials) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool adaptive = (t->flags & S::kAdaptive) != 0;
  double acc = 0;
  dispatch_dtype<F64>(t->dtype[S::G], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    const T* g = stream_ptr<T>(t, S::G, c.start);
    const T* w = stream_ptr<T>(t, S::W, c.start);
    const acc_t eta = acc_t(t->param[S::ETA]);
    acc_t a = acc_t(0);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t gv[N], wv[N];
      ld<N>(g, i, gv);
      if (adaptive) ld<N>(w, i, wv);  // plain SAM never reads the weights here
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const acc_t x = adaptive ? gv[j] * saf::mt::asam_t(wv[j], eta, true) : gv[j];
        a += x * x;
      }
    });
    acc = double(a);
  });
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kFinalizeThreads)
    sam_coef_kernel(const double* partials, int64_t n, const float* grad_scale, const float* found_inf, double eps,
                    void* norm_out, bool norm_f64, double* coef_out) {
  const double s = sum_partials(partials, n);
  if (threadIdx.x == 0) {
    const double inv_scale = grad_scale ? 1.0 / double(*grad_scale) : 1.0;
    const bool skip = found_inf != nullptr && *found_inf > 0.0f;
    const saf::mt::SamCoef r = saf::mt::sam_coef(s, inv_scale, eps, skip);
    if (norm_f64) {
      *static_cast<double*>(norm_out) = r.norm;
    } else {
      *static_cast<float*>(norm_out) = float(r.norm);
    }
    *coef_out = r.coef;
  }
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) sam_perturb_kernel(const void* plan, const double* coef_dev, int64_t mode) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const double coef = *coef_dev;
  const bool adaptive = (t->flags & S::kAdaptive) != 0;
  const bool aligned = is_aligned(t);
  const int32_t sdt = t->dtype[S::STASH];
  void* stash = stream_bytes(t, S::STASH, c.start);
  dispatch_dtype<F64>(t->dtype[S::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, S::W, c.start);
    const T* g = stream_ptr<T>(t, S::G, c.start);
    T* stash_t = static_cast<T*>(stash);  // copy mode: same dtype as w (checked on the host)
    if (coef == 0.0) {  // perturb nothing; the stash still serves the restore
      chunk_loop(c.n, aligned, [&](auto width, int64_t i) {
        constexpr int N = decltype(width)::value;
        if (mode == S::COPY) {
          copy_raw<N>(stash_t, w, i);
        } else {
          acc_t z[N];
#pragma unroll
          for (int j = 0; j < N; ++j) z[j] = acc_t(0);
          st_any<N>(stash, sdt, i, z);
        }
      });
      return;
    }
    const acc_t rc = acc_t(t->param[S::RHO] * coef);
    const acc_t eta = acc_t(t->param[S::ETA]);
    chunk_loop(c.n, aligned, [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t wv[N], gv[N], e[N];
      const Raw<N, T> wr = ld_raw<N>(w, i, wv);  // read once: stashed raw, used for the arithmetic
      ld<N>(g, i, gv);
#pragma unroll
      for (int j = 0; j < N; ++j) e[j] = saf::mt::sam_e(wv[j], gv[j], rc, eta, adaptive);
      if (mode == S::COPY) {
        st_raw<N>(stash_t, i, wr);
      } else {
        st_any<N>(stash, sdt, i, e);
#pragma unroll
        for (int j = 0; j < N; ++j) e[j] = round_to(e[j], sdt);  // add exactly what the restore subtracts
      }
#pragma unroll
      for (int j = 0; j < N; ++j) wv[j] += e[j];
      st<N>(w, i, wv);
    });
  });
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

// Writes the restored weights of N elements: a raw copy in copy mode (bit exact).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_restored(T* w, const void* stash, int64_t mode, int64_t i, const acc_t (&v)[N]) {
  if (mode == S::COPY) {
    copy_raw<N>(w, static_cast<const T*>(stash), i);
  } else {
    st<N>(w, i, v);
  }
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) sam_restore_kernel(const void* plan, int64_t mode) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const int32_t sdt = t->dtype[S::STASH];
  const void* stash = stream_bytes(t, S::STASH, c.start);
  dispatch_dtype<F64>(t->dtype[S::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, S::W, c.start);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t v[N];
      if (mode != S::COPY) load_restored<N>(w, stash, sdt, mode, i, v);
      store_restored<N>(w, stash, mode, i, v);
    });
  });
}

template <bool F64>
__global__ void __launch_bounds__(kBlock)
    sam_restore_sgd_kernel(const void* plan, int64_t mode, const float* grad_scale, const float* found_inf) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool skip = found_inf != nullptr && *found_inf > 0.0f;
  const double inv_scale = grad_scale ? 1.0 / double(*grad_scale) : 1.0;
  const int32_t sdt = t->dtype[SG::STASH];
  const void* stash = stream_bytes(t, SG::STASH, c.start);
  const bool nesterov = t->flags & SG::kNesterov, maximize = t->flags & SG::kMaximize;
  const bool first = t->flags & SG::kFirstRun;
  dispatch_dtype<F64>(t->dtype[SG::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, SG::W, c.start);
    const T* g = stream_ptr<T>(t, SG::G, c.start);
    T* buf = stream_ptr<T>(t, SG::BUF, c.start);  // same dtype as w (checked on the host)
    const acc_t lr = acc_t(t->param[SG::LR]), wd = acc_t(t->param[SG::WD]);
    const acc_t mom = acc_t(t->param[SG::MOMENTUM]), damp = acc_t(t->param[SG::DAMPENING]);
    const acc_t inv = acc_t(inv_scale);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t wv[N];
      load_restored<N>(w, stash, sdt, mode, i, wv);
      if (skip) {  // found_inf: the restore only, state untouched
        store_restored<N>(w, stash, mode, i, wv);
        return;
      }
      acc_t gv[N], bv[N];
      ld<N>(g, i, gv);
      if (mom != acc_t(0) && !first) ld<N>(buf, i, bv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        wv[j] = saf::mt::sgd_step(wv[j], gv[j] * inv, bv[j], lr, wd, mom, damp, nesterov, maximize, first);
      }
      if (mom != acc_t(0)) st<N>(buf, i, bv);
      st<N>(w, i, wv);
    });
  });
}

template <bool F64>
__global__ void __launch_bounds__(kBlock)
    sam_restore_adamw_kernel(const void* plan, int64_t mode, const float* grad_scale, const float* found_inf) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool skip = found_inf != nullptr && *found_inf > 0.0f;
  const double inv_scale = grad_scale ? 1.0 / double(*grad_scale) : 1.0;
  const int32_t sdt = t->dtype[AW::STASH];
  const void* stash = stream_bytes(t, AW::STASH, c.start);
  const bool maximize = t->flags & AW::kMaximize;
  const double step = double(*static_cast<const float*>(t->ptr[AW::STEP]));
  dispatch_dtype<F64>(t->dtype[AW::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, AW::W, c.start);
    const T* g = stream_ptr<T>(t, AW::G, c.start);
    T* m = stream_ptr<T>(t, AW::EXP_AVG, c.start);  // same dtype as w (checked on the host)
    T* v = stream_ptr<T>(t, AW::EXP_AVG_SQ, c.start);
    const auto k = saf::mt::adamw_coefs<acc_t>(t->param[AW::LR], t->param[AW::BETA1], t->param[AW::BETA2],
                                               t->param[AW::WD], step);
    const acc_t beta1 = acc_t(t->param[AW::BETA1]), beta2 = acc_t(t->param[AW::BETA2]);
    const acc_t eps = acc_t(t->param[AW::EPS]), inv = acc_t(inv_scale);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t wv[N];
      load_restored<N>(w, stash, sdt, mode, i, wv);
      if (skip) {
        store_restored<N>(w, stash, mode, i, wv);
        return;
      }
      acc_t gv[N], mv[N], vv[N];
      ld<N>(g, i, gv);
      ld<N>(m, i, mv);
      ld<N>(v, i, vv);
#pragma unroll
      for (int j = 0; j < N; ++j) wv[j] = saf::mt::adamw_step(wv[j], gv[j] * inv, mv[j], vv[j], beta1, beta2, eps, k, maximize);
      st<N>(m, i, mv);
      st<N>(v, i, vv);
      st<N>(w, i, wv);
    });
  });
}

}  // namespace

int64_t mt_chunk_size() { return kChunk; }

// One block per chunk; the float64-capable instantiation only when the plan holds float64.
#define SAF_MT_LAUNCH(kernel, ...)                                                     \
  do {                                                                                 \
    if (n_chunks == 0) return cudaSuccess;                                             \
    if (f64) {                                                                         \
      kernel<true><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);            \
    } else {                                                                           \
      kernel<false><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);           \
    }                                                                                  \
    return cudaGetLastError();                                                         \
  } while (0)

cudaError_t sam_norm_launch(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream) {
  SAF_MT_LAUNCH(sam_norm_kernel, plan, partials);
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
  SAF_MT_LAUNCH(sam_perturb_kernel, plan, coef, stash_mode);
}

cudaError_t sam_restore_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode, cudaStream_t stream) {
  SAF_MT_LAUNCH(sam_restore_kernel, plan, stash_mode);
}

cudaError_t sam_restore_sgd_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                   const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  SAF_MT_LAUNCH(sam_restore_sgd_kernel, plan, stash_mode, grad_scale, found_inf);
}

cudaError_t sam_restore_adamw_launch(const void* plan, int64_t n_chunks, bool f64, int64_t stash_mode,
                                     const float* grad_scale, const float* found_inf, cudaStream_t stream) {
  SAF_MT_LAUNCH(sam_restore_adamw_kernel, plan, stash_mode, grad_scale, found_inf);
}

}  // namespace saf::cuda
