"""Triton kernel of the fused trajectory loss (same math as csrc/include/saf/trajectory_loss.h).

One program handles BLOCK_R rows. When a row fits in one BLOCK_C tile (``SINGLE``) it is read
once and the loss and gradient computed from registers; otherwise two passes over column chunks:
an online softmax pass (running maxima and rescaled sums for softmax(z), softmax(z/T),
softmax(t/T)) and a pass that re-reads the row (usually from L2) for the KL's per-element
log-ratios and the gradient. ``labels`` may be class indices ``[B]`` or probability targets
``[B, C]`` (``SOFT``).

With ``BANK`` (the SAF trajectory bank, ``saf_kernels/triton/trajectory_bank.py``) row ``i``'s
target is row ``idx[i]`` of the bank slot, read only if the row's mode has the KL bit; with the
record bit the row's logits are written over that target row after it has been read. The KL term
then has its own device scale (1 / rows with a past entry).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Largest row kept whole in registers; longer rows take the chunked two-pass path.
MAX_SINGLE_BLOCK = 8192
CHUNK_BLOCK = 4096


if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter has no libdevice: log1p from an accurate log (numpy's), Goldberg's formula,
    # exact to a few ulp.
    @triton.jit
    def _log1p(x):
        u = 1.0 + x
        one = u == 1.0
        return tl.where(one, x, tl.log(u) * (x / tl.where(one, 1.0, u - 1.0)))

else:

    @triton.jit
    def _log1p(x):
        # libdevice's: tl.log lowers to an approximate log2 whose absolute error near 1 would undo
        # the point (see csrc/include/saf/trajectory_loss.h).
        return libdevice.log1p(x)


@triton.jit
def _kl_exp_diff(ez, et, x, inv_t, ACC: tl.constexpr):
    """exp((z - mz)/T) - exp((t - mt)/T) from x = (t - mt) - (z - mz): et * expm1(-x / T) by the
    degree-8 Taylor polynomial where |x / T| <= 0.5 (1/16 in float64), else ez - et (kl_exp_diff
    and expm1_small of csrc/include/saf/trajectory_loss.h)."""
    if ACC == tl.float64:
        BOUND = 0.0625
    else:
        BOUND = 0.5
    v = -x * inv_t
    p = 1.0 + v * (1.0 / 8)
    p = 1.0 + v * (1.0 / 7) * p
    p = 1.0 + v * (1.0 / 6) * p
    p = 1.0 + v * (1.0 / 5) * p
    p = 1.0 + v * (1.0 / 4) * p
    p = 1.0 + v * (1.0 / 3) * p
    p = 1.0 + v * (1.0 / 2) * p
    return tl.where((v <= BOUND) & (v >= -BOUND), et * (v * p), ez - et)


@triton.jit
def _to_storage(x, dst_ptr):
    """``x`` rounded to ``dst_ptr``'s element type as ``Tensor.to()`` rounds (through float32)."""
    if dst_ptr.dtype.element_ty == tl.float64:
        return x.to(tl.float64)
    # float64 -> 16-bit goes through float32: a direct cast is not supported everywhere (the
    # interpreter stores zeros), and the extra rounding of a float64 value is harmless.
    x32 = x.to(tl.float32)
    if dst_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the bits: GPUs' conversion does, the interpreter's truncates,
        # and the bank must hold the same bits on every backend.
        b = x32.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x32 != x32, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x32.to(dst_ptr.dtype.element_ty)


