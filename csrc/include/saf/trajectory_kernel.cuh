// Device code of the fused trajectory-loss row (math: saf/trajectory_loss.h), shared by the
// trajectory-loss kernel (csrc/cuda/trajectory_loss.cu) and the SAF bank step
// (csrc/cuda/trajectory_bank.cu), which instantiates it with the bank extension.
//
// TPR threads handle one row. Pass 1 reads the row once with online softmax statistics per thread
// (one exp per softmax per element), merged across the row's threads; pass 2 re-reads the row
// (mostly from L2), sums the KL's per-element log-ratios (precision: saf/trajectory_loss.h) and
// writes the gradient. Loads and stores are 4-wide when alignment allows.
// Each element is read and written by the same thread in both passes, which is what lets the bank
// step overwrite the target row it has just read without a barrier.
//
// No torch headers: this compiles with plain nvcc wherever CUDA is installed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "saf/cuda_utils.cuh"
#include "saf/trajectory_loss.h"

namespace saf::cuda {
namespace detail {

// Pass 1's running statistics of one thread's elements (merged across the row's threads).
template <typename acc_t>
struct State {
  acc_t mz, s1, sz, sumz;  // logits: running max; sums of exp(z - mz), exp((z - mz)/T), z
  acc_t mt, st;            // target: running max; sum of exp((t - mt)/T)
  acc_t sy;                // probability targets: sum of y
  acc_t nonfinite;         // sum of (z - z) + (t - t) + (y - y), NaN for y < 0: 0, or NaN
};

template <typename acc_t>
__device__ __forceinline__ void state_init(State<acc_t>& s) {
  s.mz = s.mt = -INFINITY;
  s.s1 = s.sz = s.sumz = s.st = s.sy = s.nonfinite = acc_t(0);
}

// Adds one element. Where the running max and the element are both -inf the difference is
// taken as 0: the contribution is wiped by the rescale once a finite maximum appears, and NaN
// (from NaN inputs) still propagates. y is 0 without probability targets.
template <typename acc_t>
__device__ __forceinline__ void state_push(State<acc_t>& s, acc_t z, acc_t t, acc_t y, acc_t inv_t) {
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
  s.sy += y;
  s.nonfinite += (z - z) + (t - t) + (y - y) + (y < acc_t(0) ? acc_t(NAN) : acc_t(0));
  if (t > s.mt) {
    s.st = s.st * fast_exp((s.mt - t) * inv_t) + acc_t(1);
    s.mt = t;
  } else {
    const acc_t d = t == s.mt ? acc_t(0) : t - s.mt;
    s.st += fast_exp(d * inv_t);
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
  a.sumz += b.sumz;
  a.sy += b.sy;
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
    o.sy = __shfl_xor_sync(0xffffffffu, s.sy, off, WIDTH);
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

// Sums of N values over the row's TPR threads, in the same order on every thread (pass 2's KL
// sums and the soft cross-entropy's sum of y (z - mz)).
template <typename acc_t, int TPR, int N>
__device__ __forceinline__ void row_sums(acc_t (&v)[N]) {
  constexpr int WIDTH = TPR <= 32 ? TPR : 32;
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] += __shfl_xor_sync(0xffffffffu, v[j], off, WIDTH);
  }
  if constexpr (TPR > 32) {
    constexpr int WARPS = TPR / 32;
    __shared__ acc_t part[N][WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) part[j][warp] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = acc_t(0);
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v[j] += part[j][w];
    }
  }
}

// Rounds a logit to the bank's storage type as Tensor.to() does (float64 through float32).
template <typename tt, typename zt>
__device__ __forceinline__ tt to_storage(zt x) {
  return from_acc<tt>(to_acc<float>(x));
}

// Element i of probability targets of a run-time dtype (the branch is uniform across the grid).
template <typename acc_t>
__device__ __forceinline__ acc_t load_prob(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return acc_t(static_cast<const float*>(p)[i]);
    case DType::F16: return to_acc<acc_t>(static_cast<const __half*>(p)[i]);
    case DType::BF16: return to_acc<acc_t>(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return acc_t(static_cast<const double*>(p)[i]);
  }
}

// Elements i .. i + 3 (one branch per 4 elements; scalar loads: the targets' rows need not be
// aligned like the logits').
template <typename acc_t>
__device__ __forceinline__ void load_prob4(const void* p, DType dt, int64_t i, acc_t out[4]) {
  switch (dt) {
    case DType::F32:
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = acc_t(static_cast<const float*>(p)[i + j]);
      break;
    case DType::F16:
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = to_acc<acc_t>(static_cast<const __half*>(p)[i + j]);
      break;
    case DType::BF16:
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = to_acc<acc_t>(static_cast<const __nv_bfloat16*>(p)[i + j]);
      break;
    default:
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = acc_t(static_cast<const double*>(p)[i + j]);
  }
}

// One row: row loss (lane 0 writes it) and, if a.grad, the gradient. With BANK the target row is
// gathered (a.target_index), read only for rows whose mode has kRowKL, and overwritten with the
// logits when the mode has kRowRecord; the CE and KL terms have separate device scales.
// Pass 1 reads z, t (and y) for the softmax statistics; pass 2 re-reads them for the KL's
// per-element log-ratios, the soft cross-entropy's sum and the gradient, and records.
// Row-uniform early returns only: for TPR > 32 the caller guarantees one row per block.
template <typename zt, typename tt, typename acc_t, int TPR, bool BANK>
__device__ __forceinline__ void trajectory_row(const TrajectoryArgs& a, const int64_t row, const int lane,
                                               const bool vec4) {
  const int64_t C = a.cols;
  const RowConsts<acc_t> k =
      BANK ? RowConsts<acc_t>(a.p, C, *static_cast<const acc_t*>(a.scale_dev),
                              *static_cast<const acc_t*>(a.kl_scale_dev))
           : RowConsts<acc_t>(a.p, C, a.scale_dev ? *static_cast<const acc_t*>(a.scale_dev) : acc_t(1));
  const CeKind ce_kind = a.labels ? CeKind::Label : (a.soft ? CeKind::Soft : CeKind::None);
  const bool soft = ce_kind == CeKind::Soft;
  const bool with_ce = ce_kind != CeKind::None;
  const uint8_t mode = BANK ? a.row_mode[row] : uint8_t(kRowKL);
  const bool with_kl = mode & kRowKL;
  const bool rec = BANK && (mode & kRowRecord);
  const zt* z = static_cast<const zt*>(a.logits) + row * a.logits_stride;
  tt* t = nullptr;
  if (mode & (kRowKL | kRowRecord)) {
    const int64_t trow = BANK ? a.target_index[row] : row;
    t = static_cast<tt*>(const_cast<void*>(a.target)) + trow * a.target_stride;
  }
  const void* yrow = nullptr;
  if (soft) {
    yrow = static_cast<const char*>(a.soft) + row * a.soft_stride * dtype_size(a.soft_dtype);
  }
  zt* g = a.grad ? static_cast<zt*>(a.grad) + row * a.grad_stride : nullptr;
  acc_t* row_loss = static_cast<acc_t*>(a.row_loss);
  auto record_row = [&]() {
    for (int64_t c = lane; c < C; c += TPR) t[c] = to_storage<tt>(z[c]);
  };

  int64_t y = -1;
  bool zero_row = !with_ce && !with_kl, bad_row = false;  // in neither term: not read
  if (ce_kind == CeKind::Label) {
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
    if (rec) record_row();
    return;
  }

  // Rows without a target (bank rows with no past entry) push zeros: finite, and weighted 0.
  State<acc_t> s;
  state_init(s);
  const acc_t inv_t = k.inv_t;
  int64_t c0 = 0;
  if (vec4) {
    const int64_t C4 = C / 4 * 4;
    for (int64_t c = int64_t(lane) * 4; c < C4; c += int64_t(TPR) * 4) {
      acc_t zv[4], tv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      acc_t yv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      load4<acc_t>(z + c, zv);
      if (with_kl) load4<acc_t>(t + c, tv);
      if (soft) load_prob4<acc_t>(yrow, a.soft_dtype, c, yv);
#pragma unroll
      for (int j = 0; j < 4; ++j) state_push(s, zv[j], tv[j], yv[j], inv_t);
    }
    c0 = C4;
  }
  for (int64_t c = c0 + lane; c < C; c += TPR) {
    state_push(s, to_acc<acc_t>(z[c]), with_kl ? to_acc<acc_t>(t[c]) : acc_t(0),
               soft ? load_prob<acc_t>(yrow, a.soft_dtype, c) : acc_t(0), inv_t);
  }
  row_allreduce<acc_t, TPR>(s, inv_t);

  RowStats<acc_t> r;
  r.mz = s.mz;
  r.mt = s.mt;
  r.s1 = s.s1;
  r.sz = s.sz;
  r.st = s.st;
  r.sumz = s.sumz;
  r.sy = s.sy;
  r.nonfinite = s.nonfinite;
  r.zy = ce_kind == CeKind::Label ? to_acc<acc_t>(z[y]) : acc_t(0);
  const GradCoefs<acc_t> gc = grad_coefs(r, k, ce_kind, with_kl);

  // Pass 2: per element, the KL's log-ratio terms, y (z - mz), the gradient; then the record.
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // w, ds, syd
  auto element = [&](int64_t c, acc_t zc, acc_t tc, acc_t yc) {
    const acc_t d = zc - r.mz;
    const acc_t et = fast_exp((tc - r.mt) * inv_t);
    const acc_t ez = fast_exp(d * inv_t);
    if (with_kl) {
      const acc_t x = (tc - r.mt) - d;
      sums[0] += et * x;
      sums[1] += kl_exp_diff(ez, et, -x * inv_t);
    }
    if (soft) sums[2] += yc * d;
    acc_t x = gc.k0 + gc.b * ez - gc.d * et;
    if (with_ce) x += gc.a * fast_exp(d) - (c == y ? gc.hot : acc_t(0)) - gc.ys * yc;
    return x;
  };
  if (with_kl || soft || g) {
    if (vec4) {
      const int64_t C4 = C / 4 * 4;
      for (int64_t c = int64_t(lane) * 4; c < C4; c += int64_t(TPR) * 4) {
        acc_t zv[4], tv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        acc_t yv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, gv[4];
        load4<acc_t>(z + c, zv);
        if (with_kl) load4<acc_t>(t + c, tv);
        if (soft) load_prob4<acc_t>(yrow, a.soft_dtype, c, yv);
#pragma unroll
        for (int j = 0; j < 4; ++j) gv[j] = element(c + j, zv[j], tv[j], yv[j]);
        if (g) store4(g + c, gv);
        if (rec) store4(t + c, zv);  // after this thread's reads of the same elements
      }
    }
    for (int64_t c = c0 + lane; c < C; c += TPR) {
      const acc_t zc = to_acc<acc_t>(z[c]);
      const acc_t x = element(c, zc, with_kl ? to_acc<acc_t>(t[c]) : acc_t(0),
                              soft ? load_prob<acc_t>(yrow, a.soft_dtype, c) : acc_t(0));
      if (g) g[c] = from_acc<zt>(x);
      if (rec) t[c] = to_storage<tt>(z[c]);
    }
  } else if (rec) {
    record_row();
  }
  row_sums<acc_t, TPR, 3>(sums);
  r.w = sums[0];
  r.ds = sums[1];
  r.syd = sums[2];
  if (lane == 0) {
    row_loss[row] = row_loss_from_stats(r, k, ce_kind, with_kl, [](acc_t x) { return log(x); },
                                        [](acc_t x) { return log1p(x); });
  }
}

}  // namespace detail
}  // namespace saf::cuda
