"""Triton kernels of GSAM (same math as csrc/include/saf/multi_tensor.h: namespace gsam, gsam_coef).

Partial sums of ``<old_g, g>``, ``|old_g|^2``, ``|g|^2`` per chunk (three arrays), a one-program
finalize (fixed-order sums, the coefficients and the stats in device memory: no host
synchronisation), then one pass: the combined gradient written into ``g`` (+ restore), or the
restore and one torch.optim.SGD step with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .esam import chunk_of, stream_ptr
from .multi_tensor import BLOCK, CHUNK, TL_DTYPE, VARYING_ARGS, any_f64, build_tables, offsets

L = 5  # streams: w, g, stash, momentum buffer, old_g


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gsam_dots_kernel(meta, partial_ptr, part_off, n_total, O_NUMEL, O_CT, O_CS, DT: tl.constexpr,
                      ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    g = stream_ptr(meta, t, 1, 5, DT)
    o = stream_ptr(meta, t, 4, 5, DT)
    a = tl.zeros([BLOCK], ACC)
    b = tl.zeros([BLOCK], ACC)
    d = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        gv = tl.load(g + start + lane, mask=m, other=0.0).to(ACC)
        ov = tl.load(o + start + lane, mask=m, other=0.0).to(ACC)
        a += ov * gv
        b += ov * ov
        d += gv * gv
    i = part_off + tl.program_id(0)
    tl.store(partial_ptr + i, tl.sum(a).to(tl.float64))
    tl.store(partial_ptr + n_total + i, tl.sum(b).to(tl.float64))
    tl.store(partial_ptr + 2 * n_total + i, tl.sum(d).to(tl.float64))


@triton.jit
def _sum_partials(p, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float64)
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK)
        acc += tl.load(p + i, mask=i < n, other=0.0)
    return tl.sum(acc)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gsam_coef_kernel(partial_ptr, n, scale_ptr, old_scale_ptr, found_ptr, coef_ptr, stats_ptr, alpha: tl.float64,
                      eps: tl.float64, HAS_SCALE: tl.constexpr, HAS_OLD_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                      BLOCK: tl.constexpr):
    dot = _sum_partials(partial_ptr, n, BLOCK)
    oo = _sum_partials(partial_ptr + n, n, BLOCK)
    gg = _sum_partials(partial_ptr + 2 * n, n, BLOCK)
    inv_new = tl.full([], 1.0, tl.float64)
    inv_old = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        inv_new = 1.0 / tl.load(scale_ptr).to(tl.float64)
    if HAS_OLD_SCALE:
        inv_old = 1.0 / tl.load(old_scale_ptr).to(tl.float64)
    skip = False
    if HAS_FOUND:
        skip = tl.load(found_ptr) > 0
    n_old = tl.sqrt(oo) * inv_old
    n_new = tl.sqrt(gg) * inv_new
    cos = dot * inv_new * inv_old / (n_new * n_old + eps)
    chk = n_old + n_new + cos
    finite = (chk - chk) == 0.0
    c_new = tl.where(finite, (1.0 + alpha * cos * n_old / (n_new + eps)) * inv_new, inv_new)
    c_old = tl.where(finite, -alpha * inv_old, 0.0)
    tl.store(coef_ptr, tl.where(skip, 0.0, c_new))
    tl.store(coef_ptr + 1, tl.where(skip, 0.0, c_old))
    tl.store(coef_ptr + 2, tl.where(skip, 0.0, 1.0))
    tl.store(stats_ptr, cos.to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + 1, n_old.to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + 2, n_new.to(stats_ptr.dtype.element_ty))


@triton.jit
def _restored(w, s, idx, m, ACC: tl.constexpr, COPY: tl.constexpr):
    sr = tl.load(s + idx, mask=m, other=0.0)
    if COPY:
        wv = sr.to(ACC)
    else:
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC) - sr.to(ACC)
    return sr, wv


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gsam_combine_kernel(meta, coef_ptr, O_NUMEL, O_CT, O_CS, DT: tl.constexpr, SD: tl.constexpr, ACC: tl.constexpr,
                         COPY: tl.constexpr, RESTORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 5, DT)
    g = stream_ptr(meta, t, 1, 5, DT)
    s = stream_ptr(meta, t, 2, 5, SD)
    o = stream_ptr(meta, t, 4, 5, DT)
    cn = tl.load(coef_ptr).to(ACC)
    co = tl.load(coef_ptr + 1).to(ACC)
    apply = tl.load(coef_ptr + 2) != 0.0
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        if RESTORE:
            sr, wv = _restored(w, s, idx, m, ACC, COPY)
            if COPY:
                tl.store(w + idx, sr, mask=m)
            else:
                tl.store(w + idx, wv.to(DT), mask=m)
        gr = tl.load(g + idx, mask=m, other=0.0)
        ov = tl.load(o + idx, mask=m, other=0.0).to(ACC)
        # c_old == 0 (alpha = 0, or an undefined decomposition): old_g must not count (0 * inf).
        new = tl.where(co == 0.0, cn * gr.to(ACC), cn * gr.to(ACC) + co * ov)
        tl.store(g + idx, tl.where(apply, new.to(DT), gr), mask=m)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gsam_sgd_kernel(meta, fmeta, coef_ptr, O_NUMEL, O_FLAGS, O_PARAMS, O_CT, O_CS, DT: tl.constexpr,
                     SD: tl.constexpr, ACC: tl.constexpr, COPY: tl.constexpr, HAS_BUF: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 5, DT)
    g = stream_ptr(meta, t, 1, 5, DT)
    s = stream_ptr(meta, t, 2, 5, SD)
    b = stream_ptr(meta, t, 3, 5, DT)
    o = stream_ptr(meta, t, 4, 5, DT)
    lr = tl.load(fmeta + O_PARAMS + t * 4).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 4 + 1).to(ACC)
    mom = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(ACC)
    damp = tl.load(fmeta + O_PARAMS + t * 4 + 3).to(ACC)
    fl = tl.load(meta + O_FLAGS + t)
    nesterov = (fl & 2) != 0
    maximize = (fl & 4) != 0
    first = (fl & 8) != 0
    use_buf = mom != 0.0
    cn = tl.load(coef_ptr).to(ACC)
    co = tl.load(coef_ptr + 1).to(ACC)
    skip = tl.load(coef_ptr + 2) == 0.0
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        sr, wv = _restored(w, s, idx, m, ACC, COPY)
        d = cn * tl.load(g + idx, mask=m, other=0.0).to(ACC)
        d = tl.where(co == 0.0, d, d + co * tl.load(o + idx, mask=m, other=0.0).to(ACC))
        d = tl.where(maximize, -d, d)
        d = tl.where(wd != 0.0, d + wd * wv, d)
        if HAS_BUF:
            bv = tl.load(b + idx, mask=m, other=0.0).to(ACC)
            nb = tl.where(first, d, bv * mom + (1.0 - damp) * d)
            d = tl.where(use_buf, tl.where(nesterov, d + mom * nb, nb), d)
            # Unchanged where there is no momentum or the step is skipped (selects, not masks:
            # scalar & block masks fail under the interpreter).
            tl.store(b + idx, tl.where(skip, bv, tl.where(use_buf, nb, bv)).to(DT), mask=m)
        new = (wv - lr * d).to(DT)
        if COPY:
            new = tl.where(skip, sr, new)
        else:
            new = tl.where(skip, wv.to(DT), new)
        tl.store(w + idx, new, mask=m)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf):
    dev = params[0].device
    total = sum(tb.n_chunks for tb in tables)
    partials = torch.zeros(3 * max(total, 1), dtype=torch.float64, device=dev)
    off = 0
    for tb in tables:
        o = offsets(tb, L)
        if tb.n_chunks:
            _gsam_dots_kernel[(tb.n_chunks,)](tb.meta, partials, off, max(total, 1), o.numel, o.chunk_tensor,
                                              o.chunk_start, DT=TL_DTYPE[tb.dtypes[0]], ACC=_acc(tb.dtypes[0]),
                                              CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
        off += tb.n_chunks
    coefs = torch.empty(3, dtype=torch.float64, device=dev)
    stats = torch.empty(3, dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    _gsam_coef_kernel[(1,)](partials, max(total, 1), grad_scale if grad_scale is not None else coefs,
                            old_grad_scale if old_grad_scale is not None else coefs,
                            found_inf if found_inf is not None else coefs, coefs, stats, alpha, eps,
                            HAS_SCALE=grad_scale is not None, HAS_OLD_SCALE=old_grad_scale is not None,
                            HAS_FOUND=found_inf is not None, BLOCK=1024)
    return coefs, stats


def gsam_combine(params, grads, old_grads, stash, alpha, eps, stash_mode, restore, grad_scale, old_grad_scale,
                 found_inf) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.gsam_combine_`` (lists already checked)."""
    st = stash if restore else params
    tables = build_tables([params, grads, st, params, old_grads], [[0.0] * len(params)] * 4, [0] * len(params),
                          signature_streams=(0, 2))
    coefs, stats = _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf)
    for tb in tables:
        o = offsets(tb, L)
        if tb.n_chunks:
            _gsam_combine_kernel[(tb.n_chunks,)](
                tb.meta, coefs, o.numel, o.chunk_tensor, o.chunk_start, DT=TL_DTYPE[tb.dtypes[0]],
                SD=TL_DTYPE[tb.dtypes[1]], ACC=_acc(tb.dtypes[0]), COPY=stash_mode == 0, RESTORE=restore,
                CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    return stats


def gsam_restore_sgd(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening, flags,
                     alpha, eps, stash_mode, grad_scale, old_grad_scale, found_inf) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.gsam_restore_sgd_``."""
    has_buf = len(momentum_buffers) > 0
    bufs = momentum_buffers if has_buf else params
    tables = build_tables([params, grads, stash, bufs, old_grads], [lr, weight_decay, momentum, dampening], flags,
                          signature_streams=(0, 2))
    coefs, stats = _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf)
    for tb in tables:
        o = offsets(tb, L)
        if tb.n_chunks:
            _gsam_sgd_kernel[(tb.n_chunks,)](
                tb.meta, tb.fmeta, coefs, o.numel, o.flags, o.params, o.chunk_tensor, o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]], SD=TL_DTYPE[tb.dtypes[1]], ACC=_acc(tb.dtypes[0]), COPY=stash_mode == 0,
                HAS_BUF=has_buf, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    return stats
