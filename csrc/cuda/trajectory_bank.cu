// CUDA kernels of the SAF trajectory bank (layout and semantics: saf/trajectory_bank.h).
//
// A step is two launches and no host synchronisation:
//   1. bank_prepass_kernel, one block: every in-range id claims its sample (an int32 counter per
//      sample, zero between steps), then each row learns whether its id is unique, reads its
//      slot's tag, gets its mode and writes the new tag; the block counts n and m and writes their
//      reciprocals (the CE and KL scales); finally the claims are released. Ids out of range or
//      repeated set flags in the bank's state instead of raising.
//   2. bank_step_kernel: the trajectory-loss row (saf/trajectory_kernel.cuh) with the bank
//      extension: gathers the past row, writes the gradient already scaled, overwrites the slot
//      with the logits; the last block to finish sums the row losses in a fixed order, so the loss
//      is deterministic and needs no third launch.
// The bank's values and tags may be in pinned host memory: they are reached through unified
// virtual addressing, over PCIe (see saf_kernels/saf.py for the cost).
//
// No torch headers: this file compiles with plain nvcc wherever CUDA is installed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/trajectory_bank_launchers.h"
#include "saf/cuda_utils.cuh"
#include "saf/trajectory_bank.h"
#include "saf/trajectory_kernel.cuh"
#include "saf/trajectory_loss.h"

namespace saf::cuda {
namespace {

using namespace detail;

constexpr int kPrepassThreads = 1024;

__device__ __forceinline__ void flag_error(int64_t* state, int64_t bit, int slot, int64_t id, int64_t epoch) {
  atomicOr(reinterpret_cast<unsigned long long*>(state + kStateFlags), static_cast<unsigned long long>(bit));
  atomicMax(reinterpret_cast<long long*>(state + slot), static_cast<long long>(id));
  atomicCAS(reinterpret_cast<unsigned long long*>(state + kStateEpoch), static_cast<unsigned long long>(-1LL),
            static_cast<unsigned long long>(epoch));
}

template <typename acc_t>
__global__ void __launch_bounds__(kPrepassThreads) bank_prepass_kernel(const BankPrepassArgs a) {
  const int64_t B = a.rows;
  // Phase 1: claims.
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const int64_t id = a.ids[i];
    if (id >= 0 && id < a.num_samples) {
      atomicAdd(a.claims + id, 1);
    } else {
      flag_error(a.state, kBankIdOutOfRange, kStateBadId, id, a.epoch);
    }
  }
  __syncthreads();
  // Phase 2: modes, new tags, counts. Rows are distinct samples here, so no two threads touch the
  // same tag.
  long long n = 0, m = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const int64_t id = a.ids[i];
    const bool labelled = a.labels == nullptr || a.labels[i] != a.ignore_index;
    n += labelled;
    uint8_t mode = 0;
    if (id >= 0 && id < a.num_samples) {
      const int claims = atomicAdd(a.claims + id, 0);  // an atomic read: the claims bypassed L1
      if (claims == 1) {
        int32_t* tag = a.tags + id * a.tag_stride;
        mode = bank_row_mode(*tag, a.epoch, a.delay, a.use_past, labelled, a.record);
        if (a.record) *tag = int32_t(a.epoch);
      } else if (a.duplicates_are_errors) {
        flag_error(a.state, kBankDuplicateId, kStateDupId, id, a.epoch);
      }
    }
    a.row_mode[i] = mode;
    m += mode & kRowKL;
  }
  n = block_sum(n);
  m = block_sum(m);
  __syncthreads();  // every claim has been read
  // Phase 3: release the claims.
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const int64_t id = a.ids[i];
    if (id >= 0 && id < a.num_samples) a.claims[id] = 0;
  }
  if (threadIdx.x == 0) {
    a.counts[0] = n;
    a.counts[1] = m;
    acc_t* scales = static_cast<acc_t*>(a.scales);
    scales[0] = n > 0 ? acc_t(1) / acc_t(n) : acc_t(0);
    scales[1] = m > 0 ? acc_t(1) / acc_t(m) : acc_t(0);
  }
}

template <typename zt, typename tt, typename acc_t, int TPR>
__global__ void __launch_bounds__(TPR <= 32 ? 256 : TPR)
    bank_step_kernel(const TrajectoryArgs a, const bool vec4, acc_t* loss, unsigned long long* done) {
  static_assert(TPR == 32 || (TPR % 32 == 0 && TPR <= 512), "a warp, or whole warps of one row");
  constexpr int ROWS_PER_BLOCK = TPR <= 32 ? 256 / TPR : 1;
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / TPR;
  // Row groups past the batch skip the row together (TPR > 32 means one row per block), and every
  // thread reaches the barriers below.
  if (row < a.rows) trajectory_row<zt, tt, acc_t, TPR, true>(a, row, lane, vec4);

  // The last block to finish sums the row losses, in the same order whatever the timing.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1ull) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const volatile acc_t* rl = static_cast<const volatile acc_t*>(a.row_loss);
  __shared__ acc_t part[TPR <= 32 ? 256 : TPR];
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < a.rows; i += blockDim.x) s += rl[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *loss = part[0];
    *done = 0;  // ready for the next step (and for CUDA graph replays)
  }
}

