// CUDA kernels of ESAM's stochastic weight perturbation and of philox_ (math:
// csrc/include/saf/multi_tensor.h, namespace esam; random numbers: csrc/include/saf/philox.h).
//
// The keep mask is never stored: the norm pass and the perturbation pass each regenerate it,
// one Philox4x32-10 evaluation per 4 elements (a 4-wide access covers exactly one counter: chunk
// starts are multiples of 4 and the plan pads every tensor's rng_offset to a multiple of 4).
// esam_perturb_ = 3 launches (norm partials, sam_coef finalize, perturbation), no host sync.
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
#include "saf/philox.h"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace E = saf::mt::esam;
namespace S = saf::mt::sam;

__device__ __forceinline__ uint32_t word_at(const rng::Words& w, uint64_t pos) {
  const uint32_t lane = uint32_t(pos & 3);
  // Selects, not an indexed load: keeps the words in registers.
  return lane == 0 ? w.w[0] : lane == 1 ? w.w[1] : lane == 2 ? w.w[2] : w.w[3];
}

// Keep flags of N elements at position pos (N = 4: pos is a multiple of 4, one counter).
template <int N>
__device__ __forceinline__ void keep_flags(uint64_t key, uint64_t offset, uint64_t pos, uint32_t thr, bool (&k)[N]) {
  const rng::Words w = rng::philox4x32_10(rng::counter_of(offset, pos), key);
  if constexpr (N == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) k[j] = rng::keep(w.w[j], thr);
  } else {
    k[0] = rng::keep(word_at(w, pos), thr);
  }
}

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
__global__ void __launch_bounds__(kBlock)
    esam_norm_kernel(const void* plan, uint64_t key, uint64_t offset, double* partials) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const bool adaptive = (t->flags & E::kAdaptive) != 0;
  const uint32_t thr = rng::bernoulli_threshold(t->param[E::BETA]);
  const uint64_t pos0 = uint64_t(t->rng_offset + c.start);
  double acc = 0;
  dispatch_dtype<F64>(t->dtype[E::G], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    const T* g = stream_ptr<T>(t, E::G, c.start);
    const T* w = stream_ptr<T>(t, E::W, c.start);
    const acc_t eta = acc_t(t->param[E::ETA]);
    acc_t a = acc_t(0);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t gv[N], wv[N];
      bool k[N];
      keep_flags<N>(key, offset, pos0 + uint64_t(i), thr, k);
      ld<N>(g, i, gv);
      if (adaptive) ld<N>(w, i, wv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const acc_t x = adaptive ? gv[j] * saf::mt::asam_t(wv[j], eta, true) : gv[j];
        // A select: a dropped element's inf / NaN gradient must not reach the norm.
        a += k[j] ? x * x : acc_t(0);
      }
    });
    acc = double(a);
  });
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <bool F64>
__global__ void __launch_bounds__(kBlock) esam_perturb_kernel(const void* plan, uint64_t key, uint64_t offset,
                                                              const double* coef_dev, int64_t mode) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const double coef = *coef_dev;
  const bool adaptive = (t->flags & E::kAdaptive) != 0;
  const bool aligned = is_aligned(t);
  const double beta = t->param[E::BETA];
  const uint32_t thr = rng::bernoulli_threshold(beta);
  const uint64_t pos0 = uint64_t(t->rng_offset + c.start);
  const int32_t sdt = t->dtype[E::STASH];
  void* stash = stream_bytes(t, E::STASH, c.start);
  dispatch_dtype<F64>(t->dtype[E::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, E::W, c.start);
    const T* g = stream_ptr<T>(t, E::G, c.start);
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
    const acc_t rc = acc_t(t->param[E::RHO] / beta * coef);
    const acc_t eta = acc_t(t->param[E::ETA]);
    chunk_loop(c.n, aligned, [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      acc_t wv[N], gv[N], e[N], out[N];
      bool k[N];
      keep_flags<N>(key, offset, pos0 + uint64_t(i), thr, k);
      ld<N>(w, i, wv);
      ld<N>(g, i, gv);
#pragma unroll
      for (int j = 0; j < N; ++j) e[j] = k[j] ? saf::mt::sam_e(wv[j], gv[j], rc, eta, adaptive) : acc_t(0);
      if (mode == S::COPY) {
        copy_raw<N>(stash_t, w, i);
      } else {
        st_any<N>(stash, sdt, i, e);
#pragma unroll
        for (int j = 0; j < N; ++j) e[j] = round_to(e[j], sdt);  // add exactly what the restore subtracts
      }
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = wv[j] + e[j];
      if constexpr (N == 4) {
        // Dropped elements keep their exact bits: write the raw value back where k is false.
        T raw[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) raw[j] = k[j] ? from_acc<T>(out[j]) : w[i + j];
        *reinterpret_cast<Pack4<T>*>(w + i) = *reinterpret_cast<const Pack4<T>*>(raw);
      } else {
        if (k[0]) w[i] = from_acc<T>(out[0]);
      }
    });
  });
}

