// CUDA kernel of the fused trajectory loss (math: csrc/include/saf/trajectory_loss.h).
//
// TPR threads handle one row: a warp for rows up to 1024 classes, a block of 256 or 512
// threads above (512, not 1024, so that the kernel keeps 128 registers and does not spill). Pass 1 reads the row once with online softmax statistics per thread (one exp per
// softmax per element), merged across the row's threads; pass 2 re-reads the row (mostly from L2)
// and writes the gradient. Loads and stores are 4-wide when alignment allows.
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launchers.h"
#include "saf/cuda_utils.cuh"
#include "saf/trajectory_loss.h"

namespace saf::cuda {
namespace {

template <typename acc_t>
struct State {
  acc_t mz, s1, sz, sumz;  // logits: running max; sums of exp(z - mz), exp((z - mz)/T), z
  acc_t mt, st, w;         // target: running max; sums of exp((t - mt)/T), exp((t - mt)/T) (t - z)
  acc_t nonfinite;         // sum of (z - z) + (t - t): 0, or NaN if the row holds NaN or inf
};

template <typename acc_t>
__device__ __forceinline__ void state_init(State<acc_t>& s) {
  s.mz = s.mt = -INFINITY;
  s.s1 = s.sz = s.sumz = s.st = s.w = s.nonfinite = acc_t(0);
}

// Adds one element. Where the running max and the element are both -inf the difference is
// taken as 0: the contribution is wiped by the rescale once a finite maximum appears, and NaN
// (from NaN inputs) still propagates.
template <typename acc_t>
__device__ __forceinline__ void state_push(State<acc_t>& s, acc_t z, acc_t t, acc_t inv_t) {
  if (z > s.mz) {
    const acc_t r = s.mz - z;
    s.s1 = s.s1 * fast_exp(r) + acc_t(1);
    s.sz = s.sz * fast_exp(r * inv_t) + acc_t(1);
    s.mz = z;
  } else {
    const acc_t d = z == s.mz ? acc_t(0) : z - s.mz;
    s.s1 += fast_exp(d);
    s.sz += fast_exp(d * inv_t);
  }
  s.sumz += z;
  s.nonfinite += (z - z) + (t - t);
  if (t > s.mt) {
    const acc_t r = fast_exp((s.mt - t) * inv_t);
    s.st = s.st * r + acc_t(1);
    s.w = s.w * r + (t - z);
    s.mt = t;
  } else {
    const acc_t d = t == s.mt ? acc_t(0) : t - s.mt;
    const acc_t e = fast_exp(d * inv_t);
    s.st += e;
    s.w += e * (t - z);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t m, acc_t M, acc_t scale) {
  return m == M ? acc_t(1) : fast_exp((m - M) * scale);
}

template <typename acc_t>
__device__ __forceinline__ void state_merge(State<acc_t>& a, const State<acc_t>& b, acc_t inv_t) {
  const acc_t Mz = a.mz > b.mz ? a.mz : b.mz;
  const acc_t Mt = a.mt > b.mt ? a.mt : b.mt;
  const acc_t fa = rescale(a.mz, Mz, acc_t(1)), fb = rescale(b.mz, Mz, acc_t(1));
  const acc_t ga = rescale(a.mz, Mz, inv_t), gb = rescale(b.mz, Mz, inv_t);
  const acc_t ha = rescale(a.mt, Mt, inv_t), hb = rescale(b.mt, Mt, inv_t);
  a.s1 = a.s1 * fa + b.s1 * fb;
  a.sz = a.sz * ga + b.sz * gb;
  a.st = a.st * ha + b.st * hb;
  a.w = a.w * ha + b.w * hb;
  a.sumz += b.sumz;
  a.nonfinite += b.nonfinite;
  a.mz = Mz;
  a.mt = Mt;
}

template <typename acc_t, int WIDTH>
__device__ __forceinline__ void warp_allreduce(State<acc_t>& s, acc_t inv_t) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) {
    State<acc_t> o;
    o.mz = __shfl_xor_sync(0xffffffffu, s.mz, off, WIDTH);
    o.s1 = __shfl_xor_sync(0xffffffffu, s.s1, off, WIDTH);
    o.sz = __shfl_xor_sync(0xffffffffu, s.sz, off, WIDTH);
    o.sumz = __shfl_xor_sync(0xffffffffu, s.sumz, off, WIDTH);
    o.mt = __shfl_xor_sync(0xffffffffu, s.mt, off, WIDTH);
    o.st = __shfl_xor_sync(0xffffffffu, s.st, off, WIDTH);
    o.w = __shfl_xor_sync(0xffffffffu, s.w, off, WIDTH);
    o.nonfinite = __shfl_xor_sync(0xffffffffu, s.nonfinite, off, WIDTH);
    state_merge(s, o, inv_t);
  }
}

// All TPR threads of the row end with the row's merged state.
template <typename acc_t, int TPR>
__device__ __forceinline__ void row_allreduce(State<acc_t>& s, acc_t inv_t) {
  if constexpr (TPR <= 32) {
    warp_allreduce<acc_t, TPR>(s, inv_t);
  } else {
    constexpr int WARPS = TPR / 32;
    __shared__ State<acc_t> part[WARPS];
    warp_allreduce<acc_t, 32>(s, inv_t);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
      if (lane < WARPS) {
        s = part[lane];
      } else {
        state_init(s);
      }
      warp_allreduce<acc_t, 32>(s, inv_t);
      if (lane == 0) part[0] = s;
    }
    __syncthreads();
    s = part[0];
  }
}

