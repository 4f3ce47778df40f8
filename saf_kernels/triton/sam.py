"""Triton kernels of the SAM family (same math as csrc/include/saf/multi_tensor.h).

Written on the skeletons of saf_kernels/triton/multi_tensor.py (one program per chunk of a
pointer table, one launch per dtype signature and pass): this file holds only SAM's element
functions. ``sam_perturb`` = norm partials (one per chunk, :func:`chunk_partials`) + a
one-program finalize (fixed-order sum; norm; coef = 1 / (norm + eps) / grad_scale, 0 when the
norm is non-finite or found_inf is set) + the perturbation, which reads coef from device memory:
no host synchronisation. Restore and fused restore + SGD / AdamW are one pass each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (VARYING_ARGS, any_f64, block_of, build_tables, chunk_partials, launch_elementwise,
                           restored, stream_ptr, sum_partials)
from .ema import lerp
from .trajectory_loss import _to_storage

ADAPTIVE_FLAG = 2
SGD_NESTEROV, SGD_MAXIMIZE, SGD_FIRST_RUN = 2, 4, 8
ADAMW_MAXIMIZE = 2
# The same, as the constants kernels read (a jit function can only read constexpr globals).
_ADAPTIVE, _NESTEROV, _MAXIMIZE, _FIRST_RUN, _ADAMW_MAXIMIZE = (
    tl.constexpr(v) for v in (ADAPTIVE_FLAG, SGD_NESTEROV, SGD_MAXIMIZE, SGD_FIRST_RUN, ADAMW_MAXIMIZE))


@triton.jit
def _inv_scale(scale_ptr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr):
    """1 / grad_scale (1 without one), computed in float64 and rounded once to ACC."""
    inv = tl.full([], 1.0, ACC)
    if HAS_SCALE:
        inv = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(ACC)
    return inv


@triton.jit
def skip_of(found_ptr, HAS_FOUND: tl.constexpr):
    """Whether found_inf is set (False without one)."""
    skip = False
    if HAS_FOUND:
        skip = tl.load(found_ptr) > 0
    return skip


# --- perturbation: streams (w, g, stash), params (rho, eta), flag ADAPTIVE -------------------


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    w = stream_ptr(meta, t, 0, L, DT)
    g = stream_ptr(meta, t, 1, L, DT)
    s = stream_ptr(meta, t, 2, L, SD)
    eta = tl.load(fmeta + O_PARAMS + t * 2 + 1).to(ACC)
    adaptive = (tl.load(meta + O_FLAGS + t) & _ADAPTIVE) != 0
    return w, g, s, eta, adaptive


@triton.jit
def _norm_term(ctx, start, off, end, seed, offset, a0, a1, a2, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """|T g|^2 (OPT: some tensor is adaptive, T = |w| + eta; plain SAM never reads w)."""
    w, g, s, eta, adaptive = ctx
    idx, m = block_of(start, off, end, BLOCK)
    x = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    if OPT:
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
        x = x * tl.where(adaptive, tl.abs(wv) + eta, 1.0)
    return a0 + x * x, a1, a2


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_coef_kernel(
    partial_ptr,
    n,
    scale_ptr,
    found_ptr,
    norm_ptr,
    coef_ptr,
    eps: tl.float64,  # a plain float argument would be fp32 on a GPU
    HAS_SCALE: tl.constexpr,
    HAS_FOUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The finalize of the SAM family: norm and coef from the partial sums (ESAM, R-SAM too)."""
    s = sum_partials(partial_ptr, n, BLOCK)
    inv = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        inv = 1.0 / tl.load(scale_ptr).to(tl.float64)
    norm = tl.sqrt(s) * inv
    ok = ((norm - norm) == 0.0) & (norm > 0.0)  # false for inf and NaN; a zero norm perturbs nothing
    if HAS_FOUND:
        ok = ok & (tl.load(found_ptr) <= 0)
    coef = tl.where(ok, inv / (norm + eps), 0.0)
    tl.store(norm_ptr, norm.to(norm_ptr.dtype.element_ty))
    tl.store(coef_ptr, coef)


