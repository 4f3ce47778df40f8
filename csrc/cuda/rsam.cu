// CUDA kernels of R-SAM (math: csrc/include/saf/multi_tensor.h, namespace rsam; random numbers:
// csrc/include/saf/philox.h).
//
// rsam_noise runs over a row plan: one block per chunk of whole rows (output units), so a unit's
// norm is reduced inside the block (a warp per row for rows shorter than kLongRow elements, the
// whole block per row otherwise) and the noise applied right after, while the row is in L1/L2:
// one launch, w read twice (once from cache), stash and w written once. Each thread works on
// whole Philox counters (4 positions), so every normal costs one quarter of a Philox evaluation
// and half a Box-Muller. rsam_perturb_ = norm partials + sam_coef finalize + perturbation, as
// sam_perturb_, with d = lam * g / grad_scale + (w - stash) recomputed in both passes.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"
#include "saf/philox.h"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace R = saf::mt::rsam;

constexpr int64_t kLongRow = 2048;  // rows at least this long get the whole block
// The noise kernel's blocks: Philox + Box-Muller need more registers than 512 threads allow.
constexpr int kNoiseBlock = 256;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the sum
}

// Sum of squares of the row's n elements, by `lanes` threads numbered `lane` (a warp or a block).
template <typename T>
__device__ __forceinline__ double row_sumsq(const T* row, int64_t n, int lane, int lanes) {
  double s = 0;
  for (int64_t i = lane; i < n; i += lanes) {
    const double x = double(to_acc<float>(row[i]));
    s += x * x;
  }
  return s;
}

template <>
__device__ __forceinline__ double row_sumsq<double>(const double* row, int64_t n, int lane, int lanes) {
  double s = 0;
  for (int64_t i = lane; i < n; i += lanes) s += row[i] * row[i];
  return s;
}

// stash = w and w += scale * z over the row's elements [begin, begin + n) of the tensor, z the
// normals of positions rng_offset + element; thread `lane` of `lanes` takes whole counters.
template <typename T>
__device__ __forceinline__ void row_noise(T* w, T* stash, int64_t begin, int64_t n, int64_t rng_offset, double scale,
                                          uint64_t key, uint64_t offset, int lane, int lanes) {
  using acc_t = opmath_t<T>;
  const uint64_t p0 = uint64_t(rng_offset + begin), p1 = p0 + uint64_t(n);
  const uint64_t c0 = p0 >> 2, c1 = (p1 + 3) >> 2;
  const acc_t s = acc_t(scale);
  for (uint64_t c = c0 + uint64_t(lane); c < c1; c += uint64_t(lanes)) {
    const rng::Normals z = rng::normals(rng::philox4x32_10(offset + c, key));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t pos = 4 * c + uint64_t(j);
      if (pos < p0 || pos >= p1) continue;
      const int64_t e = int64_t(pos - uint64_t(rng_offset));
      const T wr = w[e];
      stash[e] = wr;
      w[e] = from_acc<T>(to_acc<acc_t>(wr) + s * acc_t(z.n[j]));
    }
  }
}

template <bool F64>
__global__ void __launch_bounds__(kNoiseBlock) rsam_noise_kernel(const void* plan, uint64_t key, uint64_t offset, double std_mult) {
  const PlanView v = plan_view(plan);
  const ChunkEntry ce = v.chunks[blockIdx.x];
  const TensorEntry* t = v.tensors + ce.tensor;
  const int64_t len = int64_t(t->param[R::ROW_LEN]);
  const int64_t per = int64_t(t->param[R::CHUNK_ROWS]);
  const int64_t rows = t->numel / len;
  const int64_t row0 = int64_t(ce.chunk) * per;
  const int64_t row1 = row0 + per < rows ? row0 + per : rows;
  const double stdev = std_mult * t->param[R::STD];
  const double veps = (t->flags & R::kVector) ? R::kVectorEps : 0.0;
  dispatch_dtype<F64>(t->dtype[R::W], [&](auto zero) {
    using T = decltype(zero);
    T* w = static_cast<T*>(t->ptr[R::W]);
    T* stash = static_cast<T*>(t->ptr[R::STASH]);
    if (len >= kLongRow) {
      for (int64_t r = row0; r < row1; ++r) {
        // Every thread gets the row's sum (the same bits), so no broadcast through shared memory.
        const double ss = block_sum(row_sumsq(w + r * len, len, threadIdx.x, blockDim.x));
        row_noise(w, stash, r * len, len, t->rng_offset, stdev * (sqrt(ss) + veps), key, offset, threadIdx.x,
                  blockDim.x);
      }
    } else {
      const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
      for (int64_t r = row0 + warp; r < row1; r += warps) {
        const double ss = warp_sum(row_sumsq(w + r * len, len, lane, 32));
        row_noise(w, stash, r * len, len, t->rng_offset, stdev * (sqrt(ss) + veps), key, offset, lane, 32);
      }
    }
  });
}

