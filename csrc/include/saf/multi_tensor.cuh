// Device side of the multi-tensor machinery (plan layout: saf/multi_tensor.h).
//
// The plan (tensor addresses, sizes, dtypes, per-tensor scalars, chunk -> tensor map) lives in
// device memory, so a launch covers any number of tensors: grid = one block per chunk. Unlike
// apex / ATen's multi_tensor_apply, which pass the tensor list by value in the kernel arguments
// (4 KB or 32 KB: 110-770 tensors, 320-2240 blocks per launch), the launch count here does not
// grow with the model: a SAM first step is 3 launches (norm partials, finalize, perturb) for
// ResNet-18 as for a 1B-parameter model.
//
// Dtypes are per tensor and dispatched per block (a block-uniform branch), so float32 and
// bfloat16 parameters share one launch. Reductions write one partial per chunk (no atomics) and
// a one-block finalize sums them in a fixed order: the result is deterministic.
//
// The scaffolding is written once here, apex's functor pattern: a method's .cu file defines
// element functors and instantiates two kernel templates with them.
//   * elementwise_kernel<F64, Op> / launch_elementwise: one pass over every chunk. Op provides
//       static constexpr int kDtype;                 // the stream whose dtype picks T
//       template <typename T> Ctx chunk(const ChunkRef&) const;  // once per block: pointers,
//                                                     // per-tensor values (opmath_t<T>)
//       template <int N, class Ctx> void elem(const Ctx&, int64_t i) const;  // N = 4 or 1 elements
//     and, where a block-uniform condition replaces the whole pass (a zero coefficient:
//     "perturb nothing"), kSkippable, Ctx::skip and skip_elem<N>(ctx, i): a loop of its own,
//     so that the skipped path costs the main loop no registers;
//   * partials_kernel<F64, Op> / launch_partials: the partial-sum stage of a reduction, Op::kSums
//     sums per chunk written to partials[j * n_chunks + chunk] (a separate stage: a collective
//     may reduce the partials before the finalize, a one-block kernel using sum_partials). Op
//     provides kDtype, chunk<T> as above and
//       template <int N, class Ctx, typename acc_t> void term(const Ctx&, int64_t i, acc_t (&a)[kSums]) const;
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "saf/cuda_utils.cuh"
#include "saf/multi_tensor.h"

namespace saf::cuda::mt {

using saf::mt::ChunkEntry;
using saf::mt::Header;
using saf::mt::TensorEntry;

constexpr int kBlock = 512;           // threads per block (one block per chunk)
constexpr int64_t kChunk = 65536;     // elements per chunk: 32 per thread, 4-wide
constexpr int kFinalizeThreads = 256;

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// The accumulation type of a per-block context Ctx<T> (what a functor's chunk<T>() returns).
template <class C>
struct AccOf;
template <template <typename> class Ctx, typename T>
struct AccOf<Ctx<T>> {
  using type = opmath_t<T>;
};
template <class C>
using acc_of = typename AccOf<C>::type;

struct PlanView {
  const TensorEntry* tensors;
  const ChunkEntry* chunks;
  int64_t n_chunks;
  int64_t chunk_size;
};

__device__ __forceinline__ PlanView plan_view(const void* plan) {
  const auto* base = static_cast<const uint8_t*>(plan);
  const auto* h = reinterpret_cast<const Header*>(base);
  PlanView v;
  v.tensors = reinterpret_cast<const TensorEntry*>(base + h->tensors_offset);
  v.chunks = reinterpret_cast<const ChunkEntry*>(base + h->chunks_offset);
  v.n_chunks = h->n_chunks;
  v.chunk_size = h->chunk_size;
  return v;
}

// The block's chunk: its tensor entry (read through L1, never copied to registers), first
// element and length.
struct ChunkRef {
  const TensorEntry* t;
  int64_t start;
  int64_t n;
};

__device__ __forceinline__ ChunkRef chunk_ref(const PlanView& v, int64_t c) {
  const ChunkEntry ce = v.chunks[c];
  ChunkRef r;
  r.t = v.tensors + ce.tensor;
  r.start = int64_t(ce.chunk) * v.chunk_size;
  const int64_t rest = r.t->numel - r.start;
  r.n = rest < v.chunk_size ? rest : v.chunk_size;
  return r;
}

// Pointer to element `start` of stream s, as T.
template <typename T>
__device__ __forceinline__ T* stream_ptr(const TensorEntry* t, int s, int64_t start) {
  return static_cast<T*>(t->ptr[s]) + start;
}

// N = 4: a 4-wide access (the caller checked alignment); N = 1: scalar.
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void ld(const T* p, int64_t i, acc_t (&v)[N]) {
  if constexpr (N == 4) {
    load4<acc_t>(p + i, v);
  } else {
    v[0] = to_acc<acc_t>(p[i]);
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void st(T* p, int64_t i, const acc_t (&v)[N]) {
  if constexpr (N == 4) {
    store4(p + i, v);
  } else {
    p[i] = from_acc<T>(v[0]);
  }
}

// Loads and stores whose element type is only known at run time (the stash of delta mode, the
// model stream of the EMA): a block-uniform switch instead of one instantiation per dtype pair.
template <int N, typename acc_t>
__device__ __forceinline__ void ld_any(const void* p, int32_t dtype, int64_t i, acc_t (&v)[N]) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: ld<N>(static_cast<const float*>(p), i, v); break;
    case DType::F16: ld<N>(static_cast<const __half*>(p), i, v); break;
    case DType::BF16: ld<N>(static_cast<const __nv_bfloat16*>(p), i, v); break;
    default: ld<N>(static_cast<const double*>(p), i, v); break;
  }
}

template <int N, typename acc_t>
__device__ __forceinline__ void st_any(void* p, int32_t dtype, int64_t i, const acc_t (&v)[N]) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: st<N>(static_cast<float*>(p), i, v); break;
    case DType::F16: st<N>(static_cast<__half*>(p), i, v); break;
    case DType::BF16: st<N>(static_cast<__nv_bfloat16*>(p), i, v); break;
    default: st<N>(static_cast<double*>(p), i, v); break;
  }
}

