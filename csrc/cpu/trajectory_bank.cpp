// CPU implementation of saf_kernels::saf_bank_step and saf_bank_record (layout and semantics:
// csrc/include/saf/trajectory_bank.h). The row math is the trajectory-loss kernel's
// (csrc/cpu/kernels/trajectory_loss.cpp), run with its bank extension: a gathered target row, a
// per-row mode, and the logits written over the target row once it has been read.
//
// On the CPU every check can raise at once, before the bank is touched: an id out of range, an
// id twice in the batch or a label out of range leave the bank as it was.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <atomic>
#include <utility>
#include <vector>

#include "bank_checks.h"
#include "cpu/isa_dispatch.h"
#include "cpu/kernels/kernels.h"
#include "saf/trajectory_bank.h"
#include "saf/trajectory_loss.h"
#include "trajectory_targets.h"

namespace saf::cpu {

// The first row of probability targets holding a negative or non-finite value, or -1.
static int64_t first_bad_probability_row(const at::Tensor& probs) {
  const auto check = SAF_ISA_PICK(cpu_isa(), probability_check_rows);
  const DType dt = to_dtype(probs.scalar_type());
  const int64_t B = probs.size(0), C = probs.size(1), stride = row_stride(probs);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    const int64_t r = check(probs.data_ptr(), dt, stride, C, begin, end);
    int64_t cur = bad.load();
    while (r >= 0 && (cur < 0 || r < cur) && !bad.compare_exchange_weak(cur, r)) {
    }
  });
  return bad.load();
}

// Raises IndexError for an id outside [0, N); with duplicates_are_errors raises ValueError for an
// id held by two rows, else returns, per row, whether its id is unique in the batch.
static std::vector<uint8_t> check_ids_host(const char* fn, const int64_t* ids, int64_t B, int64_t N,
                                           bool duplicates_are_errors) {
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < N, fn, ": sample id ", ids[i], " of row ", i,
                      " is outside the bank's range [0, ", N, ")");
  }
  std::vector<std::pair<int64_t, int64_t>> sorted(B);
  for (int64_t i = 0; i < B; ++i) sorted[i] = {ids[i], i};
  std::sort(sorted.begin(), sorted.end());
  std::vector<uint8_t> unique(B, 1);
  for (int64_t j = 1; j < B; ++j) {
    if (sorted[j].first != sorted[j - 1].first) continue;
    TORCH_CHECK_VALUE(!duplicates_are_errors, fn, ": sample id ", sorted[j].first, " appears in rows ",
                      sorted[j - 1].second, " and ", sorted[j].second,
                      " of one batch; a sample may be seen once per step (and should be seen once per epoch)");
    unique[sorted[j].second] = unique[sorted[j - 1].second] = 0;
  }
  return unique;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> saf_bank_step_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& labels_in, const at::Tensor& ids_in,
    const at::Tensor& values, const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state,
    int64_t epoch, double temperature, double ce_weight, double kl_weight, double label_smoothing,
    int64_t ignore_index, bool use_past, bool record, bool need_grad) {
  const char* fn = "saf_kernels.saf_bank_step";
  check_bank_step_args(logits_in, labels_in, ids_in, values, epochs, claims, state, epoch, temperature,
                       label_smoothing);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  // Class labels, or probability targets [B, C] (every row labelled; read in their own dtype).
  const SplitTargets targets = split_targets(labels_in);
  const at::Tensor &labels = targets.labels, &probs = targets.probs;
  const bool soft = probs.defined();
  const int64_t B = logits.size(0), C = logits.size(1), N = values.size(0), S = values.size(1);
  const int64_t slot = epoch % S;
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* y = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;

  // Every check before the bank is touched.
  check_ids_host(fn, id, B, N, /*duplicates_are_errors=*/true);
  if (y) {
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < C), fn, ": label ", y[i], " of row ", i,
                        " is outside [0, ", C, ") and is not ignore_index (", ignore_index, ")");
    }
  }
  if (soft) {
    // One vectorised read of the targets: the kernel records as it goes, so a bad row found
    // there would leave the bank half written.
    const int64_t bad = first_bad_probability_row(probs);
    TORCH_CHECK_VALUE(bad < 0, fn, ": ", bad >= 0 ? bad_probability_message(probs, bad) : std::string());
  }

  // The pre-pass: row modes and the two counts.
  int32_t* tags = epochs.data_ptr<int32_t>() + slot;
  std::vector<uint8_t> mode(B);
  int64_t n = 0, m = 0;
  for (int64_t i = 0; i < B; ++i) {
    const bool labelled = y == nullptr || y[i] != ignore_index;
    mode[i] = bank_row_mode(tags[id[i] * S], epoch, S, use_past, labelled, record);
    n += labelled;
    m += mode[i] & kRowKL;
  }

  const bool f64 = logits.scalar_type() == at::kDouble;
  at::Tensor rows = at::empty({B}, logits.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor grad = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());

  TrajectoryArgs a{};
  a.logits = logits.data_ptr();
  a.target = static_cast<char*>(values.data_ptr()) + slot * C * values.element_size();
  a.labels = y;
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.row_loss = rows.data_ptr();
  a.rows = B;
  a.cols = C;
  a.logits_stride = row_stride(logits);
  a.target_stride = S * C;
  a.grad_stride = C;
  a.logits_dtype = to_dtype(logits.scalar_type());
  a.target_dtype = to_dtype(values.scalar_type());
  // Averages folded into the weights: CE over the n labelled rows, KL over the m rows with a past.
  a.p = TrajectoryParams{temperature, n > 0 ? ce_weight / double(n) : 0.0, m > 0 ? kl_weight / double(m) : 0.0,
                         label_smoothing, ignore_index, 1.0};
  a.target_index = id;
  a.row_mode = mode.data();
  if (soft) {
    a.soft = probs.data_ptr();
    a.soft_stride = row_stride(probs);
    a.soft_dtype = to_dtype(probs.scalar_type());
  }

  const auto kernel = SAF_ISA_PICK(cpu_isa(), trajectory_loss_rows);
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  if (record) {
    for (int64_t i = 0; i < B; ++i) tags[id[i] * S] = int32_t(epoch);
  }

  // Sequential and in double: the same bits whatever the thread count.
  double s = 0;
  if (f64) {
    const double* r = rows.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i) s += r[i];
  } else {
    const float* r = rows.data_ptr<float>();
    for (int64_t i = 0; i < B; ++i) s += double(r[i]);
  }
  at::Tensor counts = at::empty({2}, logits.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = n;
  counts.data_ptr<int64_t>()[1] = m;
  return {at::scalar_tensor(s, rows.options()), grad, counts};
}