def sam_finalize(partials, total, params, eps, grad_scale, found_inf):
    """(norm, coef) on the device from a reduction's partial sums (one launch)."""
    dev = partials.device
    norm = torch.empty((), dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    coef = torch.empty((), dtype=torch.float64, device=dev)
    _sam_coef_kernel[(1,)](partials, total, grad_scale if grad_scale is not None else coef,
                           found_inf if found_inf is not None else coef, norm, coef, eps,
                           HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, BLOCK=1024)
    return norm, coef


@triton.jit
def _perturb_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
                  HAS_FOUND, OPT):
    w, g, s, eta, adaptive = _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY,
                                   HAS_SCALE, HAS_FOUND, OPT)
    coef = tl.load(pa)
    rc = (tl.load(fmeta + O_PARAMS + t * 2) * coef).to(ACC)
    return w, g, s, eta, adaptive, rc, coef != 0.0  # coef 0: perturb nothing (the stash still serves the restore)


@triton.jit
def _perturb_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    w, g, s, eta, adaptive, rc, ok = ctx
    idx, m = block_of(start, off, end, BLOCK)
    wr = tl.load(w + idx, mask=m, other=0.0)
    wv = wr.to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    tw = tl.where(adaptive, tl.abs(wv) + eta, 1.0)
    e = rc * (tw * tw) * gv
    if COPY:
        tl.store(s + idx, wr, mask=m)  # raw: bit exact
    else:
        # float64 -> 16 bits through float32, on every GPU (sm_90 would round once, sm_80 twice)
        # and as the CPU and CUDA kernels and Tensor.to() do.
        er = _to_storage(tl.where(ok, e, 0.0), s)
        tl.store(s + idx, er, mask=m)
        e = er.to(ACC)  # add exactly what the restore subtracts
    tl.store(w + idx, tl.where(ok, (wv + e).to(DT), wr), mask=m)


# --- restore (+ SGD / AdamW): streams (w, g, stash, ...) ---------------------------------------


@triton.jit
def _restore_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    w, g, s, eta, adaptive = ctx
    idx, m = block_of(start, off, end, BLOCK)
    sr, wv = restored(w, s, idx, m, ACC, COPY)
    if COPY:
        tl.store(w + idx, sr, mask=m)
    else:
        tl.store(w + idx, wv.to(DT), mask=m)


@triton.jit
def _restore_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
                  HAS_FOUND, OPT):
    w = stream_ptr(meta, t, 0, L, DT)
    return w, w, stream_ptr(meta, t, 2, L, SD), 0.0, False


@triton.jit
def sgd_flags(meta, fmeta, t, O_FLAGS, O_PARAMS, ACC):
    """torch.optim.SGD's per-tensor values: lr, weight decay, momentum, dampening; nesterov,
    maximize, first step (params (lr, wd, momentum, dampening), flags SGD_*)."""
    lr = tl.load(fmeta + O_PARAMS + t * 4).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 4 + 1).to(ACC)
    mom = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(ACC)
    damp = tl.load(fmeta + O_PARAMS + t * 4 + 3).to(ACC)
    fl = tl.load(meta + O_FLAGS + t)
    return lr, wd, mom, damp, (fl & _NESTEROV) != 0, (fl & _MAXIMIZE) != 0, (fl & _FIRST_RUN) != 0


@triton.jit
def sgd_decayed(d, wv, wd, maximize):
    """torch.optim.SGD's direction before momentum: negated when maximizing, plus weight decay."""
    d = tl.where(maximize, -d, d)
    return tl.where(wd != 0.0, d + wd * wv, d)


@triton.jit
def sgd_momentum(d, bv, mom, damp, nesterov, first, use_buf):
    """(direction, new momentum buffer) of torch.optim.SGD (the buffer is d on the first step)."""
    nb = tl.where(first, d, bv * mom + (1.0 - damp) * d)
    return tl.where(use_buf, tl.where(nesterov, d + mom * nb, nb), d), nb