template <bool F64>
__global__ void __launch_bounds__(kBlock)
    esam_restore_delta_kernel(const void* plan, uint64_t key, uint64_t offset) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  const TensorEntry* t = c.t;
  const uint32_t thr = rng::bernoulli_threshold(t->param[E::BETA]);
  const uint64_t pos0 = uint64_t(t->rng_offset + c.start);
  const int32_t sdt = t->dtype[E::STASH];
  const void* stash = stream_bytes(t, E::STASH, c.start);
  dispatch_dtype<F64>(t->dtype[E::W], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    T* w = stream_ptr<T>(t, E::W, c.start);
    chunk_loop(c.n, is_aligned(t), [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      bool k[N];
      keep_flags<N>(key, offset, pos0 + uint64_t(i), thr, k);
      acc_t wv[N], e[N];
      ld<N>(w, i, wv);
      ld_any<N>(stash, sdt, i, e);
      // Only the kept elements are written: the dropped ones keep their exact bits.
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (k[j]) w[i + j] = from_acc<T>(wv[j] - e[j]);
      }
    });
  });
}

template <typename T>
__device__ __forceinline__ void put(void* out, int64_t i, double v) {
  static_cast<T*>(out)[i] = from_acc<T>(v);
}

__global__ void philox_kernel(void* out, int32_t dtype, int64_t n, uint64_t key, uint64_t offset, int64_t kind,
                              uint32_t thr) {
  const int64_t n_ctr = (n + 3) / 4;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < n_ctr; c += int64_t(gridDim.x) * blockDim.x) {
    const rng::Words w = rng::philox4x32_10(offset + uint64_t(c), key);
    const rng::Normals z = kind == 2 ? rng::normals(w) : rng::Normals{};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * c + j;
      if (i >= n) break;
      if (dtype == kPhiloxInt64) {
        static_cast<int64_t*>(out)[i] = int64_t(w.w[j]);
        continue;
      }
      const double v = kind == 1 ? double(rng::uniform(w.w[j])) : kind == 2 ? double(z.n[j])
                                                                             : (rng::keep(w.w[j], thr) ? 1.0 : 0.0);
      switch (static_cast<DType>(dtype)) {
        case DType::F32: put<float>(out, i, v); break;
        case DType::F16: put<__half>(out, i, v); break;
        case DType::BF16: put<__nv_bfloat16>(out, i, v); break;
        default: put<double>(out, i, v); break;
      }
    }
  }
}

}  // namespace

#define SAF_ESAM_LAUNCH(kernel, ...)                                               \
  do {                                                                             \
    if (n_chunks == 0) return cudaSuccess;                                         \
    if (f64) {                                                                     \
      kernel<true><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);        \
    } else {                                                                       \
      kernel<false><<<unsigned(n_chunks), kBlock, 0, stream>>>(__VA_ARGS__);       \
    }                                                                              \
    return cudaGetLastError();                                                     \
  } while (0)

cudaError_t philox_launch(void* out, int32_t dtype, int64_t n, uint64_t key, uint64_t offset, int64_t kind,
                          uint32_t threshold, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t n_ctr = (n + 3) / 4;
  const unsigned blocks = unsigned(n_ctr < 4096 * 256 ? (n_ctr + 255) / 256 : 4096);
  philox_kernel<<<blocks, 256, 0, stream>>>(out, dtype, n, key, offset, kind, threshold);
  return cudaGetLastError();
}

cudaError_t esam_norm_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                             double* partials, cudaStream_t stream) {
  SAF_ESAM_LAUNCH(esam_norm_kernel, plan, key, offset, partials);
}

cudaError_t esam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                const double* coef, int64_t stash_mode, cudaStream_t stream) {
  SAF_ESAM_LAUNCH(esam_perturb_kernel, plan, key, offset, coef, stash_mode);
}

cudaError_t esam_restore_delta_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                      cudaStream_t stream) {
  SAF_ESAM_LAUNCH(esam_restore_delta_kernel, plan, key, offset);
}

}  // namespace saf::cuda