template <typename zt, typename tt, typename acc_t, int TPR>
__global__ void __launch_bounds__(TPR <= 32 ? 256 : TPR)
    trajectory_loss_kernel(const TrajectoryArgs a, const bool vec4) {
  static_assert(TPR == 32 || (TPR % 32 == 0 && TPR <= 1024), "a warp, or whole warps of one row");
  constexpr int ROWS_PER_BLOCK = TPR <= 32 ? 256 / TPR : 1;
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / TPR;
  // Whole row groups exit together, so the block-wide barriers below stay uniform (TPR > 32
  // means one row per block).
  if (row >= a.rows) return;

  const int64_t C = a.cols;
  const acc_t scale = a.scale_dev ? *static_cast<const acc_t*>(a.scale_dev) : acc_t(1);
  const RowConsts<acc_t> k(a.p, C, scale);
  const bool with_ce = a.labels != nullptr;
  const zt* z = static_cast<const zt*>(a.logits) + row * a.logits_stride;
  const tt* t = static_cast<const tt*>(a.target) + row * a.target_stride;
  zt* g = a.grad ? static_cast<zt*>(a.grad) + row * a.grad_stride : nullptr;
  acc_t* row_loss = static_cast<acc_t*>(a.row_loss);

  int64_t y = -1;
  bool zero_row = false, bad_row = false;
  if (with_ce) {
    y = a.labels[row];
    zero_row = y == a.p.ignore_index;
    bad_row = !zero_row && (y < 0 || y >= C);
  }
  if (zero_row || bad_row) {
    const acc_t v = bad_row ? acc_t(NAN) : acc_t(0);
    if (lane == 0) row_loss[row] = v;
    if (g) {
      for (int64_t c = lane; c < C; c += TPR) g[c] = from_acc<zt>(v);
    }
    return;
  }

  State<acc_t> s;
  state_init(s);
  const acc_t inv_t = k.inv_t;
  int64_t c0 = 0;
  if (vec4) {
    const int64_t C4 = C / 4 * 4;
    for (int64_t c = int64_t(lane) * 4; c < C4; c += int64_t(TPR) * 4) {
      acc_t zv[4], tv[4];
      load4<acc_t>(z + c, zv);
      load4<acc_t>(t + c, tv);
#pragma unroll
      for (int j = 0; j < 4; ++j) state_push(s, zv[j], tv[j], inv_t);
    }
    c0 = C4;
  }
  for (int64_t c = c0 + lane; c < C; c += TPR) state_push(s, to_acc<acc_t>(z[c]), to_acc<acc_t>(t[c]), inv_t);
  row_allreduce<acc_t, TPR>(s, inv_t);

  RowStats<acc_t> r;
  r.mz = s.mz;
  r.mt = s.mt;
  r.s1 = s.s1;
  r.sz = s.sz;
  r.st = s.st;
  r.w = s.w;
  r.sumz = s.sumz;
  r.nonfinite = s.nonfinite;
  r.zy = with_ce ? to_acc<acc_t>(z[y]) : acc_t(0);
  if (lane == 0) row_loss[row] = row_loss_from_stats(r, k, with_ce, true, [](acc_t x) { return log(x); });
  if (!g) return;

  const GradCoefs<acc_t> gc = grad_coefs(r, k, with_ce, true);
  auto grad_at = [&](int64_t c, acc_t zc, acc_t tc) {
    const acc_t d = zc - r.mz;
    acc_t x = gc.k0 + gc.b * fast_exp(d * inv_t) - gc.d * fast_exp((tc - r.mt) * inv_t);
    if (with_ce) x += gc.a * fast_exp(d) - (c == y ? gc.hot : acc_t(0));
    return x;
  };
  if (vec4) {
    const int64_t C4 = C / 4 * 4;
    for (int64_t c = int64_t(lane) * 4; c < C4; c += int64_t(TPR) * 4) {
      acc_t zv[4], tv[4], gv[4];
      load4<acc_t>(z + c, zv);
      load4<acc_t>(t + c, tv);
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = grad_at(c + j, zv[j], tv[j]);
      store4(g + c, gv);
    }
  }
  for (int64_t c = c0 + lane; c < C; c += TPR) g[c] = from_acc<zt>(grad_at(c, to_acc<acc_t>(z[c]), to_acc<acc_t>(t[c])));
}

