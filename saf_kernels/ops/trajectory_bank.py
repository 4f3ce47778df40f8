"""The SAF trajectory bank's fused step: gather each sample's past logits by id, compute
``CE + lam * T^2 * KL`` and its gradient, and record the current logits, in one kernel (plus a
one-block pre-pass that counts), with no host synchronisation.

Layout and semantics: ``csrc/include/saf/trajectory_bank.h``; the user-facing class is
:class:`saf_kernels.TrajectoryBank` (``saf_kernels/saf.py``). Flow: public function ->
:func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.saf_bank_step`` (C++ CPU / CUDA,
autograd in ``csrc/autograd.cpp``) or ``saf_kernels::saf_bank_step_triton``
(``saf_kernels/triton/trajectory_bank.py``) or :func:`saf_kernels.reference.saf_bank_step`.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference
from . import _multi_tensor as mt
from .trajectory_loss import _check_real, check_targets

OP = "saf_bank_step"
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_SIZE = 8  # csrc/include/saf/trajectory_bank.h: kBankStateSize


# --------------------------------------------------------------------------------------------
# Registration: fake kernels (torch.compile) for the C++ and Triton ops; the Triton ops' autograd
# is a torch.autograd.Function below (custom ops that mutate their inputs cannot take a
# register_autograd formula on every torch this package supports).
# --------------------------------------------------------------------------------------------


def _fake_step(logits, labels, ids, values, epochs, claims, state, epoch, temperature, ce_weight, kl_weight,
               label_smoothing, ignore_index, use_past, record, need_grad):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty((), dtype=acc)
    grad = torch.empty(logits.shape if need_grad else (0,), dtype=logits.dtype, device=logits.device)
    counts = logits.new_empty((2,), dtype=torch.int64)
    return loss, grad, counts


mt.register(OP,
            "(Tensor logits, Tensor? labels, Tensor ids, Tensor(a3!) values, Tensor(a4!) epochs, Tensor(a5!) claims, "
            "Tensor(a6!) state, SymInt epoch, float temperature, float ce_weight, float kl_weight, "
            "float label_smoothing, SymInt ignore_index, bool use_past, bool record, bool need_grad) -> (Tensor, "
            "Tensor, Tensor)",
            _fake_step, "trajectory_bank.bank_step_triton")
mt.register("saf_bank_record",
            "(Tensor rows, Tensor ids, Tensor(a2!) values, Tensor(a3!) epochs, Tensor(a4!) claims, Tensor(a5!) state, "
            "SymInt epoch) -> ()",
            mt.void_fake, "trajectory_bank.bank_record_triton")


class _TritonBankStep(torch.autograd.Function):
    """Backward of the Triton step: the gradient it wrote, times grad_output (as the C++ op's)."""

    @staticmethod
    def forward(ctx, logits, labels, ids, values, epochs, claims, state, epoch, temperature, ce_weight, kl_weight,
                label_smoothing, ignore_index, use_past, record):
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad, counts = torch.ops.saf_kernels.saf_bank_step_triton(
            logits, labels, ids, values, epochs, claims, state, epoch, temperature, ce_weight, kl_weight,
            label_smoothing, ignore_index, use_past, record, need_grad,
        )
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(grad)
        return loss, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_counts):
        (grad,) = ctx.saved_tensors
        out = torch.empty_like(grad)
        torch.mul(grad, grad_loss, out=out)
        return (out,) + (None,) * 14


def fused_ops() -> dict[str, object]:
    """The raw fused step op of each kernel backend available here (``cpu``/``cuda`` share the C++ op)."""
    return mt.kernels(OP)


def record_ops() -> dict[str, object]:
    return mt.kernels("saf_bank_record")


# --------------------------------------------------------------------------------------------
# Input checks (metadata only: no host synchronisation)
# --------------------------------------------------------------------------------------------


def _storage_ok(t: torch.Tensor, device: torch.device) -> bool:
    if t.device == device:
        return True
    # Pinned host memory serves CUDA logits through unified virtual addressing.
    return device.type == "cuda" and t.device.type == "cpu" and t.is_pinned()


