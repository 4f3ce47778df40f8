// Every op schema of the saf_kernels namespace, declared once. CPU kernels register in
// csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/*.cpp; fake (meta) kernels and autograd formulas are
// registered from Python (saf_kernels/ops/*.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing saf_kernels._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(saf_kernels, m) {
  // Fused row-wise loss: ce_weight * CE(logits, labels) + kl_weight * T^2 * KL(softmax(target/T) ||
  // softmax(logits/T)) per row, with the gradient w.r.t. logits written in the same pass.
  // reduction: 0 = none (loss [B]), 1 = sum, 2 = mean over the rows whose label is not
  // ignore_index (all rows without labels; 0 if there are none). The gradient is that of the
  // returned loss, so backward only scales it by grad_output. Returns (loss in float32, or
  // float64 if an input is float64; grad_logits [B, C] in logits' dtype, or [0] if not need_grad).
  m.def(
      "trajectory_loss(Tensor logits, Tensor target_logits, Tensor? labels, float temperature, "
      "float ce_weight, float kl_weight, float label_smoothing, int ignore_index, int reduction, "
      "bool need_grad) -> (Tensor, Tensor)");

  // ---- SAF trajectory bank (saf_kernels/ops/trajectory_bank.py; layout and semantics in
  // csrc/include/saf/trajectory_bank.h) ----------------------------------------------------------
  // One training step against the bank: gathers each row's past logits by sample id (slot
  // epoch % delay, valid iff tagged epoch - delay), computes
  //   ce_weight * sum(CE) / n + kl_weight * T^2 * sum(KL over rows with a past entry) / m
  // (n = rows whose label is not ignore_index, m = rows with a past entry; 0/0 = 0; no KL at all
  // unless use_past) and its gradient w.r.t. logits in the same pass, and, if record, writes the
  // logits and tag `epoch` into those slots. Returns (loss: float32, or float64 for float64
  // logits; grad [B, C] in logits' dtype, or [0] if not need_grad; counts int64 [2] = (n, m)).
  // Bad ids (out of range, or twice in the batch): the CPU kernel raises before touching the
  // bank; the GPU kernels skip those rows and set flags in `state` (no host synchronisation).
  m.def(
      "saf_bank_step(Tensor logits, Tensor? labels, Tensor ids, Tensor(a!) values, Tensor(b!) epochs, "
      "Tensor(c!) claims, Tensor(d!) state, int epoch, float temperature, float ce_weight, float kl_weight, "
      "float label_smoothing, int ignore_index, bool use_past, bool record, bool need_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // Writes rows (any float dtype, rounded to the bank's) into their slots with tag `epoch`: the
  // rows other ranks recorded, in a distributed step. Ids held by several rows are not recorded
  // (DistributedSampler pads an epoch with repeats); ids out of range raise (CPU) or set the flag.
  m.def(
      "saf_bank_record(Tensor rows, Tensor ids, Tensor(a!) values, Tensor(b!) epochs, Tensor(c!) claims, "
      "Tensor(d!) state, int epoch) -> ()");
  // ---- end SAF trajectory bank -------------------------------------------------------------------
}