@triton.jit
def _sgd_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
              OPT):
    w = stream_ptr(meta, t, 0, L, DT)
    g = stream_ptr(meta, t, 1, L, DT)
    s = stream_ptr(meta, t, 2, L, SD)
    b = stream_ptr(meta, t, 3, L, DT)
    opt = sgd_flags(meta, fmeta, t, O_FLAGS, O_PARAMS, ACC)
    return w, g, s, b, opt, skip_of(pb, HAS_FOUND), _inv_scale(pa, ACC, HAS_SCALE)


@triton.jit
def _sgd_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """Restore + one torch.optim.SGD step (OPT: momentum buffers are given)."""
    w, g, s, b, opt, skip, inv = ctx
    lr, wd, mom, damp, nesterov, maximize, first = opt
    use_buf = mom != 0.0
    idx, m = block_of(start, off, end, BLOCK)
    sr, wv = restored(w, s, idx, m, ACC, COPY)
    d = tl.load(g + idx, mask=m, other=0.0).to(ACC) * inv
    d = sgd_decayed(d, wv, wd, maximize)
    if OPT:
        bv = tl.load(b + idx, mask=m, other=0.0).to(ACC)
        d, nb = sgd_momentum(d, bv, mom, damp, nesterov, first, use_buf)
        bm = tl.where(use_buf, m, False)  # where(), not &: scalar masks
        if HAS_FOUND:
            bm = tl.where(skip, False, bm)
        tl.store(b + idx, nb.to(DT), mask=bm)
    new = (wv - lr * d).to(DT)
    if HAS_FOUND:  # a skipped step: the restore only
        new = skipped(new, skip, sr, wv, DT, COPY)
    tl.store(w + idx, new, mask=m)


@triton.jit
def skipped(new, skip, sr, wv, DT, COPY):
    """The weights a skipped step writes: the restored ones (the stash's bits when a copy)."""
    if COPY:
        new = tl.where(skip, sr, new)
    else:
        new = tl.where(skip, wv.to(DT), new)
    return new


@triton.jit
def _adamw_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
                HAS_FOUND, OPT):
    lr = tl.load(fmeta + O_PARAMS + t * 5)
    b1 = tl.load(fmeta + O_PARAMS + t * 5 + 1)
    b2 = tl.load(fmeta + O_PARAMS + t * 5 + 2)
    eps = tl.load(fmeta + O_PARAMS + t * 5 + 3).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 5 + 4)
    maximize = (tl.load(meta + O_FLAGS + t) & _ADAMW_MAXIMIZE) != 0
    step = tl.load(stream_ptr(meta, t, 5, L, tl.float32)).to(tl.float64)
    step_size = (lr / (1.0 - tl.exp(step * tl.log(b1)))).to(ACC)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(b2))).to(ACC)
    decay = (1.0 - lr * wd).to(ACC)
    hyper = (eps, maximize, step_size, bc2_sqrt, decay, (1.0 - b1).to(ACC), b2.to(ACC))
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, SD),
            stream_ptr(meta, t, 3, L, DT), stream_ptr(meta, t, 4, L, DT))
    return ptrs, hyper, skip_of(pb, HAS_FOUND), _inv_scale(pa, ACC, HAS_SCALE)