void saf_bank_record_cpu(const at::Tensor& rows_in, const at::Tensor& ids_in, const at::Tensor& values,
                         const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state, int64_t epoch) {
  const char* fn = "saf_kernels.saf_bank_record";
  check_bank_record_args(rows_in, ids_in, values, epochs, claims, state, epoch);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t B = ids.size(0), N = values.size(0), S = values.size(1);
  const int64_t slot = epoch % S;
  const int64_t* id = ids.data_ptr<int64_t>();
  // An id twice in a gathered batch is legitimate (DistributedSampler pads the epoch with repeats):
  // neither row is recorded, on every rank alike.
  const std::vector<uint8_t> unique = check_ids_host(fn, id, B, N, /*duplicates_are_errors=*/false);
  std::vector<int64_t> keep;
  keep.reserve(B);
  for (int64_t i = 0; i < B; ++i) {
    if (unique[i]) keep.push_back(i);
  }
  if (keep.empty()) return;
  const at::Tensor rows_idx = at::from_blob(keep.data(), {int64_t(keep.size())}, at::kLong).clone();
  const at::Tensor dst = ids.index_select(0, rows_idx);
  at::NoGradGuard no_grad;
  values.select(1, slot).index_copy_(0, dst, rows_in.index_select(0, rows_idx).to(values.scalar_type()));
  epochs.select(1, slot).index_fill_(0, dst, int64_t(epoch));
}

TORCH_LIBRARY_IMPL(saf_kernels, CPU, m) {
  m.impl("saf_bank_step", &saf_bank_step_cpu);
  m.impl("saf_bank_record", &saf_bank_record_cpu);
}

}  // namespace saf::cpu