// Raw copy of N elements of T (bit exact, NaN payloads included).
template <int N, typename T>
__device__ __forceinline__ void copy_raw(T* dst, const T* src, int64_t i) {
  if constexpr (N == 4) {
    *reinterpret_cast<Pack4<T>*>(dst + i) = *reinterpret_cast<const Pack4<T>*>(src + i);
  } else {
    dst[i] = src[i];
  }
}

// N raw elements of T (one 4-wide load or a scalar), and their values in acc_t: the weights are
// read once, stashed bit for bit and used for the arithmetic.
template <int N, typename T>
struct Raw {
  T v[N];
};

template <int N, typename T, typename acc_t>
__device__ __forceinline__ Raw<N, T> ld_raw(const T* p, int64_t i, acc_t (&out)[N]) {
  Raw<N, T> r;
  if constexpr (N == 4) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < 4; ++j) r.v[j] = pk.v[j];
  } else {
    r.v[0] = p[i];
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_acc<acc_t>(r.v[j]);
  return r;
}

template <int N, typename T>
__device__ __forceinline__ void st_raw(T* p, int64_t i, const Raw<N, T>& r) {
  if constexpr (N == 4) {
    Pack4<T> pk;
#pragma unroll
    for (int j = 0; j < 4; ++j) pk.v[j] = r.v[j];
    *reinterpret_cast<Pack4<T>*>(p + i) = pk;
  } else {
    p[i] = r.v[0];
  }
}

// Runs body(std::integral_constant<int, N>, i) over the block's n elements: 4-wide where every
// stream is aligned for it (plan flag), then scalar for the tail.
template <typename Body>
__device__ __forceinline__ void chunk_loop(int64_t n, bool aligned, Body&& body) {
  int64_t i0 = 0;
  if (aligned) {
    const int64_t n4 = n / 4 * 4;
#pragma unroll 2
    for (int64_t i = int64_t(threadIdx.x) * 4; i < n4; i += int64_t(blockDim.x) * 4) {
      body(std::integral_constant<int, 4>{}, i);
    }
    i0 = n4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) body(std::integral_constant<int, 1>{}, i);
}

__device__ __forceinline__ bool is_aligned(const TensorEntry* t) { return (t->flags & saf::mt::kAligned) != 0; }

// Calls f(T()) with T the C++ type of dtype code dt. Kernels are instantiated twice: with F64
// (float64 tensors, used by tests) and without, so that the float64 branch's registers do not
// lower the occupancy of the kernels that real training runs.
template <bool F64, typename F>
__device__ __forceinline__ void dispatch_dtype(int32_t dt, F&& f) {
  switch (static_cast<DType>(dt)) {
    case DType::F32: f(float(0)); break;
    case DType::F16: f(__half(0.0f)); break;
    case DType::BF16: f(__nv_bfloat16(0.0f)); break;
    default:
      if constexpr (F64) f(double(0));
      break;
  }
}

