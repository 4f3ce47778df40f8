// Host entry points of csrc/cuda/trajectory_bank.cu (raw pointers and a stream; no torch types).
#pragma once

#include <cuda_runtime.h>

#include "saf/trajectory_bank.h"
#include "saf/trajectory_loss.h"

namespace saf::cuda {

// What bank_record_launch copies: rows (src_dtype) into slot rows ids[i] (bank_dtype), for the
// rows whose mode has kRowRecord.
struct BankRecordArgs {
  const void* src;
  const int64_t* ids;
  const uint8_t* mode;
  void* slot;  // values[:, epoch % delay]
  int64_t rows;
  int64_t cols;
  int64_t src_stride;
  int64_t slot_stride;
  DType src_dtype;
  DType bank_dtype;
};

// One block: row modes, new tags, counts and scales (BankPrepassArgs); flags bad ids in state.
cudaError_t bank_prepass_launch(const BankPrepassArgs& a, cudaStream_t stream);

// The fused step over a.rows rows (TrajectoryArgs with the bank extension). Writes the summed loss
// (float, or double for float64 logits) to `loss`; `done` is the bank's block counter (0 between steps).
cudaError_t bank_step_launch(const TrajectoryArgs& a, void* loss, int64_t* done, cudaStream_t stream);

cudaError_t bank_record_launch(const BankRecordArgs& a, cudaStream_t stream);

}  // namespace saf::cuda
