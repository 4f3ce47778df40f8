// Autograd for the fused C++ ops, in C++ so that a training step pays no Python autograd
// overhead (it is ~20 us per direction with torch.library.register_autograd). Registered for
// the Autograd key, so it serves the CPU and CUDA kernels alike; fake kernels for torch.compile
// are registered from Python.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "saf/trajectory_loss.h"

namespace saf {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A real (not fake, functional or traced) CPU scalar equal to 1.
static bool is_plain_cpu_one(const at::Tensor& t) {
  constexpr c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                        c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Meta});
  return t.dim() == 0 && t.device().is_cpu() && !t.key_set().has_any(traced) && t.item<double>() == 1.0;
}

class TrajectoryLossFunction : public torch::autograd::Function<TrajectoryLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& labels, double temperature, double ce_weight,
                               double kl_weight, double label_smoothing, int64_t ignore_index, int64_t reduction,
                               bool need_grad) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("saf_kernels::trajectory_loss", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const std::optional<at::Tensor>&, double, double,
                                                                   double, double, int64_t, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = op.call(logits, target, labels, temperature, ce_weight, kl_weight, label_smoothing,
                                ignore_index, reduction, need_grad);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["need_grad"] = need_grad;
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    // The gradient output is never used: do not let autograd fill a [B, C] buffer of zeros for it.
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& go = grad_outputs[0];
    variable_list out(10);
    if (!go.defined()) return out;
    TORCH_CHECK(ctx->saved_data["need_grad"].toBool(),
                "saf_kernels.trajectory_loss was run with need_grad=False; call it with need_grad=True (the public "
                "functions do so whenever logits require grad)");
    const at::Tensor grad = ctx->get_saved_variables()[0];
    const bool per_row = static_cast<Reduction>(ctx->saved_data["reduction"].toInt()) == Reduction::None;
    if (!per_row && is_plain_cpu_one(go)) {
      // loss.backward() on CPU: the forward already wrote this gradient. Reading a CPU scalar is
      // not a device synchronisation, and it saves a full read + write of [B, C].
      out[0] = grad;
      return out;
    }
    // One pass, in float32 (opmath), rounded once to the gradient's dtype.
    at::Tensor dz = at::empty_like(grad);
    at::mul_out(dz, grad, per_row ? go.unsqueeze(1) : go);
    out[0] = dz;
    return out;
  }
};

static std::tuple<at::Tensor, at::Tensor> trajectory_loss_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& labels, double temperature,
    double ce_weight, double kl_weight, double label_smoothing, int64_t ignore_index, int64_t reduction,
    bool need_grad) {
  auto r = TrajectoryLossFunction::apply(logits, target, labels, temperature, ce_weight, kl_weight, label_smoothing,
                                         ignore_index, reduction, need_grad);
  return {r[0], r[1]};
}

// ---- SAF trajectory bank ----------------------------------------------------------------------
// saf_bank_step returns the gradient of its loss w.r.t. logits; backward scales it, as above. The
// bank tensors it writes are not differentiable; their version counters are bumped so that
// autograd notices if a saved copy of them is used after the step.

class BankStepFunction : public torch::autograd::Function<BankStepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                               const at::Tensor& ids, const at::Tensor& values, const at::Tensor& epochs,
                               const at::Tensor& claims, const at::Tensor& state, int64_t epoch, double temperature,
                               double ce_weight, double kl_weight, double label_smoothing, int64_t ignore_index,
                               bool use_past, bool record, bool need_grad) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("saf_kernels::saf_bank_step", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, double, double,
                int64_t, bool, bool, bool)>();
    at::Tensor loss, grad, counts;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, grad, counts) = op.call(logits, labels, ids, values, epochs, claims, state, epoch, temperature,
                                             ce_weight, kl_weight, label_smoothing, ignore_index, use_past, record,
                                             need_grad);
    }
    for (const at::Tensor* t : {&values, &epochs, &claims, &state}) torch::autograd::impl::bump_version(*t);
    ctx->saved_data["need_grad"] = need_grad;
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad, counts});
    ctx->set_materialize_grads(false);
    return {loss, grad, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& go = grad_outputs[0];
    variable_list out(16);
    if (!go.defined()) return out;
    TORCH_CHECK(ctx->saved_data["need_grad"].toBool(),
                "saf_kernels.saf_bank_step was run with need_grad=False; call it with need_grad=True (the public "
                "functions do so whenever logits require grad)");
    const at::Tensor grad = ctx->get_saved_variables()[0];
    at::Tensor dz = at::empty_like(grad);
    at::mul_out(dz, grad, go);
    out[0] = dz;
    return out;
  }
};

static std::tuple<at::Tensor, at::Tensor, at::Tensor> saf_bank_step_autograd(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, const at::Tensor& ids, const at::Tensor& values,
    const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state, int64_t epoch, double temperature,
    double ce_weight, double kl_weight, double label_smoothing, int64_t ignore_index, bool use_past, bool record,
    bool need_grad) {
  auto r = BankStepFunction::apply(logits, labels, ids, values, epochs, claims, state, epoch, temperature, ce_weight,
                                   kl_weight, label_smoothing, ignore_index, use_past, record, need_grad);
  return {r[0], r[1], r[2]};
}

static void saf_bank_record_autograd(const at::Tensor& rows, const at::Tensor& ids, const at::Tensor& values,
                                     const at::Tensor& epochs, const at::Tensor& claims, const at::Tensor& state,
                                     int64_t epoch) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("saf_kernels::saf_bank_record", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, int64_t)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(rows, ids, values, epochs, claims, state, epoch);
  }
  for (const at::Tensor* t : {&values, &epochs, &claims, &state}) torch::autograd::impl::bump_version(*t);
}
// ---- end SAF trajectory bank ------------------------------------------------------------------

TORCH_LIBRARY_IMPL(saf_kernels, Autograd, m) {
  m.impl("trajectory_loss", &trajectory_loss_autograd);
  m.impl("saf_bank_step", &saf_bank_step_autograd);
  m.impl("saf_bank_record", &saf_bank_record_autograd);
}

}  // namespace saf