// Sum of n partials by one block of kFinalizeThreads threads in a fixed order (strided per
// thread, then a tree); valid in thread 0. Calls may follow each other without a barrier: the
// leading one keeps this call's writes off part[] until every thread is past the previous call.
__device__ __forceinline__ double sum_partials(const double* partials, int64_t n) {
  __shared__ double part[kFinalizeThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
  __syncthreads();
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kFinalizeThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  return part[0];
}

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

// Element `start` of stream s, whatever its dtype (the stash of delta mode, the EMA's model).
__device__ __forceinline__ char* stream_bytes(const TensorEntry* t, int s, int64_t start) {
  return static_cast<char*>(t->ptr[s]) + start * dtype_size(static_cast<DType>(t->dtype[s]));
}

// The restored weights of N elements (copy mode: the stash; delta mode: w - stash).
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_restored(const T* w, const void* stash, int32_t sdt, int64_t mode, int64_t i,
                                              acc_t (&out)[N]) {
  if (mode == saf::mt::sam::COPY) {
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
  if (mode == saf::mt::sam::COPY) {
    copy_raw<N>(w, static_cast<const T*>(stash), i);
  } else {
    st<N>(w, i, v);
  }
}

// A one-element tensor of any float dtype dt (LookSAM's gv_norm, Momentum-SAM's inv_norm, the
// norms and stats the finalize kernels return), read or written in double.
__device__ __forceinline__ double load_scalar(const void* p, int32_t dt) {
  double v[1];
  ld_any<1>(p, dt, 0, v);
  return v[0];
}
__device__ __forceinline__ void store_scalar(void* p, int32_t dt, int64_t i, double x) {
  const double v[1] = {x};
  st_any<1>(p, dt, i, v);
}
__device__ __forceinline__ int32_t acc_code(bool f64) { return int32_t(f64 ? DType::F64 : DType::F32); }

// x rounded to T and widened back: the value a store of x to a T stream leaves in memory.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t as_stored(acc_t x) {
  return to_acc<acc_t>(from_acc<T>(x));
}

// GradScaler's device scalars, read once per block: 1 / scale (1 without AMP), found_inf set.
__device__ __forceinline__ double inv_scale_of(const float* grad_scale) {
  return grad_scale ? 1.0 / double(*grad_scale) : 1.0;
}
__device__ __forceinline__ bool found_inf_of(const float* found_inf) { return found_inf != nullptr && *found_inf > 0.0f; }

// ---- pieces shared by the SAM family's passes (sam.cu, esam.cu, gsam.cu) ----

// The per-block context of a perturbation pass (SAM, ESAM; streams in sam's slots): rc is the
// element coefficient (rho coef, or rho / beta coef), skip "perturb nothing" (coef == 0).
template <typename T>
struct PerturbCtx {
  T* w;
  const T* g;
  void* stash;  // copy mode: same dtype as w (checked on the host)
  int32_t sdt;
  bool skip;
  bool adaptive;
  opmath_t<T> rc, eta;
};

template <typename T>
__device__ __forceinline__ PerturbCtx<T> perturb_ctx(const ChunkRef& c, double coef, double rc) {
  namespace S = saf::mt::sam;
  return {stream_ptr<T>(c.t, S::W, c.start), stream_ptr<T>(c.t, S::G, c.start), stream_bytes(c.t, S::STASH, c.start),
          c.t->dtype[S::STASH], coef == 0.0, (c.t->flags & S::kAdaptive) != 0, opmath_t<T>(rc),
          opmath_t<T>(c.t->param[S::ETA])};
}

// "Perturb nothing": the stash still serves the restore (copy mode: w's bits; delta: zeros).
template <int N, typename T>
__device__ __forceinline__ void stash_unperturbed(const PerturbCtx<T>& x, int64_t mode, int64_t i) {
  if (mode == saf::mt::sam::COPY) {
    copy_raw<N>(static_cast<T*>(x.stash), x.w, i);
  } else {
    opmath_t<T> z[N];
#pragma unroll
    for (int j = 0; j < N; ++j) z[j] = 0;
    st_any<N>(x.stash, x.sdt, i, z);
  }
}

// Delta mode: e into the stash, and e rounded as the stash holds it (the perturbation adds
// exactly what the restore subtracts).
template <int N, typename acc_t>
__device__ __forceinline__ void stash_delta(void* stash, int32_t sdt, int64_t i, acc_t (&e)[N]) {
  st_any<N>(stash, sdt, i, e);
#pragma unroll
  for (int j = 0; j < N; ++j) e[j] = round_to(e[j], sdt);
}

// The first half of a fused restore + optimizer step: the restored weights of N elements in wv;
// when skip (found_inf set), they are written back (the restore alone) and it returns true.
template <int N, typename T, typename acc_t>
__device__ __forceinline__ bool restored_or_skip(T* w, const void* stash, int32_t sdt, int64_t mode, bool skip,
                                                 int64_t i, acc_t (&wv)[N]) {
  load_restored<N>(w, stash, sdt, mode, i, wv);
  if (skip) store_restored<N>(w, stash, mode, i, wv);
  return skip;
}

// The inputs of a fused step's element (StepCtx and GSAM's CombineCtx): the restored weights and
// the gradient; false (nothing more to do) when the step is skipped, the restore written.
template <int N, class C, typename acc_t>
__device__ __forceinline__ bool step_inputs(const C& x, int64_t mode, bool skip, int64_t i, acc_t (&wv)[N],
                                            acc_t (&gv)[N]) {
  if (restored_or_skip<N>(x.w, x.stash, x.sdt, mode, skip, i, wv)) return false;
  ld<N>(x.g, i, gv);
  return true;
}

// The per-block context of a restore pass (SAM, ESAM's delta mode; sam's slots W and STASH).
template <typename T>
struct RestoreCtx {
  T* w;
  const void* stash;
  int32_t sdt;
};

template <typename T>
__device__ __forceinline__ RestoreCtx<T> restore_ctx(const ChunkRef& c) {
  namespace S = saf::mt::sam;
  return {stream_ptr<T>(c.t, S::W, c.start), stream_bytes(c.t, S::STASH, c.start), c.t->dtype[S::STASH]};
}

// The per-block context of a SAM / ESAM norm pass: sum over the chunk of (T g)^2 (T = |w| + eta
// where adaptive, else 1); x_j receives the scaled gradients of N elements.
template <typename T>
struct NormCtx {
  const T* g;
  const T* w;
  opmath_t<T> eta;
  bool adaptive;
  template <int N>
  __device__ __forceinline__ void scaled_grads(int64_t i, opmath_t<T> (&x)[N]) const {
    opmath_t<T> wv[N];
    ld<N>(g, i, x);
    if (adaptive) {  // plain SAM never reads the weights here
      ld<N>(w, i, wv);
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] = x[j] * saf::mt::asam_t(wv[j], eta, true);
    }
  }
};

