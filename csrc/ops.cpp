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
  // ---- multi-tensor ops (SAM family, EMA); layout and math: csrc/include/saf/multi_tensor.h ----
  // Per-tensor lists (rho, eta, lr, ...) have one value per tensor, or one value for all; flags
  // are per-tensor bit masks whose bits each op documents there. stash_mode: 0 = copy (exact
  // restore), 1 = delta (stash the perturbation, restore subtracts it: lossy, any float dtype).
  // grad_scale / found_inf: GradScaler's device tensors (the gradients are scaled by grad_scale;
  // found_inf > 0 skips the update). No op synchronises with the host on CUDA.
  //
  // SAM / ASAM first step: global L2 norm of T * g (T = |w| + eta on tensors flagged adaptive,
  // else 1), then w += rho * T^2 * g / (norm + eps) with the stash written. Returns the norm of
  // the unscaled gradients (float32, float64 for float64 params); a non-finite norm, or
  // found_inf > 0, perturbs nothing.
  m.def(
      "sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] stash, float[] rho, float[] eta, "
      "int[] flags, float eps, int stash_mode, Tensor? grad_scale, Tensor? found_inf, Tensor? sumsq=None) -> Tensor");
  // sumsq (sharded training): the sum of squares of T * g over every shard (a one-element tensor on
  // the params' device, the all-reduce of each shard's sam_sumsq); when given, sam_perturb_ skips
  // its own partial sums and finalizes from it.
  // The partial-sum stage of sam_perturb_ alone: sum of (T * g)^2 over the (local) tensors, in the
  // gradients' (scaled) units, as a 0-dim float64 tensor on their device.
  m.def("sam_sumsq(Tensor[] params, Tensor[] grads, float[] eta, int[] flags) -> Tensor");
  // Puts back the weights sam_perturb_ started from (copy mode: bit exact).
  m.def("sam_restore_(Tensor(a!)[] params, Tensor[] stash, int stash_mode) -> ()");
  // Restore, then one torch.optim.SGD step on the restored weights, in one pass. momentum_buffers
  // is empty when no tensor has momentum. flags: 2 nesterov, 4 maximize, 8 first step of the buffer.
  m.def(
      "sam_restore_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] stash, Tensor(b!)[] momentum_buffers, "
      "float[] lr, float[] weight_decay, float[] momentum, float[] dampening, int[] flags, int stash_mode, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // Restore, then one torch.optim.AdamW step (no amsgrad); steps are one-element float32 tensors
  // already incremented for this step. flags: 2 maximize.
  m.def(
      "sam_restore_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor[] stash, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor[] steps, float[] lr, float[] beta1, float[] beta2, float[] eps, "
      "float[] weight_decay, int[] flags, int stash_mode, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // ema = decay * ema + (1 - decay) * model for every pair (torch.lerp's formula, float32 math);
  // decay_tensor, when given, replaces decay (a schedule with no recompiles or syncs).
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay, Tensor? decay_tensor) -> ()");
  // Test-only: the serialised plan sam_perturb_ would upload to a GPU (uint8), built with the
  // given chunk length, so that CPU-only CI checks the layout the CUDA kernels read.
  m.def(
      "_sam_perturb_plan(Tensor[] params, Tensor[] grads, Tensor[] stash, float[] rho, float[] eta, int[] flags, "
      "int chunk_size) -> Tensor");
  // ---- end multi-tensor ops ----

  // ---- ESAM, R-SAM, GSAM (random numbers: csrc/include/saf/philox.h; math: saf/multi_tensor.h) ----
  // Counter-based random numbers of positions 0..numel-1 of out (memory order), the streams the
  // ESAM / R-SAM ops use: kind 0 raw 32-bit words (out int64), 1 uniform [0, 1), 2 standard
  // normal, 3 Bernoulli(p) as 0 / 1 (out floating). seed: any int64 (its bits are the key);
  // offset >= 0 shifts the counters.
  m.def("philox_(Tensor(a!) out, int seed, int offset, int kind, float p) -> ()");
  // ESAM stochastic weight perturbation, elementwise: keep ~ Bernoulli(beta) per element
  // (regenerated from seed / offset, never stored), norm of keep * T * g over the list, then
  // w += keep * rho / beta * T^2 * g / (norm + eps). Returns the norm (as sam_perturb_).
  m.def(
      "esam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] stash, float[] rho, float[] eta, "
      "float[] beta, int[] flags, float eps, int seed, int offset, int stash_mode, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? sumsq=None) -> Tensor");
  // sumsq (sharded training), as sam_perturb_'s: the all-reduce of every shard's esam_sumsq; when
  // given, esam_perturb_ skips its own partial sums and finalizes from it.
  // The partial-sum stage of esam_perturb_ alone: sum of (keep * T * g)^2 over the (local) tensors
  // (the mask drawn as esam_perturb_ draws it), a 0-dim float64 tensor on their device.
  m.def(
      "esam_sumsq(Tensor[] params, Tensor[] grads, float[] eta, float[] beta, int[] flags, int seed, int offset) "
      "-> Tensor");
  // Undo esam_perturb_: copy mode restores bit for bit; delta mode regenerates the mask and
  // subtracts the stashed perturbation from the kept elements only.
  m.def(
      "esam_restore_(Tensor(a!)[] params, Tensor[] stash, float[] beta, int seed, int offset, int stash_mode) "
      "-> ()");
  // R-SAM's random smoothing: stash = w; w += std * ||W[j, ...]|| * N(0, 1) per output unit j
  // (tensors with < 2 dims: std * (||p|| + 1e-16)), normals drawn per element from seed / offset.
  m.def("rsam_noise_(Tensor(a!)[] params, Tensor(b!)[] stash, float[] std, int seed, int offset) -> ()");
  // R-SAM's ascent from the clean weights: delta = w - stash (the noise applied), d = lam * g +
  // delta, w = stash + rho * d / (||d|| + eps). Returns ||d||; non-finite or found_inf: w = stash.
  m.def(
      "rsam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor[] stash, float[] rho, float lam, float eps, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? sumsq=None) -> Tensor");
  // sumsq (sharded training), as sam_perturb_'s: the all-reduce of every shard's rsam_sumsq.
  // The partial-sum stage of rsam_perturb_ alone: sum of d^2, d = lam * g / grad_scale + (w - stash),
  // over the (local) tensors, a 0-dim float64 tensor on their device (unscaled).
  m.def(
      "rsam_sumsq(Tensor[] params, Tensor[] grads, Tensor[] stash, float lam, Tensor? grad_scale) -> Tensor");
  // GSAM: <old_g, g>, |old_g|^2, |g|^2 in one pass, then g = g_p - alpha * g_perp (unscaled) in
  // place, and w restored from the stash if restore. Returns [cos, ||old_g||, ||g||]. found_inf > 0:
  // the gradients are left as they are (the caller skips the step); a non-finite sum: g = g_p.
  m.def(
      "gsam_combine_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] old_grads, Tensor[] stash, float alpha, "
      "float eps, int stash_mode, bool restore, Tensor? grad_scale, Tensor? old_grad_scale, Tensor? found_inf, "
      "Tensor? sums=None) -> Tensor");
  // GSAM fused: the same reductions, then restore + one torch.optim.SGD step with g_p - alpha *
  // g_perp (flags as sam_restore_sgd_). found_inf > 0: restore only; a non-finite sum: g = g_p.
  m.def(
      "gsam_restore_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] old_grads, Tensor[] stash, "
      "Tensor(b!)[] momentum_buffers, float[] lr, float[] weight_decay, float[] momentum, float[] dampening, "
      "int[] flags, float alpha, float eps, int stash_mode, Tensor? grad_scale, Tensor? old_grad_scale, "
      "Tensor? found_inf, Tensor? sums=None) -> Tensor");
  // sums (sharded training, both GSAM ops): [<old_g, g>, |old_g|^2, |g|^2] over every shard (the
  // all-reduce of each shard's gsam_sums); when given, the op skips its own partial sums.
  // The partial-sum stage of the GSAM ops alone: [<old_g, g>, |old_g|^2, |g|^2] over the (local)
  // tensors, in the gradients' (scaled) units, a float64 tensor of 3 values on their device.
  m.def("gsam_sums(Tensor[] grads, Tensor[] old_grads) -> Tensor");
  // ---- end ESAM, R-SAM, GSAM ----

  // ---- LookSAM, Momentum-SAM (math: saf/multi_tensor.h, namespaces looksam and msam) ----
  // LookSAM's SAM step: gv = g_s - (<g, g_s> / |g|^2) g (g_s = grads, g = old_grads) and
  // gv_norm = |gv| (float32 / float64, summed from the stored gv); a non-finite coefficient or
  // |g| = 0 leaves gv and gv_norm. Returns [cos(g, g_s), |g|, |g_s|].
  m.def(
      "looksam_gv_(Tensor(a!)[] gv, Tensor(b!) gv_norm, Tensor[] grads, Tensor[] old_grads, float eps, "
      "Tensor? sums=None) -> Tensor");
  // sums (sharded training): gsam_sums(grads, old_grads) over every shard; when given, the op skips
  // its own partial sums (gv_norm is then the local shards' |gv|: the caller reduces it).
  // LookSAM's reuse step: g += alpha |g| / (gv_norm + eps) gv (a zero or non-finite gv_norm or a
  // non-finite |g| leaves g). Returns |g| before the update.
  m.def(
      "looksam_combine_(Tensor(a!)[] grads, Tensor[] gv, Tensor gv_norm, float alpha, float eps, Tensor? sumsq=None) "
      "-> Tensor");
  // sumsq (sharded training): |g|^2 over every shard (the all-reduce of sam_sumsq(grads, grads)).
  // Momentum-SAM with SGD, the weights at the perturbed point on entry and exit: d = g + wd w;
  // w += rho_prev inv_norm buf; buf = momentum buf + d; w -= lr buf; inv_norm = 1 / (|buf| + eps);
  // w -= rho inv_norm buf. inv_norm (one element, any float dtype) carries the previous step's
  // value in and this step's out. Returns |buf|.
  m.def(
      "msam_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!) inv_norm, "
      "float[] lr, float[] weight_decay, float[] momentum, float[] rho_prev, float[] rho, float eps) -> Tensor");
  // Momentum-SAM with AdamW (the authors' adamW_msam: the decay after the Adam step; the
  // perturbation follows exp_avg); steps are one-element tensors already counting this step.
  // Returns |exp_avg|.
  m.def(
      "msam_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "Tensor[] steps, Tensor(d!) inv_norm, float[] lr, float[] beta1, float[] beta2, float[] eps, "
      "float[] weight_decay, float[] rho_prev, float[] rho, float norm_eps) -> Tensor");
  // ---- end LookSAM, Momentum-SAM ----
}