# B varies between calls (a last, smaller batch): no specialisation on its value. The float
# arguments are float64 (a plain float argument would be fp32 on a GPU), rounded once to ACC.
@triton.jit(do_not_specialize=["B"])
def _trajectory_loss_kernel(
    z_ptr,
    t_ptr,
    y_ptr,
    g_ptr,
    loss_ptr,
    scale_ptr,
    B,
    C,
    stride_z,
    stride_t,
    stride_g,
    inv_t: tl.float64,
    temp: tl.float64,
    ce_w: tl.float64,
    kl_w: tl.float64,
    eps: tl.float64,
    ignore_index,
    idx_ptr,
    mode_ptr,
    kl_scale_ptr,
    p_ptr,
    stride_p,
    HAS_LABELS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BANK: tl.constexpr = False,
    SOFT: tl.constexpr = False,
):
    # SOFT: probability targets p_ptr [B, C] (row stride stride_p) replace the labels: every row
    # counts, CE = sy * log(s1) - sum(y * (z - mz)), gradient ce_w * (sy * s - y).
    inv_t = tl.full([], inv_t, ACC)
    temp = tl.full([], temp, ACC)
    ce_w = tl.full([], ce_w, ACC)
    kl_w = tl.full([], kl_w, ACC)
    eps = tl.full([], eps, ACC)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    z_row = z_ptr + rows64[:, None] * stride_z
    p_row = p_ptr + rows64[:, None] * stride_p
    eps_over_c = eps / C
    if BANK:
        mode = tl.load(mode_ptr + rows64, mask=rmask, other=0).to(tl.int32)
        has_t = (mode & 1) != 0
        rec = (mode & 2) != 0
        tidx = tl.load(idx_ptr + rows64, mask=rmask & (mode != 0), other=0).to(tl.int64)
        t_row = t_ptr + tidx[:, None] * stride_t
        tmask_r = rmask & has_t
    else:
        t_row = t_ptr + rows64[:, None] * stride_t
        tmask_r = rmask
    if HAS_SCALE:  # 1 / (rows not ignored), computed on the device: the "mean" reduction
        scale = tl.load(scale_ptr).to(ACC)
        ce_w = ce_w * scale
        if BANK:  # the KL term averages over the rows with a past entry instead
            kl_w = kl_w * tl.load(kl_scale_ptr).to(ACC)
        else:
            kl_w = kl_w * scale
    if BANK:  # rows without a past entry: no KL term (their target reads as zeros)
        kl_w = tl.where(has_t, kl_w, 0.0)

    if HAS_LABELS:
        y = tl.load(y_ptr + rows64, mask=rmask, other=ignore_index).to(tl.int64)
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= C))
        y_safe = tl.where(bad | ~valid, 0, y)
        zy = tl.load(z_ptr + rows64 * stride_z + y_safe, mask=rmask & valid & ~bad, other=0.0).to(ACC)
    # A row in neither term (a bank row without labels and without a past entry) counts for
    # nothing, whatever its values (NaN included).
    if BANK and not HAS_LABELS and not SOFT:
        active = has_t
    else:
        active = rmask

    neg_inf = float("-inf")
    if SINGLE:
        cmask = cols[None, :] < C
        mask = rmask[:, None] & cmask
        # Padding lanes read 0 (so t - z stays finite) and enter the maxima and exps as -inf.
        z = tl.load(z_row + cols[None, :], mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + cols[None, :], mask=tmask_r[:, None] & cmask, other=0.0).to(ACC)
        if BANK:  # the target row has been read: the slot takes the current logits
            tl.store(t_row + cols[None, :], _to_storage(z, t_ptr), mask=mask & rec[:, None])
        mz = tl.where(rmask, tl.max(tl.where(mask, z, neg_inf), 1), 0.0)
        mt = tl.where(rmask, tl.max(tl.where(mask, t, neg_inf), 1), 0.0)
        d = tl.where(mask, z - mz[:, None], neg_inf)
        ez = tl.exp(d * inv_t)
        et = tl.exp(tl.where(mask, t - mt[:, None], neg_inf) * inv_t)
        sz = tl.sum(ez, 1)
        st = tl.sum(et, 1)
        # KL from per-element log-ratios (not a difference of row sums: see trajectory_loss.h).
        x = (t - mt[:, None]) - (z - mz[:, None])
        w = tl.sum(et * x, 1)
        ds = tl.sum(tl.where(mask, _kl_exp_diff(ez, et, x, inv_t, ACC), 0.0), 1)
        nonfinite = tl.sum((z - z) + (t - t), 1)
        if HAS_LABELS:
            e1 = tl.exp(d)
            s1 = tl.sum(e1, 1)
            sumz = tl.sum(z, 1)
        if SOFT:
            yp = tl.load(p_row + cols[None, :], mask=mask, other=0.0).to(ACC)
            e1 = tl.exp(d)
            s1 = tl.sum(e1, 1)
            sy = tl.sum(yp, 1)
            syd = tl.sum(yp * (z - mz[:, None]), 1)
            # A negative or non-finite probability makes the row NaN (the GPU's error report).
            nonfinite += tl.sum(yp - yp, 1) + tl.where(tl.min(yp, 1) < 0, float("nan"), 0.0)
    else:
        mz = tl.full([BLOCK_R], neg_inf, ACC)
        mt = tl.full([BLOCK_R], neg_inf, ACC)
        sz = tl.zeros([BLOCK_R], ACC)
        st = tl.zeros([BLOCK_R], ACC)
        s1 = tl.zeros([BLOCK_R], ACC)
        sumz = tl.zeros([BLOCK_R], ACC)
        sy = tl.zeros([BLOCK_R], ACC)
        nonfinite = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc[None, :] < C)
            z = tl.load(z_row + cc[None, :], mask=mask, other=0.0).to(ACC)
            t = tl.load(t_row + cc[None, :], mask=tmask_r[:, None] & (cc[None, :] < C), other=0.0).to(ACC)
            # Rows past B keep finite factors (they are never stored).
            mz_new = tl.where(rmask, tl.maximum(mz, tl.max(tl.where(mask, z, neg_inf), 1)), 0.0)
            mt_new = tl.where(rmask, tl.maximum(mt, tl.max(tl.where(mask, t, neg_inf), 1)), 0.0)
            d = tl.where(mask, z - mz_new[:, None], neg_inf)
            et = tl.exp(tl.where(mask, t - mt_new[:, None], neg_inf) * inv_t)
            rz = tl.exp((mz - mz_new) * inv_t)
            rt = tl.exp((mt - mt_new) * inv_t)
            sz = sz * rz + tl.sum(tl.exp(d * inv_t), 1)
            st = st * rt + tl.sum(et, 1)
            nonfinite += tl.sum((z - z) + (t - t), 1)
            if HAS_LABELS:
                s1 = s1 * tl.exp(mz - mz_new) + tl.sum(tl.exp(d), 1)
                sumz += tl.sum(z, 1)
            if SOFT:
                yp = tl.load(p_row + cc[None, :], mask=mask, other=0.0).to(ACC)
                s1 = s1 * tl.exp(mz - mz_new) + tl.sum(tl.exp(d), 1)
                sy += tl.sum(yp, 1)
                nonfinite += tl.sum(yp - yp, 1) + tl.where(tl.min(yp, 1) < 0, float("nan"), 0.0)
            mz = mz_new
            mt = mt_new

    # Rows past B have empty sums; give them harmless ones (they are never stored).
    sz = tl.where(rmask, sz, 1.0)
    st = tl.where(rmask, st, 1.0)
    if HAS_LABELS or SOFT:
        s1 = tl.where(rmask, s1, 1.0)
    # Gradient coefficients (see trajectory_loss.h); nonfinite poisons a NaN row's gradient.
    b = kl_w * temp / sz + nonfinite
    dd = kl_w * temp / st
    if HAS_LABELS:
        a = ce_w / s1
        k0 = -ce_w * eps_over_c
        hot = ce_w * (1.0 - eps)
    if SOFT:
        a = ce_w * sy / s1
    g_row = g_ptr + rows64[:, None] * stride_g

    if SINGLE:
        if NEED_GRAD:
            g = b[:, None] * ez - dd[:, None] * et
            if HAS_LABELS:
                g += a[:, None] * e1 + k0
                g -= tl.where(cols[None, :] == y[:, None], hot, 0.0)
                g = tl.where(valid[:, None], g, 0.0)
                g = tl.where(bad[:, None], float("nan"), g)
            if SOFT:
                g += a[:, None] * e1 - ce_w * yp
            g = tl.where(active[:, None], g, 0.0)
            tl.store(g_row + cols[None, :], _to_storage(g, g_ptr), mask=mask)
    else:
        # Pass 2: re-read the row for the KL's log-ratios (and the soft CE's y (z - mz)), write the
        # gradient, and record the logits over the target row once it has been read.
        w = tl.zeros([BLOCK_R], ACC)
        ds = tl.zeros([BLOCK_R], ACC)
        syd = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc[None, :] < C)
            z = tl.load(z_row + cc[None, :], mask=mask, other=0.0).to(ACC)
            t = tl.load(t_row + cc[None, :], mask=tmask_r[:, None] & (cc[None, :] < C), other=0.0).to(ACC)
            if BANK:
                tl.store(t_row + cc[None, :], _to_storage(z, t_ptr), mask=mask & rec[:, None])
            d = z - mz[:, None]
            et = tl.exp(tl.where(mask, t - mt[:, None], neg_inf) * inv_t)
            ez = tl.exp(tl.where(mask, d, neg_inf) * inv_t)
            x = (t - mt[:, None]) - d
            w += tl.sum(et * x, 1)
            ds += tl.sum(tl.where(mask, _kl_exp_diff(ez, et, x, inv_t, ACC), 0.0), 1)
            if SOFT:
                yp = tl.load(p_row + cc[None, :], mask=mask, other=0.0).to(ACC)
                syd += tl.sum(yp * d, 1)
            if NEED_GRAD:
                g = b[:, None] * ez - dd[:, None] * et
                if HAS_LABELS:
                    g += a[:, None] * tl.exp(d) + k0
                    g -= tl.where(cc[None, :] == y[:, None], hot, 0.0)
                    g = tl.where(valid[:, None], g, 0.0)
                    g = tl.where(bad[:, None], float("nan"), g)
                if SOFT:
                    g += a[:, None] * tl.exp(d) - ce_w * yp
                g = tl.where(active[:, None], g, 0.0)
                tl.store(g_row + cc[None, :], _to_storage(g, g_ptr), mask=mask)

    # log1p of the summed differences: not log(sz) - log(st) (both ~log C), nor log(sz / st)
    # (rounded near 1); see trajectory_loss.h.
    kl = inv_t * w / st + _log1p(ds / st)
    # A row holding NaN or inf (nonfinite is NaN) gets NaN loss and gradient, as on every backend.
    loss = kl_w * temp * temp * kl + nonfinite
    if HAS_LABELS:
        ce = mz + tl.log(s1) - (1.0 - eps) * zy - eps_over_c * sumz
        loss += ce_w * ce
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    if SOFT:
        loss += ce_w * (sy * tl.log(s1) - syd)
    loss = tl.where(active, loss, 0.0)
    tl.store(loss_ptr + rows64, loss.to(loss_ptr.dtype.element_ty), mask=rmask)