template <typename T>
__device__ __forceinline__ NormCtx<T> norm_ctx(const ChunkRef& c) {
  namespace S = saf::mt::sam;
  return {stream_ptr<T>(c.t, S::G, c.start), stream_ptr<T>(c.t, S::W, c.start), opmath_t<T>(c.t->param[S::ETA]),
          (c.t->flags & S::kAdaptive) != 0};
}

// What a SAM / ESAM perturbation functor shares: its dtype stream, the coefficient from the
// finalize (coef_dev), the stash mode, and the "perturb nothing" pass.
struct PerturbBase {
  static constexpr int kDtype = saf::mt::sam::W;
  static constexpr bool kSkippable = true;
  const double* coef_dev;
  int64_t mode;
  template <int N, class C>
  __device__ __forceinline__ void skip_elem(const C& x, int64_t i) const {
    stash_unperturbed<N>(x, mode, i);
  }
};

// The per-block context of a fused restore + optimizer step (streams in sam's slots W, G,
// STASH): skip when found_inf is set, inv = 1 / grad_scale.
template <typename T>
struct StepCtx {
  T* w;
  const T* g;
  const void* stash;
  int32_t sdt;
  bool skip;
  opmath_t<T> inv;
};

// What a SAM fused restore + step functor shares (SGD, AdamW): the stash mode, GradScaler's
// device scalars, and the StepCtx part of its per-block context.
struct StepBase {
  static constexpr int kDtype = saf::mt::sam::W;
  int64_t mode;
  const float* grad_scale;
  const float* found_inf;
  template <typename T>
  __device__ __forceinline__ StepCtx<T> step_ctx(const ChunkRef& c) const {
    namespace S = saf::mt::sam;
    return {stream_ptr<T>(c.t, S::W, c.start),   stream_ptr<T>(c.t, S::G, c.start),
            stream_bytes(c.t, S::STASH, c.start), c.t->dtype[S::STASH],
            found_inf_of(found_inf),              opmath_t<T>(inv_scale_of(grad_scale))};
  }
};

