"""Plain-PyTorch version of every op: the tests' oracle, the ``backend="torch"`` path and the
benchmarks' eager baseline.

Written for clarity, not speed: stable ``log_softmax`` (never ``softmax().log()``), arithmetic in
float32 (float64 when an input is float64), loops over parameters where the fused kernels fuse.
"""

from __future__ import annotations

import math

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


def check_probabilities(targets: torch.Tensor, fn: str) -> None:
    """Raise ``ValueError`` for a negative or non-finite probability target, on CPU tensors only
    (elsewhere the check would be a host synchronisation: those rows become NaN instead)."""
    if targets.device.type != "cpu":
        return
    bad = (targets < 0) | ~torch.isfinite(targets)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{fn}: probability targets must be finite and >= 0; row {r} holds "
                         f"{float(targets[r, c]):g} at column {c}")  # as the C++ kernels print it


def ce_rows(z: torch.Tensor, targets: torch.Tensor, label_smoothing: float, ignore_index: int,
            fn: str = "saf_kernels.saf_loss") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``z`` (already in the compute dtype) and which rows count.

    ``targets``: class indices ``[B]`` (rows equal to ``ignore_index`` count for nothing) or
    probabilities ``[B, C]`` (every row counts; ``-sum(y * log_softmax(z))``, as
    ``F.cross_entropy`` with probability targets; a row with a negative or non-finite
    probability raises on CPU tensors and is NaN elsewhere). Rows that do not count are masked
    before the softmax, so that neither their loss nor their gradient sees their values.
    """
    if targets.is_floating_point():
        if label_smoothing != 0:
            raise ValueError(f"{fn}: label_smoothing ({label_smoothing}) applies to class-index labels; fold it into "
                             "the probability targets")
        check_probabilities(targets, fn)
        y = targets.to(z.dtype)
        bad = ((y < 0) | ~torch.isfinite(y)).any(-1)
        ce = F.cross_entropy(z, y, reduction="none")
        ce = torch.where(bad, torch.full((), float("nan"), dtype=z.dtype, device=z.device), ce)
        return ce, torch.ones(z.shape[:1], dtype=torch.bool, device=z.device)
    valid = targets != ignore_index
    zs = torch.where(valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
    ce = F.cross_entropy(zs, targets.long(), reduction="none", label_smoothing=label_smoothing,
                         ignore_index=ignore_index)
    return ce, valid


def saf_loss_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_logits: torch.Tensor,
    lam: float,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
) -> torch.Tensor:
    """Per-row ``CE + lam * T^2 * KL`` (0, with no gradient, on rows whose label is
    ``ignore_index``). ``labels`` are class indices ``[B]`` or probability targets ``[B, C]``."""
    dt = _compute_dtype(logits, target_logits)
    z = logits.to(dt)
    ce, valid = ce_rows(z, labels, label_smoothing, ignore_index)
    zs = torch.where(valid[:, None], z, torch.zeros((), dtype=dt, device=z.device))
    rows = ce + lam * trajectory_kl_rows(zs, target_logits, temperature)
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
    """Reference of :func:`saf_kernels.saf_loss`: mean over the rows that count (every row with
    probability targets; those not ``ignore_index`` with class labels; 0 if there are none)."""
    rows = saf_loss_rows(logits, labels, target_logits, lam, temperature, label_smoothing, ignore_index)
    if labels.is_floating_point():
        n = torch.full((), rows.shape[0], device=rows.device)
    else:
        n = (labels != ignore_index).sum()
    return (rows.sum() / n.clamp(min=1)).to(logits.dtype)


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
        # A tensor decay: 1 - decay in the wider of its dtype and the EMA's (as the kernels), then
        # rounded to the EMA's dtype (lerp_ takes a weight of its own dtype).
        w = 1.0 - decay if not isinstance(decay, torch.Tensor) else (
            1.0 - decay.to(torch.promote_types(decay.dtype, e.dtype))).to(e.dtype)
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
    soft = labels is not None and labels.is_floating_point()
    if soft:
        check_probabilities(labels.cpu(), fn)
        labelled = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    elif labels is not None:
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
        ce, _ = ce_rows(z, labels, label_smoothing, ignore_index, fn)
        loss = loss + ce_weight * ce.sum() / n.clamp(min=1)
    # Rows without a past entry never read their slot (it may hold anything, NaN included), and a
    # row in neither term is not read at all: its loss and gradient are 0 whatever its values.
    target = torch.where(has[:, None], past.to(dt), torch.zeros((), dtype=dt, device=past.device))
    zk = torch.where(has[:, None], z, torch.zeros((), dtype=dt, device=z.device))
    kl = torch.where(has, trajectory_kl_rows(zk, target, temperature), torch.zeros((), dtype=dt, device=z.device))
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



def ascent_coef(sumsq, grad_scale, found_inf, eps, dev):
    """From the float64 sum of squares of the (scaled) ascent direction: its norm unscaled by
    ``grad_scale``, whether to perturb (a finite, non-zero norm and no ``found_inf``) and the
    coefficient ``1 / scale / (norm + eps)`` (0 where not)."""
    inv = torch.ones((), dtype=torch.float64, device=dev) if grad_scale is None else 1.0 / grad_scale.double()
    norm = sumsq.sqrt() * inv
    ok = torch.isfinite(norm) & (norm > 0)  # a zero norm perturbs nothing, whatever eps
    if found_inf is not None:
        ok = ok & (found_inf <= 0)
    return norm, ok, torch.where(ok, inv / (norm + eps), torch.zeros_like(norm))

def sam_scaled_grads(params, grads, adaptive, eta):
    """``T * g`` per tensor in the accumulation dtype, ``T = |w| + eta`` where adaptive, else 1."""
    out = []
    for p, g, a, et in zip(params, grads, adaptive, eta):
        x = g.to(_acc(p))
        if a:
            x = x * (p.to(_acc(p)).abs() + et)
        out.append(x)
    return out


def sam_sumsq(params, grads, adaptive, eta) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.sam_sumsq`: ``sum((T * g)^2)`` over every tensor, a
    0-dim float64 tensor (in the gradients' units, scaled as given)."""
    dev = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for x in sam_scaled_grads(params, grads, adaptive, eta):
        total = total + (x.double() ** 2).sum()
    return total


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
    sumsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.sam_perturb_`: global norm of ``T * g`` over every
    tensor, then ``w += rho * T^2 * g / (norm + eps)`` (``g`` unscaled by ``grad_scale``), with the
    stash written. A non-finite norm or ``found_inf > 0`` perturbs nothing. Returns the norm.
    ``sumsq`` (sharded training): the sum of squares over every shard, used instead of this list's."""
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    dev = params[0].device
    total = sam_sumsq(params, grads, adaptive, eta) if sumsq is None else sumsq.double().reshape(())
    norm, ok, coef = ascent_coef(total, grad_scale, found_inf, eps, dev)
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


# --------------------------------------------------------------------------------------------
# ESAM, R-SAM, GSAM. Random numbers: Philox4x32-10 exactly as csrc/include/saf/philox.h (and
# Triton's tl.randint4x), here in int64 torch arithmetic (every product split so that nothing
# overflows), so the oracle runs on any device without the extension. Positions follow each
# tensor's memory order, and every tensor's first position is padded to a multiple of 4.
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
BERNOULLI_BITS = 24


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of the 64-bit product of the constant a and the 32-bit words b (int64)."""
    p0 = b * (a & 0xFFFF)  # < 2^48
    p1 = b * (a >> 16)  # < 2^48
    mid = p0 + ((p1 & 0xFFFF) << 16)  # < 2^49
    return (p1 >> 16) + (mid >> 32), mid & _M32


def philox4x32_10(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """The 4 words of each counter (int64 >= 0), key = the seed's 64 bits; shape [..., 4] int64."""
    key = seed & ((1 << 64) - 1)
    k0, k1 = key & _M32, key >> 32
    c0 = counters & _M32
    c1 = (counters >> 32) & _M32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words(positions: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """The word of each position: word ``pos % 4`` of counter ``offset + pos // 4``."""
    w = philox4x32_10(offset + positions // 4, seed)
    return w.gather(-1, (positions % 4).unsqueeze(-1)).squeeze(-1)


def philox_range(start: int, n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The words of the contiguous positions ``[start, start + n)`` (one Philox evaluation per
    counter, 4 positions each), int64."""
    first, last = start // 4, (start + max(n, 1) - 1) // 4
    ctr = offset + torch.arange(first, last + 1, device=device, dtype=torch.int64)
    words = philox4x32_10(ctr, seed).reshape(-1)
    return words[start - 4 * first:start - 4 * first + n]


def philox_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: float32 in [0, 1), bit for bit."""
    i = torch.where(words >= 2**31, (2**32 - 1) - words, words)
    return i.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=words.device)


def philox_keep(positions: torch.Tensor, seed: int, offset: int, beta) -> torch.Tensor:
    """Bernoulli(beta) decisions of positions (bool): top 24 bits < round-down(beta * 2^24)."""
    thr = bernoulli_threshold(beta)
    return (philox_words(positions, seed, offset) >> (32 - BERNOULLI_BITS)) < thr


def bernoulli_threshold(p: float) -> int:
    if not p > 0:
        return 0
    return 1 << BERNOULLI_BITS if p >= 1 else int(p * (1 << BERNOULLI_BITS))


def philox_normal(positions: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """Standard normals of positions in float64 (Triton's randn4x: Box-Muller on words (0, 1) and
    (2, 3) of each counter), from the same float32 uniforms and angle as the kernels; the kernels'
    float32 log / cos / sin agree with this to a few float32 ulps."""
    w = philox4x32_10(offset + positions // 4, seed)
    lane = positions % 4
    pair = lane // 2
    a = w.gather(-1, (2 * pair).unsqueeze(-1)).squeeze(-1)
    b = w.gather(-1, (2 * pair + 1).unsqueeze(-1)).squeeze(-1)
    u1 = philox_uniform(a).clamp(min=1.0e-7).double()
    th = (torch.tensor(6.2831855, dtype=torch.float32, device=w.device) * philox_uniform(b)).double()
    r = torch.sqrt(-2.0 * torch.log(u1))
    return torch.where(lane % 2 == 0, r * torch.cos(th), r * torch.sin(th))


def philox_(out: torch.Tensor, seed: int, offset: int = 0, kind: str = "normal", p: float = 0.5) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.philox_` (positions = flat indices of ``out``)."""
    pos = torch.arange(out.numel(), device=out.device, dtype=torch.int64)
    if kind == "words":
        v = philox_words(pos, seed, offset)
    elif kind == "uniform":
        v = philox_uniform(philox_words(pos, seed, offset))
    elif kind == "normal":
        v = philox_normal(pos, seed, offset)
    else:
        v = philox_keep(pos, seed, offset, p)
    out.copy_(v.view(out.shape))
    return out


def rng_bases(params: list[torch.Tensor]) -> list[int]:
    """First position of each tensor in a list: element counts padded to multiples of 4."""
    out, off = [], 0
    for p in params:
        out.append(off)
        off += (p.numel() + 3) // 4 * 4
    return out


def flat_memory(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (the kernels' element order)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def esam_keep_masks(params: list[torch.Tensor], beta: list[float], seed: int, offset: int) -> list[torch.Tensor]:
    """ESAM's elementwise keep mask of each tensor, flat in memory order."""
    out = []
    for p, base, b in zip(params, rng_bases(params), beta):
        words = philox_range(base, p.numel(), seed, offset, p.device)
        out.append((words >> (32 - BERNOULLI_BITS)) < bernoulli_threshold(b))
    return out