template <typename zt, typename tt, typename acc_t>
cudaError_t launch_typed(const TrajectoryArgs& a, cudaStream_t stream) {
  const bool vec4 = a.cols % 4 == 0 && a.logits_stride % 4 == 0 && a.target_stride % 4 == 0 &&
                    a.grad_stride % 4 == 0 && aligned_for4<zt>(a.logits) && aligned_for4<tt>(a.target) &&
                    (a.grad == nullptr || aligned_for4<zt>(a.grad));
  if (a.cols <= 1024) {
    constexpr int TPR = 32, ROWS = 256 / TPR;
    const unsigned blocks = unsigned((a.rows + ROWS - 1) / ROWS);
    trajectory_loss_kernel<zt, tt, acc_t, TPR><<<blocks, 256, 0, stream>>>(a, vec4);
  } else if (a.cols <= 16384) {
    trajectory_loss_kernel<zt, tt, acc_t, 256><<<unsigned(a.rows), 256, 0, stream>>>(a, vec4);
  } else {
    trajectory_loss_kernel<zt, tt, acc_t, 512><<<unsigned(a.rows), 512, 0, stream>>>(a, vec4);
  }
  return cudaGetLastError();
}

template <typename zt>
cudaError_t launch_for_logits(const TrajectoryArgs& a, cudaStream_t stream) {
  switch (a.target_dtype) {
    case DType::F32: return launch_typed<zt, float, float>(a, stream);
    case DType::F16: return launch_typed<zt, __half, float>(a, stream);
    case DType::BF16: return launch_typed<zt, __nv_bfloat16, float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// 1 / (number of labels != ignore_index), or 0 if there are none: the scale of the "mean"
// reduction, computed on the device so that no host synchronisation is needed.
template <typename acc_t>
__global__ void __launch_bounds__(256) inv_valid_count_kernel(const int64_t* labels, int64_t n, int64_t ignore_index,
                                                              acc_t* out) {
  __shared__ int64_t part[256];
  int64_t cnt = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) cnt += labels[i] != ignore_index;
  part[threadIdx.x] = cnt;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = part[0] > 0 ? acc_t(1) / acc_t(part[0]) : acc_t(0);
}

}  // namespace

cudaError_t inv_valid_count_launch(const int64_t* labels, int64_t n, int64_t ignore_index, void* out, bool f64,
                                   cudaStream_t stream) {
  if (f64) {
    inv_valid_count_kernel<double><<<1, 256, 0, stream>>>(labels, n, ignore_index, static_cast<double*>(out));
  } else {
    inv_valid_count_kernel<float><<<1, 256, 0, stream>>>(labels, n, ignore_index, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

cudaError_t trajectory_loss_launch(const TrajectoryArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.logits_dtype == DType::F64 || a.target_dtype == DType::F64) {
    if (a.logits_dtype != DType::F64 || a.target_dtype != DType::F64) return cudaErrorInvalidValue;
    return launch_typed<double, double, double>(a, stream);
  }
  switch (a.logits_dtype) {
    case DType::F32: return launch_for_logits<float>(a, stream);
    case DType::F16: return launch_for_logits<__half>(a, stream);
    case DType::BF16: return launch_for_logits<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace saf::cuda
