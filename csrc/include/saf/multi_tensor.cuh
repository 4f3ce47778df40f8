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

}  // namespace saf::cuda::mt