template <typename zt, typename tt, typename acc_t>
cudaError_t launch_step_typed(const TrajectoryArgs& a, void* loss, int64_t* done, cudaStream_t stream) {
  // The bank's rows start at multiples of delay * C elements of a 16-byte aligned allocation.
  const bool vec4 = a.cols % 4 == 0 && a.logits_stride % 4 == 0 && a.target_stride % 4 == 0 &&
                    a.grad_stride % 4 == 0 && aligned_for4<zt>(a.logits) && aligned_for4<tt>(a.target) &&
                    (a.grad == nullptr || aligned_for4<zt>(a.grad));
  acc_t* out = static_cast<acc_t*>(loss);
  auto* counter = reinterpret_cast<unsigned long long*>(done);
  if (a.cols <= 1024) {
    constexpr int TPR = 32, ROWS = 256 / TPR;
    const unsigned blocks = unsigned((a.rows + ROWS - 1) / ROWS);
    bank_step_kernel<zt, tt, acc_t, TPR><<<blocks, 256, 0, stream>>>(a, vec4, out, counter);
  } else if (a.cols <= 16384) {
    bank_step_kernel<zt, tt, acc_t, 256><<<unsigned(a.rows), 256, 0, stream>>>(a, vec4, out, counter);
  } else {
    bank_step_kernel<zt, tt, acc_t, 512><<<unsigned(a.rows), 512, 0, stream>>>(a, vec4, out, counter);
  }
  return cudaGetLastError();
}

template <typename zt, typename acc_t>
cudaError_t launch_step_for_logits(const TrajectoryArgs& a, void* loss, int64_t* done, cudaStream_t stream) {
  switch (a.target_dtype) {
    case DType::F32: return launch_step_typed<zt, float, acc_t>(a, loss, done, stream);
    case DType::F16: return launch_step_typed<zt, __half, acc_t>(a, loss, done, stream);
    case DType::BF16: return launch_step_typed<zt, __nv_bfloat16, acc_t>(a, loss, done, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Rows of a gathered batch into their slots: a warp per row, rows without the record bit skipped.
template <typename zt, typename tt>
__global__ void __launch_bounds__(256)
    bank_record_kernel(const zt* rows, int64_t n_rows, int64_t cols, int64_t row_stride, const int64_t* ids,
                       const uint8_t* mode, tt* slot, int64_t slot_stride) {
  const int64_t r = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= n_rows || !(mode[r] & kRowRecord)) return;
  const zt* src = rows + r * row_stride;
  tt* dst = slot + ids[r] * slot_stride;
  for (int64_t c = threadIdx.x % 32; c < cols; c += 32) dst[c] = to_storage<tt>(src[c]);
}

template <typename zt>
cudaError_t launch_record_for_rows(const BankRecordArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.rows + 7) / 8);
  const zt* rows = static_cast<const zt*>(a.src);
  switch (a.bank_dtype) {
    case DType::F32:
      bank_record_kernel<zt, float><<<blocks, 256, 0, stream>>>(rows, a.rows, a.cols, a.src_stride, a.ids, a.mode,
                                                                 static_cast<float*>(a.slot), a.slot_stride);
      break;
    case DType::F16:
      bank_record_kernel<zt, __half><<<blocks, 256, 0, stream>>>(rows, a.rows, a.cols, a.src_stride, a.ids, a.mode,
                                                                  static_cast<__half*>(a.slot), a.slot_stride);
      break;
    case DType::BF16:
      bank_record_kernel<zt, __nv_bfloat16><<<blocks, 256, 0, stream>>>(
          rows, a.rows, a.cols, a.src_stride, a.ids, a.mode, static_cast<__nv_bfloat16*>(a.slot), a.slot_stride);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bank_prepass_launch(const BankPrepassArgs& a, cudaStream_t stream) {
  if (a.f64) {
    bank_prepass_kernel<double><<<1, kPrepassThreads, 0, stream>>>(a);
  } else {
    bank_prepass_kernel<float><<<1, kPrepassThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t bank_step_launch(const TrajectoryArgs& a, void* loss, int64_t* done, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  switch (a.logits_dtype) {
    case DType::F32: return launch_step_for_logits<float, float>(a, loss, done, stream);
    case DType::F16: return launch_step_for_logits<__half, float>(a, loss, done, stream);
    case DType::BF16: return launch_step_for_logits<__nv_bfloat16, float>(a, loss, done, stream);
    case DType::F64: return launch_step_for_logits<double, double>(a, loss, done, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bank_record_launch(const BankRecordArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  switch (a.src_dtype) {
    case DType::F32: return launch_record_for_rows<float>(a, stream);
    case DType::F16: return launch_record_for_rows<__half>(a, stream);
    case DType::BF16: return launch_record_for_rows<__nv_bfloat16>(a, stream);
    case DType::F64: return launch_record_for_rows<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace saf::cuda
