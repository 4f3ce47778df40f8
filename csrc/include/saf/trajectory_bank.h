// The SAF trajectory bank: per-sample logits of past epochs, kept by global sample id, and the
// fused step that reads a sample's past row, computes the loss and its gradient, and overwrites the
// row with the current logits. Shared by the CPU and CUDA kernels (no torch headers).
//
// Layout (N samples, S = delay slots, C classes):
//   values [N, S, C] in the bank dtype, epochs [N, S] int32 (-1: empty).
// At epoch e (0-based) sample x uses slot s = e % S. That slot holds the row written at epoch
// e - S iff epochs[x, s] == e - S; the step reads it, then writes the current logits and tag e in
// the same place. Each sample is seen once per epoch, so S slots suffice (the official code keeps
// S + 1 and reads and writes different slots).
//
// Row modes (TrajectoryArgs::row_mode) come from a pre-pass over the batch's ids and labels:
//   kRowKL      the id is valid and unique in the batch, the label is not ignored, the trajectory
//               term is on (use_past) and the slot's tag is e - S;
//   kRowRecord  the id is valid and unique and recording is on.
// Counts: n = rows whose label is not ignore_index (all rows without labels), m = rows with kRowKL;
// loss = sum(CE rows) / n + kl_weight * T^2 * sum(KL rows) / m, with 0/0 = 0.
#pragma once

#include <cstdint>

#include "saf/common.h"

namespace saf {

// Device-side bookkeeping of a bank (an int64 tensor of kBankStateSize entries): error flags the
// GPU kernels set instead of raising (raising would need a host synchronisation).
enum BankError : int64_t {
  kBankIdOutOfRange = 1,  // a sample id outside [0, N): that row is neither read nor recorded
  kBankDuplicateId = 2,   // an id twice in one batch: none of its rows is read or recorded
};
enum BankStateIndex : int {
  kStateFlags = 0,     // OR of BankError
  kStateBadId = 1,     // largest out-of-range id seen (INT64_MIN: none)
  kStateDupId = 2,     // largest duplicated id seen (INT64_MIN: none)
  kStateEpoch = 3,     // epoch of the first error (-1: none)
  kStateDone = 4,      // blocks of the running step that have finished (0 between steps)
  kBankStateSize = 8,  // (the rest is reserved)
};

// Everything the pre-pass needs, as raw pointers.
struct BankPrepassArgs {
  const int64_t* ids;     // [B] sample ids
  const int64_t* labels;  // [B] or nullptr
  int32_t* tags;          // epochs[:, slot] (row stride tag_stride)
  int32_t* claims;        // [N] zeros between steps: how many rows of this batch hold each id
  int64_t* state;         // [kBankStateSize]
  uint8_t* row_mode;      // [B] out
  int64_t* counts;        // [2] out: n, m
  void* scales;           // [2] out (float, or double if f64): 1/n and 1/m (0 when the count is 0)
  int64_t rows;
  int64_t num_samples;
  int64_t tag_stride;
  int64_t ignore_index;
  int64_t epoch;
  int64_t delay;
  bool use_past;
  bool record;
  bool duplicates_are_errors;  // false for the gathered batch of a distributed step
  bool f64;
};

// The mode of one row once its id is known to be valid and unique.
SAF_HD uint8_t bank_row_mode(int32_t tag, int64_t epoch, int64_t delay, bool use_past, bool labelled, bool record) {
  const bool has_past = use_past && labelled && epoch >= delay && int64_t(tag) == epoch - delay;
  return uint8_t((has_past ? 1 : 0) | (record ? 2 : 0));
}

}  // namespace saf