def esam_sumsq(params, grads, adaptive, eta, beta, seed, offset=0) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.esam_sumsq`: ``sum((keep * T * g)^2)`` over every
    tensor, a 0-dim float64 tensor (in the gradients' units, scaled as given)."""
    dev = params[0].device if params else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    masks = esam_keep_masks(params, beta, seed, offset)
    scaled = sam_scaled_grads(params, grads, adaptive, eta)
    return sum((torch.where(m, flat_memory(x).double() ** 2, zero).sum() for m, x in zip(masks, scaled)), zero)


def esam_perturb_(params, grads, stash, rho, adaptive, eta, beta, seed, offset=0, eps=1e-7, grad_scale=None,
                  found_inf=None, stash_mode="copy", sumsq=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.esam_perturb_`: keep ~ Bernoulli(beta) per element;
    norm of the kept ``T * g``; ``w += keep * rho / beta * T^2 * g / (norm + eps)``. ``sumsq``
    (sharded training): the sum of squares over every shard, used instead of this list's."""
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    dev = params[0].device
    masks = esam_keep_masks(params, beta, seed, offset)
    if sumsq is None:
        total = esam_sumsq(params, grads, adaptive, eta, beta, seed, offset)
    else:
        total = sumsq.double().reshape(())
    norm, ok, coef = ascent_coef(total, grad_scale, found_inf, eps, dev)
    for p, g, s, r, a, et, b, m in zip(params, grads, stash, rho, adaptive, eta, beta, masks):
        dt = _acc(p)
        w = flat_memory(p).to(dt)
        t = (w.abs() + et) if a else torch.ones((), dtype=dt, device=dev)
        e = (r / b * coef).to(dt) * (t * t) * flat_memory(g).to(dt)
        e = torch.where(ok & m, e, torch.zeros((), dtype=dt, device=dev))
        if stash_mode == "copy":
            flat_memory(s).copy_(flat_memory(p))
        else:
            flat_memory(s).copy_(e)
            e = flat_memory(s).to(dt)
        flat_memory(p).copy_(torch.where(ok & m, w + e, w))
    return norm.to(acc)


