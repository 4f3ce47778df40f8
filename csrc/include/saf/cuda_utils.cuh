// Device helpers shared by the .cu kernels: conversions, fast exp, 4-wide loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace saf::cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float x) { return acc_t(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double x) { return acc_t(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) { return acc_t(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) { return acc_t(__bfloat162float(x)); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ float from_acc<float>(double x) { return float(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(double x) { return __float2half_rn(float(x)); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(float(x));
}

// Arguments are max-subtracted (<= 0) or small, where __expf is accurate to a few ulp.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
inline bool aligned_for4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <typename acc_t, typename T>
__device__ __forceinline__ void load4(const T* p, acc_t out[4]) {
  const Pack4<T> v = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = to_acc<acc_t>(v.v[j]);
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store4(T* p, const acc_t in[4]) {
  Pack4<T> v;
#pragma unroll
  for (int j = 0; j < 4; ++j) v.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Pack4<T>*>(p) = v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), in a fixed order; every thread
// gets the same total. Calls may follow each other without a barrier: the leading one keeps
// this call's writes off part[] until every thread has read the previous call's.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T part[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : T(0);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace saf::cuda
