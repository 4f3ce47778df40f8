"""The SAF / MESA trajectory loss: ``T^2 * KL(softmax(target/T) || softmax(logits/T))`` per row,
optionally fused with cross-entropy, forward and gradient in one kernel.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.trajectory_loss``
(C++ CPU / CUDA kernels, ``csrc/``) or ``saf_kernels::trajectory_loss_triton``
(``saf_kernels/triton/trajectory_loss.py``) or :mod:`saf_kernels.reference`.

Both fused ops return the loss (per row, summed, or averaged over the rows not ignored) and the
gradient of that loss w.r.t. the logits, computed in the same pass; their autograd formula only
scales the saved gradient by the incoming gradient, so a backward costs one read and one write of
``[B, C]`` and no other op.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _backend, reference
from . import _multi_tensor as mt

REDUCTIONS = ("none", "sum", "mean", "batchmean")
OP = "trajectory_loss"


# --------------------------------------------------------------------------------------------
# Registration. The C++ op has its autograd in C++ (csrc/autograd.cpp); the Triton op gets the
# same formula here. Both share the fake (meta) kernel used by torch.compile.
# --------------------------------------------------------------------------------------------

_REDUCTION_CODE = {"none": 0, "sum": 1, "mean": 2}


def _fake(logits, target_logits, labels, temperature, ce_weight, kl_weight, label_smoothing, ignore_index,
          reduction, need_grad):
    acc = torch.float64 if torch.float64 in (logits.dtype, target_logits.dtype) else torch.float32
    loss = logits.new_empty((logits.shape[0],) if reduction == 0 else (), dtype=acc)
    if need_grad:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    else:
        grad = logits.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.reduction = inputs[-2]
    ctx.need_grad = inputs[-1]


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return (None,) * 10
    if not ctx.need_grad:
        raise RuntimeError(
            "saf_kernels.trajectory_loss was run with need_grad=False; call it with need_grad=True "
            "(the public functions do so whenever logits require grad)"
        )
    (grad,) = ctx.saved_tensors
    # One pass, in float32 (opmath), rounded once to the gradient's dtype.
    out = torch.empty_like(grad)
    torch.mul(grad, grad_loss.unsqueeze(1) if ctx.reduction == 0 else grad_loss, out=out)
    return (out,) + (None,) * 9


mt.register(OP,
            "(Tensor logits, Tensor target_logits, Tensor? labels, float temperature, float ce_weight, "
            "float kl_weight, float label_smoothing, SymInt ignore_index, SymInt reduction, "
            "bool need_grad) -> (Tensor, Tensor)",
            _fake, "trajectory_loss.trajectory_loss_triton").register_autograd(_backward, setup_context=_setup_context)


def fused_ops() -> dict[str, object]:
    """The fused op of each kernel backend available here (``cpu``/``cuda`` share the C++ op)."""
    return mt.kernels(OP)


# --------------------------------------------------------------------------------------------
# Input checks (metadata only: no host synchronisation)
# --------------------------------------------------------------------------------------------


def _check_pair(logits, target_logits, fn):
    for name, t in (("logits", logits), ("target_logits", target_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in mt.FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D [batch, classes], got shape {tuple(t.shape)}")
    if target_logits.shape != logits.shape:
        raise ValueError(
            f"{fn}: target_logits shape {tuple(target_logits.shape)} differs from logits shape {tuple(logits.shape)}"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits need at least one class, got shape {tuple(logits.shape)}")
    if target_logits.device != logits.device:
        raise ValueError(f"{fn}: target_logits is on {target_logits.device} but logits are on {logits.device}")


def _check_real(name, value, fn, positive=False, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")
    if lo is not None and not (lo <= value <= hi):
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_targets(targets, logits, ignore_index, label_smoothing, fn, name="targets"):
    """Raise a clear error unless ``targets`` are class indices ``[B]`` (int64/int32) or
    probabilities ``[B, C]`` (a float dtype) for ``logits``; label smoothing must then be 0.

    Metadata only (no host synchronisation). The values of probability targets (negative or
    non-finite) are checked where that costs no synchronisation: by the CPU kernel and the
    reference on CPU tensors (``ValueError``); on the GPU kernels such a row's loss and gradient
    are NaN instead, as for a label out of range.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.dtype not in mt.FLOAT_DTYPES:
            raise TypeError(f"{fn}: probability {name} must be float32, float16, bfloat16 or float64, got "
                            f"{targets.dtype}")
        if targets.shape != logits.shape:
            raise ValueError(f"{fn}: probability {name} must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(targets.shape)}")
        if label_smoothing != 0:
            raise ValueError(f"{fn}: label_smoothing={label_smoothing!r} applies to class-index {name}; "
                             f"with probability {name} fold it into them (targets * (1 - eps) + eps / C) and pass "
                             "label_smoothing=0")
    else:
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{fn}: {name} must be int64 or int32 class indices or floating probabilities, got "
                            f"{targets.dtype}")
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"{fn}: class-index {name} must have shape ({logits.shape[0]},), got "
                             f"{tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"{fn}: {name} are on {targets.device} but logits are on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")