def esam_restore_(params, stash, beta, seed, offset=0, stash_mode="copy") -> None:
    """Reference of :func:`saf_kernels.ops.esam_restore_` (delta mode: the regenerated mask's
    elements only)."""
    if stash_mode == "copy":
        sam_restore_(params, stash, "copy")
        return
    for p, s, m in zip(params, stash, esam_keep_masks(params, beta, seed, offset)):
        dt = _acc(p)
        w = flat_memory(p).to(dt)
        flat_memory(p).copy_(torch.where(m, w - flat_memory(s).to(dt), w))


def sds_select(loss_before: torch.Tensor, loss_after: torch.Tensor, gamma: float) -> torch.Tensor:
    """ESAM's sharpness-sensitive data selection, plainly: the indices of the ``ceil(gamma * B)``
    (at least 1) largest ``loss_after - loss_before`` (in float32, a NaN difference ranked last, below -inf),
    sorted."""
    import math

    B = loss_before.numel()
    k = min(B, max(1, math.ceil(round(gamma * B, 9))))
    diff = loss_after.float() - loss_before.float()
    # NaN below everything, -inf included (as the lowest float32 above it).
    diff = torch.nan_to_num(diff, nan=-math.inf, neginf=torch.finfo(torch.float32).min, posinf=math.inf)
    return torch.sort(torch.topk(diff, k).indices).values