@triton.jit
def _adamw_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """Restore + one torch.optim.AdamW step (streams w, g, stash, exp_avg, exp_avg_sq, step)."""
    ptrs, hyper, skip, inv = ctx
    w, g, s, ma, va = ptrs
    eps, maximize, step_size, bc2_sqrt, decay, wm, beta2 = hyper
    idx, m = block_of(start, off, end, BLOCK)
    sr, wv = restored(w, s, idx, m, ACC, COPY)
    d = tl.load(g + idx, mask=m, other=0.0).to(ACC) * inv
    d = tl.where(maximize, -d, d)
    mv = tl.load(ma + idx, mask=m, other=0.0).to(ACC)
    vv = tl.load(va + idx, mask=m, other=0.0).to(ACC)
    mv = lerp(mv, d, wm)
    vv = vv * beta2 + (1.0 - beta2) * d * d
    new = (wv * decay - step_size * (mv / (tl.sqrt(vv) / bc2_sqrt + eps))).to(DT)
    sm = m
    if HAS_FOUND:  # a skipped step: the restore only, state untouched
        sm = tl.where(skip, False, m)
        new = skipped(new, skip, sr, wv, DT, COPY)
    tl.store(ma + idx, mv.to(DT), mask=sm)
    tl.store(va + idx, vv.to(DT), mask=sm)
    tl.store(w + idx, new, mask=m)


# --- the ops ---------------------------------------------------------------------------------


def adaptive_switch(flags, n):
    """Per table: OPT = whether any of its tensors is adaptive (a list of one flag: all)."""
    flags = flags * n if len(flags) == 1 else flags
    return lambda tb: dict(OPT=any(flags[i] & ADAPTIVE_FLAG for i in tb.index))


def sam_perturb(
    params, grads, stash, rho, eta, flags, eps, stash_mode, grad_scale, found_inf, sumsq=None
) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.sam_perturb_`` (lists already checked). With
    ``sumsq`` (the all-reduced sum of every shard's :func:`sam_sumsq`) the partial-sum stage is
    skipped and the finalize reads that one value."""
    tables = build_tables([params, grads, stash], [rho, eta], flags, signature_streams=(0, 2))
    if sumsq is None:
        partials, total = chunk_partials(_prep, _norm_term, tables, 3, per_table=adaptive_switch(flags, len(params)))
    else:
        partials, total = sumsq.to(torch.float64).reshape(1).contiguous(), 1
    norm, coef = sam_finalize(partials, total, params, eps, grad_scale, found_inf)
    launch_elementwise(_perturb_prep, _perturb_elem, tables, 3, pa=coef, COPY=stash_mode == 0)
    return norm


def sam_sumsq(params, grads, eta, flags) -> torch.Tensor:
    """The partial-sum stage of :func:`sam_perturb` alone: ``sum((T g)^2)`` over the tensors, a
    0-dim float64 tensor (the gradients stand in for the stash, which this stage never reads)."""
    tables = build_tables([params, grads, grads], [eta, eta], flags, signature_streams=(0, 2))
    partials, total = chunk_partials(_prep, _norm_term, tables, 3, per_table=adaptive_switch(flags, len(params)))
    return partials[:total].sum()


def sam_restore(params, stash, stash_mode) -> None:
    tables = build_tables([params, stash, stash], [], [0] * len(params), signature_streams=(0, 2))
    launch_elementwise(_restore_prep, _restore_elem, tables, 3, COPY=stash_mode == 0)


def _scaled(grad_scale, found_inf) -> dict:
    return dict(pa=grad_scale, pb=found_inf, HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None)


def sam_restore_sgd(params, grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening, flags,
                    stash_mode, grad_scale, found_inf) -> None:
    has_buf = len(momentum_buffers) > 0
    bufs = momentum_buffers if has_buf else params
    tables = build_tables(
        [params, grads, stash, bufs], [lr, weight_decay, momentum, dampening], flags, signature_streams=(0, 2)
    )
    launch_elementwise(_sgd_prep, _sgd_elem, tables, 4, COPY=stash_mode == 0, OPT=has_buf,
                       **_scaled(grad_scale, found_inf))


def sam_restore_adamw(params, grads, stash, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps, weight_decay, flags,
                      stash_mode, grad_scale, found_inf) -> None:
    tables = build_tables(
        [params, grads, stash, exp_avg, exp_avg_sq, steps],
        [lr, beta1, beta2, eps, weight_decay],
        flags,
        signature_streams=(0, 2),
    )
    launch_elementwise(_adamw_prep, _adamw_elem, tables, 6, COPY=stash_mode == 0, **_scaled(grad_scale, found_inf))