def check_bank_tensors(values, epochs, claims, state, classes: int, device: torch.device, fn: str) -> None:
    """Raise a clear error unless the four bank tensors fit ``classes``-wide logits on ``device``."""
    for name, t in (("values", values), ("epochs", epochs), ("claims", claims), ("state", state)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: bank {name} must be a torch.Tensor, got {type(t).__name__}")
    if values.dim() != 3 or values.dtype not in BANK_DTYPES or not values.is_contiguous():
        raise ValueError(f"{fn}: bank values must be a contiguous float32/bfloat16/float16 tensor "
                         f"[num_samples, delay, classes], got {values.dtype} {tuple(values.shape)}")
    N, S, C = values.shape
    if C != classes:
        raise ValueError(f"{fn}: the bank holds {C} classes but the logits have {classes}")
    if S < 1:
        raise ValueError(f"{fn}: the bank needs at least one slot (delay >= 1), got shape {tuple(values.shape)}")
    if epochs.dtype != torch.int32 or tuple(epochs.shape) != (N, S) or not epochs.is_contiguous():
        raise ValueError(f"{fn}: bank epochs must be a contiguous int32 tensor of shape ({N}, {S}), "
                         f"got {epochs.dtype} {tuple(epochs.shape)}")
    if claims.dtype != torch.int32 or tuple(claims.shape) != (N,) or not claims.is_contiguous():
        raise ValueError(f"{fn}: bank claims must be a contiguous int32 tensor of shape ({N},), "
                         f"got {claims.dtype} {tuple(claims.shape)}")
    if state.dtype != torch.int64 or tuple(state.shape) != (STATE_SIZE,):
        raise ValueError(f"{fn}: bank state must be an int64 tensor of shape ({STATE_SIZE},), "
                         f"got {state.dtype} {tuple(state.shape)}")
    if not (_storage_ok(values, device) and _storage_ok(epochs, device)):
        raise ValueError(f"{fn}: bank values ({values.device}) and epochs ({epochs.device}) must be on the "
                         f"logits' device ({device}) or, for CUDA logits, in pinned host memory")
    if claims.device != device or state.device != device:
        raise ValueError(f"{fn}: bank claims ({claims.device}) and state ({state.device}) must be on the "
                         f"logits' device ({device})")


def _check_index_tensor(name, t, rows, device, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: {name} must be int64 or int32, got {t.dtype}")
    if tuple(t.shape) != (rows,):
        raise ValueError(f"{fn}: {name} must have shape ({rows},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} are on {t.device} but logits are on {device}")


def check_epoch(epoch, fn: str) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or not (0 <= epoch < 2**31 - 1):
        raise ValueError(f"{fn}: epoch must be an int in [0, 2**31 - 1) (0-based), got {epoch!r}")
    return int(epoch)


def _check_logits(logits, fn):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in mt.FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits must be 2-D [batch, classes] with classes > 0, got shape "
                         f"{tuple(logits.shape)}")


def _resolve(backend: str, device: torch.device, values: torch.Tensor, fn: str) -> str:
    impl = _backend.resolve(backend, device, OP)
    if values.device != device and impl != "cuda":
        # Only the CUDA kernels are written to reach pinned host memory (through UVA); Triton's
        # launcher and the reference's indexing want device tensors.
        raise _backend.BackendUnavailable(
            f"{fn}: a bank in pinned host memory needs the CUDA kernels (backend 'cuda'), not {impl!r}"
            + ("" if impl != "triton" else "; build saf_kernels._C with CUDA")
        )
    return impl


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def trajectory_bank_step(logits: torch.Tensor, targets: torch.Tensor | None, ids: torch.Tensor, values: torch.Tensor,
                         epochs: torch.Tensor, claims: torch.Tensor, state: torch.Tensor, epoch: int, lam: float = 0.3,
                         temperature: float = 5.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                         use_past: bool = True, record: bool = True,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One SAF step against a trajectory bank, fused: gather, loss and gradient, record.

    ``loss = CE_sum / n + lam * T^2 * KL_sum / m`` where n counts the rows whose label is not
    ``ignore_index`` (all rows with probability targets, or if ``targets`` is None, which drops the
    CE term) and m the rows that also have a past entry: slot ``epoch % delay`` of their sample
    tagged ``epoch - delay``. 0/0 is 0. With ``use_past=False`` there is no KL term (m = 0). With
    ``record`` the logits (rounded to the bank dtype) and tag ``epoch`` are written into those slots
    after they have been read. A row in neither term (no targets, no past entry) contributes 0 loss
    and 0 gradient whatever its values (NaN included); its logits are still recorded.

    Args:
        logits: ``[B, C]`` current logits; gradients flow to them only.
        targets: ``[B]`` class indices or ``ignore_index``, ``[B, C]`` probability targets (as
            :func:`saf_kernels.saf_loss`), or None (KL term only).
        ids: ``[B]`` global sample ids in ``[0, N)``, each at most once per batch.
        values, epochs, claims, state: the bank's tensors (:class:`saf_kernels.TrajectoryBank`).
        epoch: the 0-based epoch.
        lam, temperature, label_smoothing, ignore_index: as :func:`saf_kernels.saf_loss`.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

    Returns:
        ``(loss, counts)``: the loss in ``logits.dtype`` and an int64 device tensor ``[n, m]``.

    Bad ids, labels and probabilities: the ``cpu`` and ``torch`` backends raise (``IndexError`` for
    an id or label out of range, ``ValueError`` for an id twice in the batch or a negative or
    non-finite probability) before touching the bank. The ``cuda`` and ``triton`` kernels
    cannot raise without a host synchronisation: they skip those rows (no read, no write, no KL
    term; CE still counts) and set flags in ``state``, which :meth:`TrajectoryBank.check_errors`
    turns into the same exceptions.
    """
    fn = "saf_kernels.trajectory_bank_step"
    _check_logits(logits, fn)
    B, C = logits.shape
    _check_index_tensor("sample ids", ids, B, logits.device, fn)
    check_bank_tensors(values, epochs, claims, state, C, logits.device, fn)
    epoch = check_epoch(epoch, fn)
    lam = _check_real("lam", lam, fn)
    temperature = _check_real("temperature", temperature, fn, positive=True)
    label_smoothing = _check_real("label_smoothing", label_smoothing, fn, lo=0.0, hi=1.0)
    if targets is not None:
        check_targets(targets, logits, ignore_index, label_smoothing, fn)
        targets = targets.detach()
    elif isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    for name, flag in (("use_past", use_past), ("record", record)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    impl = _resolve(backend, logits.device, values, fn)
    if impl == "torch":
        loss, counts = reference.saf_bank_step(logits, targets, ids, values, epochs, epoch, temperature, 1.0, lam,
                                               label_smoothing, int(ignore_index), use_past, record)
        return loss.to(logits.dtype), counts
    args = (targets, ids, values, epochs, claims, state, epoch, temperature, 1.0, lam, label_smoothing,
            int(ignore_index), bool(use_past), bool(record))
    if impl == "triton":
        loss, counts = _TritonBankStep.apply(logits, *args)
    else:
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, _, counts = torch.ops.saf_kernels.saf_bank_step(logits, *args, need_grad)
    return loss.to(logits.dtype), counts


@torch.no_grad()
def trajectory_bank_record(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, epochs: torch.Tensor,
                           claims: torch.Tensor, state: torch.Tensor, epoch: int, backend: str = "auto") -> None:
    """Write ``rows`` (rounded to the bank dtype) into slot ``epoch % delay`` of their samples, tagged
    ``epoch``: how a distributed bank takes the rows other ranks recorded.

    An id held by several rows records none of them (``DistributedSampler`` pads an epoch with a
    few repeated samples; every rank skips them alike). An id out of range raises on the ``cpu``
    and ``torch`` backends and sets the bank's error flag on ``cuda`` and ``triton``.
    """
    fn = "saf_kernels.trajectory_bank_record"
    _check_logits(rows, fn)
    _check_index_tensor("sample ids", ids, rows.shape[0], rows.device, fn)
    check_bank_tensors(values, epochs, claims, state, rows.shape[1], rows.device, fn)
    epoch = check_epoch(epoch, fn)
    impl = _resolve(backend, rows.device, values, fn)
    if impl == "torch":
        reference.saf_bank_record(rows, ids, values, epochs, epoch)
    else:
        record_ops()[impl](rows.detach(), ids, values, epochs, claims, state, epoch)