def rsam_unit_scales(params: list[torch.Tensor], std: list[float]) -> list[torch.Tensor]:
    """R-SAM's per-element noise scale ``std * ||W[j, ...]||`` (flat, memory order, float64);
    tensors with fewer than 2 dims use ``std * (||p|| + 1e-16)``."""
    out = []
    for p, s in zip(params, std):
        x = flat_memory(p.detach()).double()
        if p.dim() < 2 or p.numel() == 0:
            out.append((s * (x.norm() + 1e-16)).expand(p.numel()))
            continue
        rows = x.view(p.shape[0], -1)
        out.append((s * rows.norm(dim=1, keepdim=True)).expand_as(rows).reshape(-1))
    return out


def rsam_noise(params: list[torch.Tensor], std: list[float], seed: int, offset: int = 0) -> list[torch.Tensor]:
    """R-SAM's noise delta of each tensor (float64, flat in memory order)."""
    out = []
    for p, base, sc in zip(params, rng_bases(params), rsam_unit_scales(params, std)):
        pos = base + torch.arange(p.numel(), device=p.device, dtype=torch.int64)
        out.append(sc * philox_normal(pos, seed, offset))
    return out


def rsam_noise_(params, stash, std, seed, offset=0) -> None:
    """Reference of :func:`saf_kernels.ops.rsam_noise_`: stash = w; w += delta."""
    for p, s, d in zip(params, stash, rsam_noise(params, std, seed, offset)):
        flat_memory(s).copy_(flat_memory(p))
        flat_memory(p).copy_(flat_memory(p).to(_acc(p)) + d.to(_acc(p)))


