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


# --------------------------------------------------------------------------------------------
# SAF trajectory bank (layout: csrc/include/saf/trajectory_bank.h)
# --------------------------------------------------------------------------------------------


def _bank_check_ids(ids: torch.Tensor, num_samples: int, fn: str, duplicates_are_errors: bool) -> torch.Tensor:
    """Raise for ids out of range (and, if asked, repeated); return which rows hold a unique id.

    Host-synchronising: this is the oracle and the fallback, not the fast path.
    """
    bad = (ids < 0) | (ids >= num_samples)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"{fn}: sample id {int(ids[i])} of row {i} is outside the bank's range [0, {num_samples})")
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    if duplicates_are_errors and bool(repeated.any()):
        rows = repeated.nonzero()[:, 0]
        dup = int(ids[rows[0]])
        where = (ids == dup).nonzero()[:, 0].tolist()
        raise ValueError(f"{fn}: sample id {dup} appears in rows {where[0]} and {where[1]} of one batch; a sample "
                         "may be seen once per step (and should be seen once per epoch)")
    return ~repeated


def saf_bank_step(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    ids: torch.Tensor,
    values: torch.Tensor,
    epochs: torch.Tensor,
    epoch: int,
    temperature: float,
    ce_weight: float,
    kl_weight: float,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    use_past: bool = True,
    record: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank step unfused: gather the past rows, the loss (autograd), scatter the logits.

    ``loss = ce_weight * sum(CE) / n + kl_weight * T^2 * sum(KL over rows with a past entry) / m``;
    returns ``(loss in the compute dtype, int64 tensor [n, m])``. Raises before touching the bank
    for an id out of range, an id twice in the batch, or a label out of range.
    """
    fn = "saf_kernels.saf_bank_step"
    N, S, C = values.shape
    slot = epoch % S
    ids = ids.long()
    _bank_check_ids(ids, N, fn, duplicates_are_errors=True)
    if labels is not None:
        labels = labels.long()
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= C))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"{fn}: label {int(labels[i])} of row {i} is outside [0, {C}) and is not ignore_index "
                             f"({ignore_index})")
        labelled = labels != ignore_index
    else:
        labelled = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    past = values[ids, slot]  # gather
    tags = epochs[ids, slot]
    if use_past and epoch >= S:
        has = labelled & (tags == epoch - S)
    else:
        has = torch.zeros_like(labelled)
    n, m = labelled.sum(), has.sum()
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dt)
    loss = torch.zeros((), dtype=dt, device=logits.device)
    if labels is not None:
        ce = F.cross_entropy(z, labels, reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index)
        loss = loss + ce_weight * ce.sum() / n.clamp(min=1)
    # Rows without a past entry never read their slot (it may hold anything, NaN included).
    target = torch.where(has[:, None], past.to(dt), torch.zeros((), dtype=dt, device=past.device))
    kl = torch.where(has, trajectory_kl_rows(z, target, temperature), torch.zeros((), dtype=dt, device=z.device))
    loss = loss + kl_weight * kl.sum() / m.clamp(min=1)
    if record:
        with torch.no_grad():
            values[ids, slot] = logits.detach().to(values.dtype)  # scatter
            epochs[ids, slot] = epoch
    return loss, torch.stack([n, m])


@torch.no_grad()
def saf_bank_record(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, epochs: torch.Tensor,
                    epoch: int) -> None:
    """Write rows into slot ``epoch % delay`` of their samples, tagged ``epoch``; ids held by
    several rows are skipped, ids out of range raise."""
    N, S, _ = values.shape
    ids = ids.long()
    keep = _bank_check_ids(ids, N, "saf_kernels.saf_bank_record", duplicates_are_errors=False)
    slot = epoch % S
    values[ids[keep], slot] = rows[keep].to(values.dtype)
    epochs[ids[keep], slot] = epoch
# SAM family (sam_perturb_, sam_restore_, fused restore + SGD / AdamW). Per-tensor arguments
# are sequences with one value per tensor. No host synchronisation: the AMP scale, found_inf
# and the "perturb nothing" decision stay tensors.
# --------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sam_scaled_grads(params, grads, adaptive, eta):
    """``T * g`` per tensor in the accumulation dtype, ``T = |w| + eta`` where adaptive, else 1."""
    out = []
    for p, g, a, et in zip(params, grads, adaptive, eta):
        x = g.to(_acc(p))
        if a:
            x = x * (p.to(_acc(p)).abs() + et)
        out.append(x)
    return out


def sam_perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    stash: list[torch.Tensor],
    rho: list[float],
    adaptive: list[bool],
    eta: list[float],
    eps: float = 1e-12,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    stash_mode: str = "copy",
) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.sam_perturb_`: global norm of ``T * g`` over every
    tensor, then ``w += rho * T^2 * g / (norm + eps)`` (``g`` unscaled by ``grad_scale``), with the
    stash written. A non-finite norm or ``found_inf > 0`` perturbs nothing. Returns the norm."""
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    dev = params[0].device
    scaled = sam_scaled_grads(params, grads, adaptive, eta)
    sumsq = sum((x.double() ** 2).sum() for x in scaled)
    inv = torch.ones((), dtype=torch.float64, device=dev) if grad_scale is None else 1.0 / grad_scale.double()
    norm = sumsq.sqrt() * inv
    ok = torch.isfinite(norm)
    if found_inf is not None:
        ok = ok & (found_inf <= 0)
    coef = torch.where(ok, inv / (norm + eps), torch.zeros_like(norm))
    for p, g, s, r, a, et in zip(params, grads, stash, rho, adaptive, eta):
        dt = _acc(p)
        w = p.to(dt)
        t = (w.abs() + et) if a else torch.ones((), dtype=dt, device=dev)
        e = (r * coef).to(dt) * (t * t) * g.to(dt)
        e = torch.where(ok, e, torch.zeros((), dtype=dt, device=dev))
        if stash_mode == "copy":
            s.copy_(p)
        else:
            s.copy_(e)
            e = s.to(dt)  # add exactly what the restore subtracts
        p.copy_(torch.where(ok, w + e, w))
    return norm.to(acc)


def sam_restore_(params: list[torch.Tensor], stash: list[torch.Tensor], stash_mode: str = "copy") -> None:
    """Reference of :func:`saf_kernels.ops.sam_restore_` (copy: bit exact; delta: ``w - e``)."""
    for p, s in zip(params, stash):
        if stash_mode == "copy":
            p.copy_(s)
        else:
            p.copy_(p.to(_acc(p)) - s.to(_acc(p)))


def _restored(p, s, stash_mode):
    return s.to(_acc(p)) if stash_mode == "copy" else p.to(_acc(p)) - s.to(_acc(p))


def sam_restore_sgd_(params, grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
                     maximize, first_run, stash_mode="copy", grad_scale=None, found_inf=None) -> None:
    """Reference of :func:`saf_kernels.ops.sam_restore_sgd_`: restore, then torch.optim.SGD's
    update on the restored weights with ``g / grad_scale``; ``found_inf > 0`` restores only."""
    skip = None if found_inf is None else found_inf > 0
    for i, (p, g, s) in enumerate(zip(params, grads, stash)):
        dt = _acc(p)
        w = _restored(p, s, stash_mode)
        d = g.to(dt) if grad_scale is None else g.to(dt) / grad_scale.to(dt)
        if maximize[i]:
            d = -d
        if weight_decay[i] != 0:
            d = d + weight_decay[i] * w
        if momentum[i] != 0:
            b = momentum_buffers[i]
            nb = d if first_run[i] else b.to(dt) * momentum[i] + (1 - dampening[i]) * d
            d = d + momentum[i] * nb if nesterov[i] else nb
            b.copy_(nb if skip is None else torch.where(skip, b.to(dt), nb))
        new = w - lr[i] * d
        if skip is not None:
            new = torch.where(skip, w, new)
        p.copy_(new)


def sam_restore_adamw_(params, grads, stash, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps, weight_decay,
                       maximize, stash_mode="copy", grad_scale=None, found_inf=None) -> None:
    """Reference of :func:`saf_kernels.ops.sam_restore_adamw_`: restore, then torch.optim.AdamW's
    update (no amsgrad); ``steps`` already count this step; ``found_inf > 0`` restores only."""
    skip = None if found_inf is None else found_inf > 0
    for i, (p, g, s, m, v, st) in enumerate(zip(params, grads, stash, exp_avg, exp_avg_sq, steps)):
        dt = _acc(p)
        w = _restored(p, s, stash_mode)
        d = g.to(dt) if grad_scale is None else g.to(dt) / grad_scale.to(dt)
        if maximize[i]:
            d = -d
        step = st.to(torch.float64)
        bc1 = 1 - beta1[i] ** step
        bc2_sqrt = (1 - beta2[i] ** step).sqrt()
        w2 = w * (1 - lr[i] * weight_decay[i])
        nm = m.to(dt).lerp(d, 1 - beta1[i])
        nv = v.to(dt) * beta2[i] + (1 - beta2[i]) * d * d
        new = w2 - (lr[i] / bc1).to(dt) * (nm / (nv.sqrt() / bc2_sqrt.to(dt) + eps[i]))
        if skip is not None:
            new = torch.where(skip, w, new)
            nm = torch.where(skip, m.to(dt), nm)
            nv = torch.where(skip, v.to(dt), nv)
        m.copy_(nm)
        v.copy_(nv)
        p.copy_(new)