// torch.optim.SGD's per-tensor hyper-parameters and flags (sgd's slots) and one element's update
// (saf/multi_tensor.h's sgd_step): SAM's and GSAM's fused restore + SGD.
template <typename acc_t>
struct SgdParams {
  bool nesterov, maximize, first;
  acc_t lr, wd, mom, damp;
  // w (the restored weights of N elements) updated with the gradient g; the momentum buffer buf
  // (same dtype as w, checked on the host) read unless this is its first step, written if used.
  template <int N, typename T>
  __device__ __forceinline__ void step(T* buf, int64_t i, acc_t (&w)[N], const acc_t (&g)[N]) const {
    acc_t b[N];
    if (mom != acc_t(0) && !first) ld<N>(buf, i, b);
#pragma unroll
    for (int j = 0; j < N; ++j) w[j] = saf::mt::sgd_step(w[j], g[j], b[j], lr, wd, mom, damp, nesterov, maximize, first);
    if (mom != acc_t(0)) st<N>(buf, i, b);
  }
};

template <typename acc_t>
__device__ __forceinline__ SgdParams<acc_t> sgd_params(const TensorEntry* t) {
  namespace SG = saf::mt::sgd;
  return {(t->flags & SG::kNesterov) != 0,   (t->flags & SG::kMaximize) != 0,  (t->flags & SG::kFirstRun) != 0,
          acc_t(t->param[SG::LR]),          acc_t(t->param[SG::WD]),          acc_t(t->param[SG::MOMENTUM]),
          acc_t(t->param[SG::DAMPENING])};
}

// ---- the two kernel templates (see the top of this file) ----

template <class Op, class = void>
struct is_skippable : std::false_type {};
template <class Op>
struct is_skippable<Op, std::enable_if_t<Op::kSkippable>> : std::true_type {};

// The functor is a __grid_constant__ parameter: its members are read from the parameter space,
// as a hand-written kernel's scalar arguments would be, never copied to registers or local memory.
template <bool F64, class Op>
__global__ void __launch_bounds__(kBlock) elementwise_kernel(const void* plan, const __grid_constant__ Op op) {
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  dispatch_dtype<F64>(c.t->dtype[Op::kDtype], [&](auto zero) {
    using T = decltype(zero);
    const auto ctx = op.template chunk<T>(c);
    if constexpr (is_skippable<Op>::value) {
      if (ctx.skip) {
        chunk_loop(c.n, is_aligned(c.t),
                   [&](auto width, int64_t i) { op.template skip_elem<decltype(width)::value>(ctx, i); });
        return;
      }
    }
    chunk_loop(c.n, is_aligned(c.t), [&](auto width, int64_t i) { op.template elem<decltype(width)::value>(ctx, i); });
  });
}

template <bool F64, class Op>
__global__ void __launch_bounds__(kBlock)
    partials_kernel(const void* plan, int64_t n_chunks, double* partials, const __grid_constant__ Op op) {
  constexpr int K = Op::kSums;
  const ChunkRef c = chunk_ref(plan_view(plan), blockIdx.x);
  double acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0;
  dispatch_dtype<F64>(c.t->dtype[Op::kDtype], [&](auto zero) {
    using T = decltype(zero);
    using acc_t = opmath_t<T>;
    const auto ctx = op.template chunk<T>(c);
    acc_t a[K];
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = acc_t(0);
    chunk_loop(c.n, is_aligned(c.t), [&](auto width, int64_t i) { op.template term<decltype(width)::value>(ctx, i, a); });
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = double(a[k]);
  });
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const double total = block_sum(acc[k]);
    if (threadIdx.x == 0) partials[k * n_chunks + blockIdx.x] = total;
  }
}

// One block per chunk; the float64-capable instantiation only when the plan holds float64.
template <class Op>
cudaError_t launch_elementwise(const void* plan, int64_t n_chunks, bool f64, cudaStream_t stream, const Op& op) {
  if (n_chunks == 0) return cudaSuccess;
  if (f64) {
    elementwise_kernel<true, Op><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, op);
  } else {
    elementwise_kernel<false, Op><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, op);
  }
  return cudaGetLastError();
}

template <class Op>
cudaError_t launch_partials(const void* plan, int64_t n_chunks, bool f64, double* partials, cudaStream_t stream,
                            const Op& op) {
  if (n_chunks == 0) return cudaSuccess;
  if (f64) {
    partials_kernel<true, Op><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, n_chunks, partials, op);
  } else {
    partials_kernel<false, Op><<<unsigned(n_chunks), kBlock, 0, stream>>>(plan, n_chunks, partials, op);
  }
  return cudaGetLastError();
}

}  // namespace saf::cuda::mt
