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
}
