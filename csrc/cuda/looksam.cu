// CUDA kernels of LookSAM (math: csrc/include/saf/multi_tensor.h, namespace looksam,
// looksam_gv_coef, looksam_combine_coef). The plans lie in GSAM's slots (csrc/mt_plan.h), so
// GSAM's partial sums, SAM's norm and GSAM's combine pass serve as they are; this file holds what
// is LookSAM's own: the finalizes and the pass that writes gv.
//
// looksam_gv_ = 4 launches whatever the number of tensors: gsam_dots (partials of <g, g_s>, |g|^2,
// |g_s|^2), a one-block finalize (c, whether it applies, the stats), one pass writing gv = g_s - c g
// and the partials of |gv|^2 of the stored values, a one-block finalize (gv_norm).
// looksam_combine_ = 3 launches: sam_norm (partials of |g|^2), a one-block finalize (GSAM's
// coefficients 1, coef, applies; |g|), gsam_combine (g += coef gv). No host synchronisation.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include "cuda/mt_launchers.h"
#include "saf/multi_tensor.cuh"

namespace saf::cuda {
namespace {

using namespace saf::cuda::mt;
namespace L = saf::mt::looksam;

__global__ void __launch_bounds__(kFinalizeThreads)
    looksam_gv_coef_kernel(const double* partials, int64_t n, double eps, double* coefs, void* stats, bool stats_f64) {
  const double dot = sum_partials(partials, n);
  const double gg = sum_partials(partials + n, n);
  const double ss = sum_partials(partials + 2 * n, n);
  if (threadIdx.x == 0) {
    const saf::mt::LookSamGvCoef r = saf::mt::looksam_gv_coef(dot, gg, ss, eps);
    coefs[0] = r.c;
    coefs[1] = r.ok ? 1.0 : 0.0;
    store_scalar(stats, acc_code(stats_f64), 0, r.cos);
    store_scalar(stats, acc_code(stats_f64), 1, r.norm_old);
    store_scalar(stats, acc_code(stats_f64), 2, r.norm_new);
  }
}

// gv = g_s - c g where c applies (a block-uniform flag: else nothing is read or written), with
// the sum of squares of gv as stored.
struct LookSamGv {
  static constexpr int kDtype = L::GV, kSums = 1;
  const double* coefs;
  template <typename T>
  struct Ctx {
    T* v;
    const T* gs;
    const T* g;
    opmath_t<T> c;
    bool ok;
  };
  template <typename T>
  __device__ __forceinline__ Ctx<T> chunk(const ChunkRef& c) const {
    return {stream_ptr<T>(c.t, L::GV, c.start), stream_ptr<T>(c.t, L::GS, c.start), stream_ptr<T>(c.t, L::G, c.start),
            opmath_t<T>(coefs[0]), coefs[1] != 0.0};
  }
  template <int N, typename T, typename acc_t>
  __device__ __forceinline__ void term(const Ctx<T>& x, int64_t i, acc_t (&a)[1]) const {
    if (!x.ok) return;
    acc_t s[N], g[N];
    ld<N>(x.gs, i, s);
    ld<N>(x.g, i, g);
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = s[j] - x.c * g[j];
    st<N>(x.v, i, s);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t r = as_stored<T>(s[j]);
      a[0] += r * r;
    }
  }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    looksam_norm_kernel(const double* partials, int64_t n, const double* coefs, void* gv_norm, bool norm_f64) {
  const double vv = sum_partials(partials, n);
  if (threadIdx.x == 0 && coefs[1] != 0.0) store_scalar(gv_norm, acc_code(norm_f64), 0, sqrt(vv));
}

__global__ void __launch_bounds__(kFinalizeThreads)
    looksam_combine_coef_kernel(const double* partials, int64_t n, const void* gv_norm, bool norm_f64, double alpha,
                                double eps, double* coefs, void* norm_out, bool out_f64) {
  const double gg = sum_partials(partials, n);
  if (threadIdx.x == 0) {
    const saf::mt::LookSamCombineCoef r =
        saf::mt::looksam_combine_coef(gg, load_scalar(gv_norm, acc_code(norm_f64)), alpha, eps);
    coefs[0] = 1.0;  // GSAM's c_new, c_old, apply: g = 1 g + coef gv
    coefs[1] = r.coef;
    coefs[2] = r.ok ? 1.0 : 0.0;
    store_scalar(norm_out, acc_code(out_f64), 0, r.norm);
  }
}

}  // namespace

cudaError_t looksam_gv_coef_launch(const double* partials, int64_t n_chunks, double eps, double* coefs, void* stats,
                                   bool stats_f64, cudaStream_t stream) {
  looksam_gv_coef_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, eps, coefs, stats, stats_f64);
  return cudaGetLastError();
}

cudaError_t looksam_gv_launch(const void* plan, int64_t n_chunks, bool f64, const double* coefs, double* partials,
                              cudaStream_t stream) {
  return launch_partials(plan, n_chunks, f64, partials, stream, LookSamGv{coefs});
}

cudaError_t looksam_norm_launch(const double* partials, int64_t n_chunks, const double* coefs, void* gv_norm,
                                bool norm_f64, cudaStream_t stream) {
  looksam_norm_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, coefs, gv_norm, norm_f64);
  return cudaGetLastError();
}

cudaError_t looksam_combine_coef_launch(const double* partials, int64_t n_chunks, const void* gv_norm, bool norm_f64,
                                        double alpha, double eps, double* coefs, void* norm_out, bool out_f64,
                                        cudaStream_t stream) {
  looksam_combine_coef_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_chunks, gv_norm, norm_f64, alpha, eps,
                                                                  coefs, norm_out, out_f64);
  return cudaGetLastError();
}

}  // namespace saf::cuda
