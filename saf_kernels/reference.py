"""Plain-PyTorch version of every op: the tests' oracle, the ``backend="torch"`` path and the
benchmarks' eager baseline.

Written for clarity, not speed: stable ``log_softmax`` (never ``softmax().log()``), arithmetic in
float32 (float64 when an input is float64), loops over parameters where the fused kernels fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# Trajectory loss (SAF, MESA)
# --------------------------------------------------------------------------------------------


def trajectory_kl_rows(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``T^2 * KL(softmax(target/T) || softmax(logits/T))`` in the compute dtype.

    No gradient flows to ``target_logits``.
    """
    dt = _compute_dtype(logits, target_logits)
    log_q = F.log_softmax(logits.to(dt) / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.detach().to(dt) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (temperature * temperature)


def trajectory_kl_loss(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 5.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reference of :func:`saf_kernels.trajectory_kl_loss` (``mean`` and ``batchmean`` both
    average over rows; 0 for an empty batch)."""
    rows = trajectory_kl_rows(logits, target_logits, temperature)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif reduction in ("mean", "batchmean"):
        out = rows.sum() / max(rows.shape[0], 1)  # an empty batch gives 0, as saf_loss with no rows
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return out.to(logits.dtype)


def saf_loss_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_logits: torch.Tensor,
    lam: float,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
) -> torch.Tensor:
    """Per-row ``CE + lam * T^2 * KL`` (0 on rows whose label is ``ignore_index``)."""
    dt = _compute_dtype(logits, target_logits)
    z = logits.to(dt)
    valid = labels != ignore_index
    ce = F.cross_entropy(
        z, labels.long(), reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    rows = ce + lam * trajectory_kl_rows(z, target_logits, temperature)
    return torch.where(valid, rows, torch.zeros((), dtype=dt, device=rows.device))


def saf_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_logits: torch.Tensor,
    lam: float = 0.3,
    temperature: float = 5.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Reference of :func:`saf_kernels.saf_loss`: mean over non-ignored rows (0 if there are none)."""
    rows = saf_loss_rows(logits, labels, target_logits, lam, temperature, label_smoothing, ignore_index)
    n = (labels != ignore_index).sum().clamp(min=1)
    return (rows.sum() / n).to(logits.dtype)


def saf_official_loss(
    logits: torch.Tensor, labels: torch.Tensor, past_logits: torch.Tensor, lam: float, temperature: float
) -> torch.Tensor:
    """The loss exactly as the official SAF code writes it (SAF_train.py), for equivalence tests:
    ``CE + lam * F.kl_div(F.softmax(out/T).log(), F.softmax(past/T), reduction="none").sum(-1).mean() * T**2``.
    """
    T = temperature
    kl = F.kl_div(F.softmax(logits / T, dim=-1).log(), F.softmax(past_logits / T, dim=-1), reduction="none")
    return F.cross_entropy(logits, labels) + lam * kl.sum(-1).mean() * (T**2)


# --------------------------------------------------------------------------------------------
# Multi-tensor ops
# --------------------------------------------------------------------------------------------


def ema_update_(ema: list[torch.Tensor], model: list[torch.Tensor], decay: float | torch.Tensor) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every pair, in place (as ``lerp_``)."""
    for e, m in zip(ema, model):
        w = 1.0 - decay if not isinstance(decay, torch.Tensor) else (1.0 - decay).to(e.dtype)
        e.lerp_(m.to(e.dtype), w)
