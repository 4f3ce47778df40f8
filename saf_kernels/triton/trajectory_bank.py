"""Triton kernels of the SAF trajectory bank (layout and semantics:
``csrc/include/saf/trajectory_bank.h``).

A step is two launches: a one-program pre-pass over the batch's ids (range check, duplicates
through a per-sample claim counter, the past entry's tag, the counts n and m and their
reciprocals, the new tags) and the trajectory-loss kernel of ``trajectory_loss.py`` with its
``BANK`` extension (gather, loss, gradient, logits written over the slot it has read). Nothing
leaves the device: bad ids set flags in the bank's ``state`` tensor instead of raising.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .trajectory_loss import _launch_config, _to_storage, _trajectory_loss_kernel

# Mirrors csrc/include/saf/trajectory_bank.h.
ERR_ID_OUT_OF_RANGE = 1
ERR_DUPLICATE_ID = 2
STATE_FLAGS, STATE_BAD_ID, STATE_DUP_ID, STATE_EPOCH = 0, 1, 2, 3
STATE_SIZE = 8
INT64_MIN = -(2**63)
PREPASS_BLOCK = 1024


@triton.jit
def _flag(state_ptr, n_bad, largest, bit: tl.constexpr, slot: tl.constexpr, epoch):
    if n_bad > 0:
        tl.atomic_or(state_ptr, tl.full([], bit, tl.int64))
        tl.atomic_max(state_ptr + slot, largest.to(tl.int64))
        tl.atomic_cas(state_ptr + 3, tl.full([], -1, tl.int64), epoch.to(tl.int64))


# Epoch and sizes vary from call to call: no specialisation on their values (1 would become a
# constant and force a recompile).
@triton.jit(do_not_specialize=["B", "N", "tag_stride", "ignore_index", "epoch", "delay"])
def _bank_prepass_kernel(
    ids_ptr,
    y_ptr,
    tags_ptr,
    claims_ptr,
    state_ptr,
    mode_ptr,
    counts_ptr,
    scales_ptr,
    B,
    N,
    tag_stride,
    ignore_index,
    epoch,
    delay,
    HAS_LABELS: tl.constexpr,
    USE_PAST: tl.constexpr,
    RECORD: tl.constexpr,
    DUP_ERRORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    big_neg = -9223372036854775807 - 1
    # Phase 1: every in-range id claims its sample.
    for r0 in range(0, B, BLOCK):
        r = r0 + offs
        m = r < B
        ids = tl.load(ids_ptr + r, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < N)
        tl.atomic_add(claims_ptr + ids, 1, mask=ok)
        bad = m & ~ok
        _flag(state_ptr, tl.sum(bad.to(tl.int32), 0), tl.max(tl.where(bad, ids, big_neg), 0), 1, 1, epoch)
    tl.debug_barrier()
    # Phase 2: row modes from the claims and the slot's tag; the new tags; the counts.
    n = tl.zeros([BLOCK], tl.int64)
    n_past = tl.zeros([BLOCK], tl.int64)
    past_epoch = epoch - delay
    for r0 in range(0, B, BLOCK):
        r = r0 + offs
        m = r < B
        ids = tl.load(ids_ptr + r, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < N)
        # An atomic read: the claims were written by atomics (not through this SM's L1).
        claims = tl.atomic_add(claims_ptr + ids, 0, mask=ok)
        unique = ok & (claims == 1)
        dup = ok & (claims > 1)
        if HAS_LABELS:
            y = tl.load(y_ptr + r, mask=m, other=ignore_index).to(tl.int64)
            labelled = m & (y != ignore_index)
        else:
            labelled = m
        tag_ptr = tags_ptr + ids * tag_stride
        has = unique & labelled
        if USE_PAST:
            tag = tl.load(tag_ptr, mask=unique, other=-1).to(tl.int64)
            has = has & (tag == past_epoch) & (past_epoch >= 0)
        else:
            has = has & False
        rec = unique
        if not RECORD:
            rec = rec & False
        tl.store(mode_ptr + r, (has.to(tl.int32) | (rec.to(tl.int32) * 2)).to(tl.uint8), mask=m)
        if RECORD:
            tl.store(tag_ptr, epoch.to(tl.int32), mask=rec)
        n += labelled.to(tl.int64)
        n_past += has.to(tl.int64)
        if DUP_ERRORS:
            _flag(state_ptr, tl.sum(dup.to(tl.int32), 0), tl.max(tl.where(dup, ids, big_neg), 0), 2, 2, epoch)
    tl.debug_barrier()
    # Phase 3: release the claims (zero between steps).
    for r0 in range(0, B, BLOCK):
        r = r0 + offs
        m = r < B
        ids = tl.load(ids_ptr + r, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < N)
        tl.atomic_xchg(claims_ptr + ids, 0, mask=ok)
    n_all = tl.sum(n, 0)
    m_all = tl.sum(n_past, 0)
    tl.store(counts_ptr, n_all)
    tl.store(counts_ptr + 1, m_all)
    one = tl.full([], 1.0, scales_ptr.dtype.element_ty)
    zero = tl.full([], 0.0, scales_ptr.dtype.element_ty)
    tl.store(scales_ptr, tl.where(n_all > 0, one / tl.maximum(n_all, 1).to(scales_ptr.dtype.element_ty), zero))
    tl.store(scales_ptr + 1, tl.where(m_all > 0, one / tl.maximum(m_all, 1).to(scales_ptr.dtype.element_ty), zero))


def _prepass(ids, labels, values, epochs, claims, state, epoch, ignore_index, use_past, record, dup_errors, acc):
    B = ids.shape[0]
    N, S, _ = values.shape
    slot = epoch % S
    mode = torch.empty(B, dtype=torch.uint8, device=ids.device)
    counts = torch.empty(2, dtype=torch.int64, device=ids.device)
    scales = torch.empty(2, dtype=acc, device=ids.device)
    block = max(16, min(PREPASS_BLOCK, triton.next_power_of_2(max(B, 1))))
    _bank_prepass_kernel[(1,)](
        ids,
        labels if labels is not None else ids,
        epochs[:, slot],
        claims,
        state,
        mode,
        counts,
        scales,
        B,
        N,
        S,
        ignore_index,
        epoch,
        S,
        HAS_LABELS=labels is not None,
        USE_PAST=use_past,
        RECORD=record,
        DUP_ERRORS=dup_errors,
        BLOCK=block,
        num_warps=4,
    )
    return mode, counts, scales


def bank_step_triton(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    ids: torch.Tensor,
    values: torch.Tensor,
    epochs: torch.Tensor,
    claims: torch.Tensor,
    state: torch.Tensor,
    epoch: int,
    temperature: float,
    ce_weight: float,
    kl_weight: float,
    label_smoothing: float,
    ignore_index: int,
    use_past: bool,
    record: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The semantics of ``torch.ops.saf_kernels.saf_bank_step`` (see csrc/ops.cpp)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids = ids.contiguous()
    probs = None
    if labels is not None and labels.is_floating_point():  # probability targets: every row labelled
        if label_smoothing != 0.0:
            raise ValueError(f"saf_kernels.saf_bank_step: label_smoothing ({label_smoothing}) applies to class-index "
                             "labels; fold it into the probability targets")
        probs = labels if labels.stride(-1) == 1 else labels.contiguous()
        labels = None
    if labels is not None:
        labels = labels.contiguous()
    B, C = logits.shape
    N, S, _ = values.shape
    f64 = logits.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    rows = torch.empty(B, dtype=acc, device=logits.device)
    grad = torch.empty((B, C) if need_grad else (0,), dtype=logits.dtype, device=logits.device)
    mode, counts, scales = _prepass(ids, labels, values, epochs, claims, state, epoch, ignore_index, use_past,
                                    record, True, acc)
    if B > 0:
        block_r, block_c, single, num_warps = _launch_config(C, f64, probs is not None)
        slot_view = values[:, epoch % S]  # row stride S * C: the kernel gathers rows of this slot
        _trajectory_loss_kernel[(triton.cdiv(B, block_r),)](
            logits,
            slot_view,
            labels if labels is not None else rows,
            grad if need_grad else rows,
            rows,
            scales,
            B,
            C,
            logits.stride(0),
            slot_view.stride(0),
            C,
            1.0 / temperature,
            temperature,
            ce_weight,
            kl_weight,
            label_smoothing,
            ignore_index,
            ids,
            mode,
            scales[1:],
            probs if probs is not None else rows,
            probs.stride(0) if probs is not None else 0,
            HAS_LABELS=labels is not None,
            HAS_SCALE=True,
            NEED_GRAD=need_grad,
            SINGLE=single,
            ACC=tl.float64 if f64 else tl.float32,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            BANK=True,
            SOFT=probs is not None,
            num_warps=num_warps,
        )
    return rows.sum(), grad, counts


@triton.jit
def _bank_record_kernel(rows_ptr, ids_ptr, mode_ptr, values_ptr, C, stride_r, stride_v, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rec = (tl.load(mode_ptr + r).to(tl.int32) & 2) != 0
    if rec:
        dst = values_ptr + tl.load(ids_ptr + r).to(tl.int64) * stride_v
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(rows_ptr + r * stride_r + cc, mask=cc < C, other=0.0)
            tl.store(dst + cc, _to_storage(x, values_ptr), mask=cc < C)


def bank_record_triton(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, epochs: torch.Tensor,
                       claims: torch.Tensor, state: torch.Tensor, epoch: int) -> None:
    """The semantics of ``torch.ops.saf_kernels.saf_bank_record`` (see csrc/ops.cpp)."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    ids = ids.contiguous()
    B, C = rows.shape
    S = values.shape[1]
    mode, _, _ = _prepass(ids, None, values, epochs, claims, state, epoch, -100, False, True, False,
                          torch.float32)
    if B > 0:
        slot_view = values[:, epoch % S]
        _bank_record_kernel[(B,)](rows, ids, mode, slot_view, C, rows.stride(0), slot_view.stride(0),
                                  BLOCK_C=min(4096, triton.next_power_of_2(C)))