// d of N elements: lam * g * inv + (w - stash).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void direction(const T* w, const T* g, const T* sp, int64_t i, acc_t lam_inv,
                                          acc_t (&d)[N]) {
  acc_t wv[N], gv[N], sv[N];
  ld<N>(w, i, wv);
  ld<N>(g, i, gv);
  ld<N>(sp, i, sv);
#pragma unroll
  for (int j = 0; j < N; ++j) d[j] = lam_inv * gv[j] + (wv[j] - sv[j]);
}

// The streams of rsam_perturb_'s two passes and lam / grad_scale.
template <typename T>
struct DirCtx {
  T* w;
  const T* g;
  const T* sp;
  opmath_t<T> li;  // lam / grad_scale
};

template <typename T>
__device__ __forceinline__ DirCtx<T> dir_ctx(const ChunkRef& c, double lam, const float* grad_scale) {
  return {stream_ptr<T>(c.t, R::W, c.start), stream_ptr<T>(c.t, R::G, c.start), stream_ptr<T>(c.t, R::STASH, c.start),
          opmath_t<T>(lam * inv_scale_of(grad_scale))};
}

// Pass 1: sum over the chunk of d^2.
struct RsamNorm {
  static constexpr int kDtype = R::W, kSums = 1;
  double lam;
  const float* grad_scale;
  template <typename T>
  __device__ __forceinline__ DirCtx<T> chunk(const ChunkRef& c) const {
    return dir_ctx<T>(c, lam, grad_scale);
  }
  template <int N, class C, typename acc_t>
  __device__ __forceinline__ void term(const C& x, int64_t i, acc_t (&a)[1]) const {
    acc_t d[N];
    direction<N>(x.w, x.g, x.sp, i, x.li, d);
#pragma unroll
    for (int j = 0; j < N; ++j) a[0] += d[j] * d[j];
  }
};

// Pass 2: w = stash + rho d coef (coef == 0: back to the clean weights, bit exact).
struct RsamPerturb {
  static constexpr int kDtype = R::W;
  double lam;
  const float* grad_scale;
  const double* coef_dev;
  double rho_mult;
  template <typename T>
  struct Ctx : DirCtx<T> {
    bool skip;
    opmath_t<T> rc;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    const double coef = *coef_dev;
    Ctx<T> x;
    static_cast<DirCtx<T>&>(x) = dir_ctx<T>(c, lam, grad_scale);
    x.skip = coef == 0.0;
    x.rc = opmath_t<T>(rho_mult * c.t->param[R::RHO] * coef);
    return x;
  }
  static constexpr bool kSkippable = true;
  template <int N, class C>
  __device__ __forceinline__ void skip_elem(const C& x, int64_t i) const {
    copy_raw<N>(x.w, x.sp, i);
  }
  template <int N, class C>
  __device__ __forceinline__ void elem(const C& x, int64_t i) const {
    acc_of<C> d[N], sv[N];
    direction<N>(x.w, x.g, x.sp, i, x.li, d);
    ld<N>(x.sp, i, sv);
#pragma unroll
    for (int j = 0; j < N; ++j) sv[j] += x.rc * d[j];
    st<N>(x.w, i, sv);
  }
};

}  // namespace

cudaError_t rsam_noise_launch(const void* row_plan, int64_t n_chunks, bool f64, uint64_t key, uint64_t offset,
                              double std_mult, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  if (f64) {
    rsam_noise_kernel<true><<<unsigned(n_chunks), kNoiseBlock, 0, stream>>>(row_plan, key, offset, std_mult);
  } else {
    rsam_noise_kernel<false><<<unsigned(n_chunks), kNoiseBlock, 0, stream>>>(row_plan, key, offset, std_mult);
  }
  return cudaGetLastError();
}

cudaError_t rsam_norm_launch(const void* plan, int64_t n_chunks, bool f64, double lam, const float* grad_scale,
                             double* partials, cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, RsamNorm{lam, grad_scale});
}

cudaError_t rsam_perturb_launch(const void* plan, int64_t n_chunks, bool f64, double lam, const float* grad_scale,
                                const double* coef, double rho_mult, cudaStream_t stream) {
  return launch_elementwise(plan, n_chunks, f64, stream, RsamPerturb{lam, grad_scale, coef, rho_mult});
}

}  // namespace saf::cuda