def _need_grad(logits):
    return torch.is_grad_enabled() and logits.requires_grad


def _fused(backend, logits, target_logits, labels, temperature, ce_weight, kl_weight, smoothing, ignore_index,
           reduction):
    op = fused_ops()[backend]
    loss, _ = op(
        logits,
        target_logits.detach(),
        labels,
        temperature,
        ce_weight,
        kl_weight,
        smoothing,
        int(ignore_index),
        _REDUCTION_CODE[reduction],
        _need_grad(logits),
    )
    return loss.to(logits.dtype)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def trajectory_kl_loss(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 5.0,
                       reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """SAF/MESA trajectory loss ``T^2 * KL(softmax(target_logits/T) || softmax(logits/T))`` per row.

    As the official SAF code computes it (``F.kl_div(log q, p).sum(-1) * T**2``) but with a stable
    log-softmax, and forward and gradient in one fused kernel.

    Args:
        logits: ``[B, C]`` current logits (float32, float16, bfloat16 or float64).
        target_logits: ``[B, C]`` logits recorded earlier (SAF) or of the EMA model (MESA); may have
            another float dtype than ``logits`` (e.g. a bfloat16 store). No gradient flows to it.
        temperature: ``T > 0``.
        reduction: ``"none"`` (per row), ``"sum"``, ``"mean"`` or ``"batchmean"`` -- the last two
            both average over rows (unlike ``F.kl_div``, whose ``mean`` averages over elements),
            and give 0 for an empty batch.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``; see :mod:`saf_kernels._backend`.

    Returns:
        The loss in ``logits.dtype`` (arithmetic in float32, or float64 for float64 inputs).

    NaN or inf in ``logits`` or ``target_logits`` makes that row's loss and gradient NaN (it is
    never masked).
    """
    fn = "saf_kernels.trajectory_kl_loss"
    _check_pair(logits, target_logits, fn)
    temperature = _check_real("temperature", temperature, fn, positive=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    impl = _backend.resolve(backend, logits.device, OP)
    if impl == "torch":
        return reference.trajectory_kl_loss(logits, target_logits, temperature, reduction)
    return _fused(impl, logits, target_logits, None, temperature, 0.0, 1.0, 0.0, -100,
                  "mean" if reduction == "batchmean" else reduction)


def saf_loss(logits: torch.Tensor, targets: torch.Tensor, target_logits: torch.Tensor, lam: float = 0.3,
             temperature: float = 5.0, label_smoothing: float = 0.0, ignore_index: int = -100,
             backend: str = "auto") -> torch.Tensor:
    """Cross-entropy plus ``lam`` times the trajectory loss, in one pass over the logits.

    ``CE(logits, targets; label_smoothing) + lam * T^2 * KL(softmax(target/T) || softmax(logits/T))``,
    both terms averaged over the rows that count. Each input is read once and the gradient w.r.t.
    ``logits`` is written by the same kernel.

    Args:
        logits: ``[B, C]`` current logits.
        targets: class indices ``[B]`` (int64/int32) in ``[0, C)`` or ``ignore_index``, or
            probability targets ``[B, C]`` (float32, float16, bfloat16 or float64; mixup, cutmix):
            then ``CE = -sum_c targets_c * log_softmax(logits)_c`` per row, as ``F.cross_entropy``
            with probability targets, every row counts, and label smoothing must already be folded
            into them (``label_smoothing`` must be 0). Rows need not sum to 1 (the gradient is
            ``sum(y) * softmax(z) - y``, as torch's). No gradient flows to ``targets``.
            Bad values: a label outside ``[0, C)`` raises ``IndexError``, and a negative or
            non-finite probability ``ValueError``, on the CPU kernel and the reference (CPU
            tensors); the GPU kernels cannot raise without a host synchronisation, so they make
            that row's loss and gradient NaN instead.
        target_logits: ``[B, C]`` past (SAF) or EMA-teacher (MESA) logits; no gradient flows to it.
        lam: weight of the trajectory term (paper: 0.3 for SAF, 0.8 for MESA).
        temperature: ``T > 0`` (paper: 5).
        label_smoothing: in ``[0, 1]``, applied to the cross-entropy with class indices only (as in
            the SAF code).
        ignore_index: label value of rows that contribute to neither term (class indices only). If
            every row is ignored the loss is 0 with zero gradient (``F.cross_entropy``: NaN).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

    Returns:
        Scalar loss in ``logits.dtype``.
    """
    fn = "saf_kernels.saf_loss"
    _check_pair(logits, target_logits, fn)
    lam = _check_real("lam", lam, fn)
    temperature = _check_real("temperature", temperature, fn, positive=True)
    label_smoothing = _check_real("label_smoothing", label_smoothing, fn, lo=0.0, hi=1.0)
    check_targets(targets, logits, ignore_index, label_smoothing, fn)
    targets = targets.detach()
    impl = _backend.resolve(backend, logits.device, OP)
    if impl == "torch":
        return reference.saf_loss(logits, targets, target_logits, lam, temperature, label_smoothing, ignore_index)
    return _fused(impl, logits, target_logits, targets, temperature, 1.0, lam, label_smoothing, ignore_index, "mean")
