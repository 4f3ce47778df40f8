// CUDA kernels of ESAM's stochastic weight perturbation and of philox_ (math:
// csrc/include/saf/multi_tensor.h, namespace esam; random numbers: csrc/include/saf/philox.h).
//
// The keep mask is never stored: the norm pass and the perturbation pass each regenerate it,
// one Philox4x32-10 evaluation per 4 elements (a 4-wide access covers exactly one counter: chunk
// starts are multiples of 4 and the plan pads every tensor's rng_offset to a multiple of 4).
// esam_perturb_ = 3 launches (norm partials, sam_coef finalize, perturbation), no host sync.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"
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

// The Philox position and keep threshold of a chunk (ESAM's streams are sam's slots).
struct KeepCtx {
  uint32_t thr;
  uint64_t pos0;
};

__device__ __forceinline__ KeepCtx keep_ctx(const ChunkRef& c) {
  return {rng::bernoulli_threshold(c.t->param[E::BETA]), uint64_t(c.t->rng_offset + c.start)};
}

// Pass 1: sum over the chunk of (keep T g)^2.
struct EsamNorm {
  static constexpr int kDtype = E::G, kSums = 1;
  uint64_t key, offset;
  template <typename T>
  struct Ctx : NormCtx<T> {
    KeepCtx keep;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    Ctx<T> x;
    static_cast<NormCtx<T>&>(x) = norm_ctx<T>(c);
    x.keep = keep_ctx(c);
    return x;
  }
  template <int N, class C, typename acc_t>
  __device__ __forceinline__ void term(const C& x, int64_t i, acc_t (&a)[1]) const {
    acc_t v[N];
    bool k[N];
    keep_flags<N>(key, offset, x.keep.pos0 + uint64_t(i), x.keep.thr, k);
    x.template scaled_grads<N>(i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // A select: a dropped element's inf / NaN gradient must not reach the norm.
      a[0] += k[j] ? v[j] * v[j] : acc_t(0);
    }
  }
};

// Pass 2: w += keep rho / beta T^2 g coef, the stash written; dropped elements keep their bits.
struct EsamPerturb : PerturbBase {
  uint64_t key, offset;
  template <typename T>
  struct Ctx : PerturbCtx<T> {
    KeepCtx keep;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    const double coef = *coef_dev;
    Ctx<T> x;
    static_cast<PerturbCtx<T>&>(x) = perturb_ctx<T>(c, coef, c.t->param[E::RHO] / c.t->param[E::BETA] * coef);
    x.keep = keep_ctx(c);
    return x;
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using acc_t = acc_of<C>;
    using T = std::remove_pointer_t<decltype(x.w)>;
    T* stash_t = static_cast<T*>(x.stash);
    acc_t wv[N], gv[N], e[N], out[N];
    bool k[N];
    keep_flags<N>(key, offset, x.keep.pos0 + uint64_t(i), x.keep.thr, k);
    ld<N>(x.w, i, wv);
    ld<N>(x.g, i, gv);
#pragma unroll
    for (int j = 0; j < N; ++j) e[j] = k[j] ? saf::mt::sam_e(wv[j], gv[j], x.rc, x.eta, x.adaptive) : acc_t(0);
    if (mode == S::COPY) {
      copy_raw<N>(stash_t, x.w, i);
    } else {
      stash_delta<N>(x.stash, x.sdt, i, e);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = wv[j] + e[j];
    if constexpr (N == 4) {
      // Dropped elements keep their exact bits: write the raw value back where k is false.
      T raw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) raw[j] = k[j] ? from_acc<T>(out[j]) : x.w[i + j];
      *reinterpret_cast<Pack4<T>*>(x.w + i) = *reinterpret_cast<const Pack4<T>*>(raw);
    } else {
      if (k[0]) x.w[i] = from_acc<T>(out[0]);
    }
  }
};

// Delta-mode restore: w -= stash where the regenerated mask keeps the element.
struct EsamRestoreDelta {
  static constexpr int kDtype = E::W;
  uint64_t key, offset;
  template <typename T>
  struct Ctx : RestoreCtx<T> {
    KeepCtx keep;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    Ctx<T> x;
    static_cast<RestoreCtx<T>&>(x) = restore_ctx<T>(c);
    x.keep = keep_ctx(c);
    return x;
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    using T = std::remove_pointer_t<decltype(x.w)>;
    using acc_t = opmath_t<T>;
    bool k[N];
    keep_flags<N>(key, offset, x.keep.pos0 + uint64_t(i), x.keep.thr, k);
    acc_t wv[N], e[N];
    ld<N>(x.w, i, wv);
    ld_any<N>(x.stash, x.sdt, i, e);
    // Only the kept elements are written: the dropped ones keep their exact bits.
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (k[j]) x.w[i + j] = from_acc<T>(wv[j] - e[j]);
    }
  }
};

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
  return launch_partials(plan, n_chunks, f64, partials, stream, EsamNorm{key, offset});
}

cudaError_t esam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                const double* coef, int64_t stash_mode, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, EsamPerturb{{coef, stash_mode}, key, offset});
}

cudaError_t esam_restore_delta_launch(const void* plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                                      cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, EsamRestoreDelta{key, offset});
}

}  // namespace saf::cuda