def _launch_config(C: int, f64: bool = False, soft: bool = False) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_C, SINGLE, num_warps) for rows of C classes (``f64``: float64 arithmetic;
    ``soft``: probability targets).

    Tiles of up to 2048 elements (1024 in float64: two registers a value), several rows a tile
    when C is small; 4 warps up to 256 float32 registers a tile, 8 up to 2048, 16 beyond; a
    float64 row is one tile up to 2048 classes, longer rows go in chunks (16 warps, 8 with
    probability targets). The KL's expm1 polynomial made the older split (4 / 8 / 16 warps at
    1024 / 4096) spill 8-56 bytes in three tiles; with 4 warps, 2048-element tiles of 16-64 rows
    once took 255 registers and spilled up to 824 bytes. tests/test_triton_aot.py compiles the
    configurations for sm_80 and sm_90 and fails on a spill; the full sweep still finds 4-20 bytes
    in the 8192-wide bank tile with probability targets.
    """
    block_c = triton.next_power_of_2(C)
    width = 2 if f64 else 1
    if block_c <= (MAX_SINGLE_BLOCK // 4 if f64 else MAX_SINGLE_BLOCK):
        block_r = max(1, min(64, 2048 // width // block_c))
        regs = block_r * block_c * width  # float32 registers a tile holds
        num_warps = 4 if regs <= 256 else (8 if regs <= 2048 else 16)
        return block_r, block_c, True, num_warps
    # Chunks with probability targets stay on 8 warps: Triton 3.6 fails to compile them on 16.
    return 1, CHUNK_BLOCK // width, False, 8 if soft else 16


def trajectory_loss_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    ce_weight: float,
    kl_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (per row, summed, or averaged over non-ignored rows) and the gradient of that loss
    w.r.t. logits; the semantics of ``torch.ops.saf_kernels.trajectory_loss``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if target.stride(-1) != 1:
        target = target.contiguous()
    B, C = logits.shape
    f64 = torch.float64 in (logits.dtype, target.dtype)
    acc = torch.float64 if f64 else torch.float32
    rows = torch.empty(B, dtype=acc, device=logits.device)
    grad = torch.empty((B, C) if need_grad else (0,), dtype=logits.dtype, device=logits.device)
    soft = labels is not None and labels.is_floating_point()  # probability targets [B, C]
    if soft:
        if label_smoothing != 0.0:
            raise ValueError(f"saf_kernels.trajectory_loss: label_smoothing ({label_smoothing}) applies to class-index "
                             "labels; fold it into the probability targets")
        probs = labels if labels.stride(-1) == 1 else labels.contiguous()
        labels = None
    has_labels = labels is not None
    if has_labels:
        labels = labels.contiguous()
    host_scale, scale = 1.0, None
    if reduction == 2:
        if has_labels:
            n = (labels != ignore_index).sum()
            scale = torch.where(n > 0, 1.0 / n.clamp(min=1).to(acc), torch.zeros((), dtype=acc, device=n.device))
        elif B > 0:
            host_scale = 1.0 / B
    if B > 0:
        block_r, block_c, single, num_warps = _launch_config(C, f64, soft)
        _trajectory_loss_kernel[(triton.cdiv(B, block_r),)](
            logits,
            target,
            labels if has_labels else rows,
            grad if need_grad else rows,
            rows,
            scale if scale is not None else rows,
            B,
            C,
            logits.stride(0),
            target.stride(0),
            C,
            1.0 / temperature,
            temperature,
            ce_weight * host_scale,
            kl_weight * host_scale,
            label_smoothing,
            ignore_index,
            rows,
            rows,
            rows,
            probs if soft else rows,
            probs.stride(0) if soft else 0,
            HAS_LABELS=has_labels,
            HAS_SCALE=scale is not None,
            NEED_GRAD=need_grad,
            SINGLE=single,
            ACC=tl.float64 if f64 else tl.float32,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            SOFT=soft,
            num_warps=num_warps,
        )
    return (rows if reduction == 0 else rows.sum()), grad
