// CUDA kernel of the fused trajectory loss (math: csrc/include/saf/trajectory_loss.h; the row's
// device code, shared with the SAF bank step: csrc/include/saf/trajectory_kernel.cuh).
//
// TPR threads handle one row: a warp for rows up to 1024 classes, a block of 256 or 512
// threads above (512, not 1024, so that the kernel keeps 128 registers and does not spill).
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launchers.h"
#include "saf/cuda_utils.cuh"
#include "saf/trajectory_kernel.cuh"
#include "saf/trajectory_loss.h"

namespace saf::cuda {
namespace {

using namespace detail;

template <typename zt, typename tt, typename acc_t, int TPR>
__global__ void __launch_bounds__(TPR <= 32 ? 256 : TPR)
    trajectory_loss_kernel(const TrajectoryArgs a, const bool vec4) {
  static_assert(TPR == 32 || (TPR % 32 == 0 && TPR <= 1024), "a warp, or whole warps of one row");
  constexpr int ROWS_PER_BLOCK = TPR <= 32 ? 256 / TPR : 1;
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / TPR;
  // Whole row groups exit together, so the block-wide barriers in the row stay uniform (TPR > 32
  // means one row per block).
  if (row >= a.rows) return;
  trajectory_row<zt, tt, acc_t, TPR, false>(a, row, lane, vec4);
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