def _rsam_directions(params, grads, stash, lam, grad_scale) -> list[torch.Tensor]:
    dev = params[0].device if params else torch.device("cpu")
    inv = torch.ones((), dtype=torch.float64, device=dev) if grad_scale is None else 1.0 / grad_scale.double()
    return [lam * g.to(_acc(p)) * inv.to(_acc(p)) + (p.to(_acc(p)) - s.to(_acc(p)))
            for p, g, s in zip(params, grads, stash)]


def rsam_sumsq(params, grads, stash, lam=2.0, grad_scale=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.rsam_sumsq`: ``sum(d^2)``, ``d = lam * g + (w - stash)``
    (unscaled), a 0-dim float64 tensor."""
    zero = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    return sum(((d.double() ** 2).sum() for d in _rsam_directions(params, grads, stash, lam, grad_scale)), zero)


def rsam_perturb_(params, grads, stash, rho, lam=2.0, eps=1e-12, grad_scale=None, found_inf=None,
                  sumsq=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.rsam_perturb_`: ``d = lam * g + (w - stash)``,
    ``w = stash + rho * d / (||d|| + eps)``; non-finite ``||d||`` or found_inf: ``w = stash``.
    ``sumsq`` (sharded training): ``sum(d^2)`` over every shard, used instead of this list's."""
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    ds = _rsam_directions(params, grads, stash, lam, grad_scale)
    total = sum((d.double() ** 2).sum() for d in ds) if sumsq is None else sumsq.double().reshape(())
    norm = total.sqrt()
    ok = torch.isfinite(norm) & (norm > 0)  # a zero norm perturbs nothing, whatever eps
    if found_inf is not None:
        ok = ok & (found_inf <= 0)
    coef = torch.where(ok, 1.0 / (norm + eps), torch.zeros_like(norm))
    for p, s, d, r in zip(params, stash, ds, rho):
        new = s.to(_acc(p)) + (r * coef).to(_acc(p)) * d
        p.copy_(torch.where(ok, new.to(p.dtype), s))
    return norm.to(acc)


def gsam_sums(grads, old_grads) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.gsam_sums`: ``[<old_g, g>, |old_g|^2, |g|^2]`` in
    float64, in the gradients' units (scaled as given)."""
    dev = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(3, dtype=torch.float64, device=dev)
    for g, o in zip(grads, old_grads):
        g, o = g.double(), o.double()
        out = out + torch.stack([(o * g).sum(), (o * o).sum(), (g * g).sum()])
    return out


def gsam_coefficients(grads, old_grads, alpha, eps=1e-12, grad_scale=None, old_grad_scale=None, found_inf=None,
                      sums=None):
    """GSAM's decomposition as the official code computes it, on unscaled float64 gradients:
    returns ``(combined gradients, cos, ||old_g||, ||g||, apply)``. ``sums`` (sharded training):
    :func:`gsam_sums` over every shard, used instead of this list's."""
    inv_n = 1.0 if grad_scale is None else 1.0 / grad_scale.double()
    inv_o = 1.0 if old_grad_scale is None else 1.0 / old_grad_scale.double()
    g = [x.double() * inv_n for x in grads]
    o = [x.double() * inv_o for x in old_grads]
    if sums is None:
        dot = sum((a * b).sum() for a, b in zip(o, g))
        n_new = sum((a * a).sum() for a in g).sqrt()
        n_old = sum((a * a).sum() for a in o).sqrt()
    else:
        sums = sums.double()
        dot = sums[0] * inv_n * inv_o
        n_old = sums[1].sqrt() * inv_o
        n_new = sums[2].sqrt() * inv_n
    cos = dot / (n_new * n_old + eps)
    finite = torch.isfinite(n_new + n_old + cos)
    out = []
    for a, b in zip(g, o):
        vertical = b - cos * n_old * a / (n_new + eps)
        out.append(torch.where(finite, a - alpha * vertical, a) if alpha != 0 else a.clone())
    apply = torch.ones((), dtype=torch.bool) if found_inf is None else (found_inf <= 0).cpu()
    return out, cos, n_old, n_new, apply


def gsam_combine_(params, grads, old_grads, stash, alpha, eps=1e-12, stash_mode="copy", restore=True,
                  grad_scale=None, old_grad_scale=None, found_inf=None, sums=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.gsam_combine_`."""
    comb, cos, n_old, n_new, apply = gsam_coefficients(grads, old_grads, alpha, eps, grad_scale, old_grad_scale,
                                                       found_inf, sums)
    if restore:
        sam_restore_(params, stash, stash_mode)
    for g, c in zip(grads, comb):
        g.copy_(torch.where(apply.to(g.device), c.to(g.dtype), g))
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.stack([cos, n_old, n_new]).to(acc)


def gsam_restore_sgd_(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening,
                      nesterov, maximize, first_run, alpha, eps=1e-12, stash_mode="copy", grad_scale=None,
                      old_grad_scale=None, found_inf=None, sums=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.gsam_restore_sgd_`: the combined gradient, then
    :func:`sam_restore_sgd_` on it."""
    comb, cos, n_old, n_new, apply = gsam_coefficients(grads, old_grads, alpha, eps, grad_scale, old_grad_scale,
                                                       found_inf, sums)
    skip = None if found_inf is None else found_inf
    sam_restore_sgd_(params, [c.to(_acc(p)) for c, p in zip(comb, params)], stash, momentum_buffers, lr, weight_decay,
                     momentum, dampening, nesterov, maximize, first_run, stash_mode, None, skip)
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.stack([cos, n_old, n_new]).to(acc)


# --------------------------------------------------------------------------------------------
# Cheaper sharpness (issue 15): LookSAM's g_v and its reuse, Momentum-SAM's fused steps. Norms
# and inner products are global over the list, accumulated in float64 here. No host
# synchronisation: coefficients stay tensors, non-finite values select "leave unchanged".
# --------------------------------------------------------------------------------------------


def looksam_gv_applies(sums: torch.Tensor) -> torch.Tensor:
    """Whether :func:`looksam_gv_`'s coefficient applies, from ``[<g, g_s>, |g|^2, |g_s|^2]``."""
    dot, gg, ss = sums.double().unbind()
    return torch.isfinite(dot / gg) & torch.isfinite(ss) & (gg > 0)


def looksam_gv_(gv, gv_norm, grads, old_grads, eps=1e-12, sums=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.looksam_gv_`: ``gv = g_s - (<g, g_s> / |g|^2) g`` with
    ``g_s = grads`` (at the perturbed weights) and ``g = old_grads``, and ``gv_norm = |gv|``
    summed from the written ``gv`` (``|g_s|^2 - <g, g_s>^2 / |g|^2`` cancels badly when ``g_s``
    is nearly parallel to ``g``, the usual case). Non-finite coefficients or a zero ``|g|``
    leave ``gv`` and ``gv_norm`` unchanged. Returns ``[cos(g, g_s), |g|, |g_s|]``. ``sums``
    (sharded training): ``[<g, g_s>, |g|^2, |g_s|^2]`` over every shard, used instead of this
    list's (``gv_norm`` is then this list's ``|gv|``)."""
    if sums is None:
        sums = gsam_sums(grads, old_grads)
    dot, gg, ss = sums.double().unbind()
    c = dot / gg
    ok = looksam_gv_applies(sums)
    for v, g, o in zip(gv, grads, old_grads):
        dt = _acc(v)
        new = g.to(dt) - c.to(dt) * o.to(dt)
        v.copy_(torch.where(ok, new, v.to(dt)))
    nv = sum((v.double() ** 2).sum() for v in gv).sqrt()
    gv_norm.copy_(torch.where(ok, nv, gv_norm.double()).reshape(gv_norm.shape))
    acc = torch.float64 if any(v.dtype == torch.float64 for v in gv) else torch.float32
    n_old, n_new = gg.sqrt(), ss.sqrt()
    return torch.stack([dot / (n_old * n_new + eps), n_old, n_new]).to(acc)


def looksam_combine_(grads, gv, gv_norm, alpha, eps=1e-8, sumsq=None) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.looksam_combine_`: ``g += alpha |g| / (|gv| + eps) gv``
    (scale invariant in ``g`` and ``gv``, so AMP-scaled gradients need no unscaling). A zero or
    non-finite ``gv_norm`` or a non-finite ``|g|`` leaves ``g`` as it is. Returns ``|g|`` before
    the update. ``sumsq`` (sharded training): ``|g|^2`` over every shard."""
    gg = sum((g.double() ** 2).sum() for g in grads) if sumsq is None else sumsq.double().reshape(())
    ng = gg.sqrt()
    nv = gv_norm.double().reshape(())
    ok = torch.isfinite(ng) & torch.isfinite(nv) & (nv > 0)
    coef = torch.where(ok, alpha * ng / (nv + eps), torch.zeros_like(ng))
    for g, v in zip(grads, gv):
        dt = _acc(g)
        g.copy_(torch.where(ok, g.to(dt) + coef.to(dt) * v.to(dt), g.to(dt)))
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return ng.to(acc)


def _any_f64(tensors) -> torch.dtype:
    """The dtype of a norm over a list (the ops' fake kernels say the same): float64 if any tensor is."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _msam_finish(params, bufs, coef_state, rho, eps):
    """Momentum-SAM's re-perturbation: ``coef = 1 / (|buf| + eps)`` (global), ``w -= rho * coef * buf``."""
    norm = sum((b.double() ** 2).sum() for b in bufs).sqrt()
    # Stored first and used as stored: the next step un-perturbs with exactly this value.
    coef_state.copy_((1.0 / (norm + eps)).reshape(coef_state.shape).to(coef_state.dtype))
    inv = coef_state.double().reshape(())
    for p, b, r in zip(params, bufs, rho):
        dt = _acc(p)
        p.copy_(p.to(dt) - (r * inv).to(dt) * b.to(dt))
    return norm


def msam_sgd_(params, grads, momentum_buffers, inv_norm, lr, weight_decay, momentum, rho_prev, rho,
              eps=1e-12) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.msam_sgd_`, the authors' SGD rule (MarlonBecker/MSAM),
    with the weights ``w`` stored at the perturbed point between steps::

        d   = g + weight_decay * w                 (w perturbed, as the authors' code)
        w   = w + rho_prev * inv_norm * buf        (back to the unperturbed weights)
        buf = momentum * buf + d
        w   = w - lr * buf
        inv_norm = 1 / (|buf| + eps)               (global)
        w   = w - rho * inv_norm * buf             (the next step's perturbation)

    Returns ``|buf|``."""
    for i, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        dt = _acc(p)
        w = p.to(dt)
        d = g.to(dt) + weight_decay[i] * w
        w = w + (rho_prev[i] * inv_norm.double()).to(dt) * b.to(dt)
        nb = momentum[i] * b.to(dt) + d
        b.copy_(nb)
        p.copy_(w - lr[i] * nb)
    return _msam_finish(params, momentum_buffers, inv_norm, rho, eps).to(_any_f64(params))


def msam_adamw_(params, grads, exp_avg, exp_avg_sq, steps, inv_norm, lr, beta1, beta2, eps, weight_decay,
                rho_prev, rho, norm_eps=1e-12) -> torch.Tensor:
    """Reference of :func:`saf_kernels.ops.msam_adamw_`, the authors' AdamW rule
    (MarlonBecker/MSAM ``adamW_msam``; ``steps`` already count this step)::

        w = w + rho_prev * inv_norm * m            (unperturbed)
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        w = w - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        w = w * (1 - lr * weight_decay)            (after the Adam step, as the authors)
        inv_norm = 1 / (|m| + norm_eps);  w = w - rho * inv_norm * m

    Returns ``|m|``."""
    for i, (p, g, m, v, st) in enumerate(zip(params, grads, exp_avg, exp_avg_sq, steps)):
        dt = _acc(p)
        w = p.to(dt) + (rho_prev[i] * inv_norm.double()).to(dt) * m.to(dt)
        d = g.to(dt)
        step = st.to(torch.float64)
        bc1 = 1 - beta1[i] ** step
        bc2_sqrt = (1 - beta2[i] ** step).sqrt()
        nm = m.to(dt) * beta1[i] + (1 - beta1[i]) * d
        nv = v.to(dt) * beta2[i] + (1 - beta2[i]) * d * d
        w = w - (lr[i] / bc1).to(dt) * (nm / (nv.sqrt() / bc2_sqrt.to(dt) + eps[i]))
        w = w * (1 - lr[i] * weight_decay[i])
        m.copy_(nm)
        v.copy_(nv)
        p.copy_(w)
    return _msam_finish(params, exp_avg, inv_norm, rho, norm_eps).to(_any_f64(params))


# --------------------------------------------------------------------------------------------
# Fused linear + CE + KL (language models): the materialised version
# --------------------------------------------------------------------------------------------


def topk_target_logits(idx: torch.Tensor, logit: torch.Tensor, lse: torch.Tensor, num_classes: int,
                       temperature: float) -> torch.Tensor:
    """Dense ``[n, V]`` target logits rebuilt from a top-k record ``(idx [n, k], logit [n, k], lse [n])``.

    Kept classes get their logits; each of the ``V - k`` others gets ``lse + log(rest / (V - k))``
    with ``rest = 1 - sum_i exp(logit_i - lse)`` (the mass the top-k leaves), so at ``T = 1`` the
    kept classes keep their exact probabilities and the rest shares its mass uniformly. ``rest <= 0``
    (everything kept, or rounding) gives the others ``lse - 200 T``: a finite logit whose tempered
    probability underflows to 0 (``-inf`` would make ``0 * log 0`` a NaN). In float32 (float64 if
    ``logit`` is float64). ``idx`` must not repeat a class within a row (``torch.topk`` never does).
    """
    dt = torch.float64 if logit.dtype == torch.float64 else torch.float32
    logit, lse = logit.to(dt), lse.to(dt)
    k = idx.shape[1]
    rest = 1.0 - torch.exp(logit - lse[:, None]).sum(1)
    spread = lse + torch.log(rest.clamp(min=torch.finfo(dt).tiny)) - math.log(max(num_classes - k, 1))
    fill = torch.where(rest > 0, spread, lse - 200.0 * temperature)
    out = fill[:, None].expand(idx.shape[0], num_classes).contiguous()
    return out.scatter_(1, idx, logit)


def fused_linear_trajectory_loss(hidden, weight, labels, target_hidden=None, target_weight=None, bias=None,
                                 target_bias=None, target_logits=None, target_topk=None, lam=0.8,
                                 temperature=5.0, label_smoothing=0.0, ignore_index=-100):
    """Reference of :func:`saf_kernels.fused_linear_trajectory_loss`: the full logits
    ``hidden @ weight.T + bias`` materialised, then :func:`saf_loss` (mean over the rows not
    ignored, 0 if none). A ``target_topk`` is rebuilt by :func:`topk_target_logits`; rows whose
    optional validity flag (4th element) is False take the logits themselves as target (KL 0)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    labels = labels.reshape(-1)
    if target_hidden is not None:
        with torch.no_grad():
            target = F.linear(target_hidden.reshape(-1, target_hidden.shape[-1]), target_weight, target_bias)
    elif target_logits is not None:
        target = target_logits.reshape(-1, logits.shape[1])
    else:
        idx, logit, lse = (t.reshape(-1, *t.shape[hidden.dim() - 1:]) for t in target_topk[:3])
        target = topk_target_logits(idx, logit, lse, logits.shape[1], temperature)
        if len(target_topk) > 3 and target_topk[3] is not None:
            target = torch.where(target_topk[3].reshape(-1, 1), target, logits.detach().to(target.dtype))
    return saf_loss(logits, labels, target, lam, temperature, label_smoothing, ignore_index)
