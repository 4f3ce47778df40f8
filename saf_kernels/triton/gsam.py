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

from .multi_tensor import VARYING_ARGS, any_f64, block_of, build_tables, chunk_partials, launch_elementwise
from .multi_tensor import restored, stream_ptr, sum_partials
from .sam import sgd_decayed, sgd_flags, sgd_momentum, skipped

L = 5  # streams: w, g, stash, momentum buffer, old_g


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    """Streams (w, g, stash, momentum buffer, old_g); the coefficients (``pa``: c_new, c_old,
    apply) in ACC."""
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, SD),
            stream_ptr(meta, t, 3, L, DT), stream_ptr(meta, t, 4, L, DT))
    return ptrs, tl.load(pa).to(ACC), tl.load(pa + 1).to(ACC), tl.load(pa + 2) != 0.0


@triton.jit
def _dots_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
               OPT):
    return stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 4, L, DT)


@triton.jit
def _dots_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """``<old_g, g>``, ``|old_g|^2``, ``|g|^2``."""
    g, o = ctx
    idx, m = block_of(start, off, end, BLOCK)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    ov = tl.load(o + idx, mask=m, other=0.0).to(ACC)
    return a + ov * gv, b + ov * ov, d + gv * gv


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gsam_coef_kernel(partial_ptr, n, stride, scale_ptr, old_scale_ptr, found_ptr, coef_ptr, stats_ptr, alpha: tl.float64,
                      eps: tl.float64, HAS_SCALE: tl.constexpr, HAS_OLD_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The finalize: fixed-order sums of the three rows of partials (``n`` each, row stride
    ``stride``), the coefficients and the stats in device memory."""
    dot = sum_partials(partial_ptr, n, BLOCK)
    oo = sum_partials(partial_ptr + stride, n, BLOCK)
    gg = sum_partials(partial_ptr + 2 * stride, n, BLOCK)
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
def _combine_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """The combined gradient written into g (OPT: restore the weights in the same pass)."""
    ptrs, cn, co, apply = ctx
    w, g, s, b, o = ptrs
    idx, m = block_of(start, off, end, BLOCK)
    if OPT:
        sr, wv = restored(w, s, idx, m, ACC, COPY)
        if COPY:
            tl.store(w + idx, sr, mask=m)
        else:
            tl.store(w + idx, wv.to(DT), mask=m)
    gr = tl.load(g + idx, mask=m, other=0.0)
    ov = tl.load(o + idx, mask=m, other=0.0).to(ACC)
    # c_old == 0 (alpha = 0, or an undefined decomposition): old_g must not count (0 * inf).
    new = tl.where(co == 0.0, cn * gr.to(ACC), cn * gr.to(ACC) + co * ov)
    tl.store(g + idx, tl.where(apply, new.to(DT), gr), mask=m)


@triton.jit
def _sgd_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
              OPT):
    ctx = _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
                OPT)
    return ctx, sgd_flags(meta, fmeta, t, O_FLAGS, O_PARAMS, ACC)


@triton.jit
def _sgd_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """Restore + one torch.optim.SGD step with the combined gradient (OPT: momentum buffers)."""
    coefs, opt = ctx
    ptrs, cn, co, apply = coefs
    w, g, s, b, o = ptrs
    lr, wd, mom, damp, nesterov, maximize, first = opt
    use_buf = mom != 0.0
    skip = apply == 0
    idx, m = block_of(start, off, end, BLOCK)
    sr, wv = restored(w, s, idx, m, ACC, COPY)
    d = cn * tl.load(g + idx, mask=m, other=0.0).to(ACC)
    d = tl.where(co == 0.0, d, d + co * tl.load(o + idx, mask=m, other=0.0).to(ACC))
    d = sgd_decayed(d, wv, wd, maximize)
    if OPT:
        bv = tl.load(b + idx, mask=m, other=0.0).to(ACC)
        d, nb = sgd_momentum(d, bv, mom, damp, nesterov, first, use_buf)
        # Unchanged where there is no momentum or the step is skipped (selects, not masks:
        # scalar & block masks fail under the interpreter).
        tl.store(b + idx, tl.where(skip, bv, tl.where(use_buf, nb, bv)).to(DT), mask=m)
    tl.store(w + idx, skipped((wv - lr * d).to(DT), skip, sr, wv, DT, COPY), mask=m)


def _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf, sums=None):
    if sums is None:
        partials, total = chunk_partials(_dots_prep, _dots_term, tables, L, nsum=3)
    else:  # sharded: the all-reduced sums of every shard's partials (rows of one value)
        partials, total = sums.to(torch.float64).reshape(3).contiguous(), 1
    dev = partials.device
    coefs = torch.empty(3, dtype=torch.float64, device=dev)
    stats = torch.empty(3, dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    _gsam_coef_kernel[(1,)](partials, total, max(total, 1), grad_scale if grad_scale is not None else coefs,
                            old_grad_scale if old_grad_scale is not None else coefs,
                            found_inf if found_inf is not None else coefs, coefs, stats, alpha, eps,
                            HAS_SCALE=grad_scale is not None, HAS_OLD_SCALE=old_grad_scale is not None,
                            HAS_FOUND=found_inf is not None, BLOCK=1024)
    return coefs, stats


def gsam_sums(grads, old_grads) -> torch.Tensor:
    """The partial-sum stage of the GSAM ops alone: ``[<old_g, g>, |old_g|^2, |g|^2]`` over the
    tensors, float64 (the gradients stand in for the unused streams)."""
    tables = build_tables([grads, grads, grads, grads, old_grads], [[0.0] * len(grads)] * 4, [0] * len(grads),
                          signature_streams=(0, 2))
    partials, total = chunk_partials(_dots_prep, _dots_term, tables, L, nsum=3)
    return partials.view(3, -1)[:, :total].sum(1)


def gsam_combine(params, grads, old_grads, stash, alpha, eps, stash_mode, restore, grad_scale, old_grad_scale,
                 found_inf, sums=None) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.gsam_combine_`` (lists already checked); ``sums``
    as :func:`gsam_restore_sgd`."""
    st = stash if restore else params
    tables = build_tables([params, grads, st, params, old_grads], [[0.0] * len(params)] * 4, [0] * len(params),
                          signature_streams=(0, 2))
    coefs, stats = _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf, sums)
    launch_elementwise(_prep, _combine_elem, tables, L, pa=coefs, COPY=stash_mode == 0, OPT=restore)
    return stats


def gsam_restore_sgd(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening, flags,
                     alpha, eps, stash_mode, grad_scale, old_grad_scale, found_inf, sums=None) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.gsam_restore_sgd_``. With ``sums`` (the
    all-reduced :func:`gsam_sums` of every shard) the partial-sum stage is skipped."""
    has_buf = len(momentum_buffers) > 0
    bufs = momentum_buffers if has_buf else params
    tables = build_tables([params, grads, stash, bufs, old_grads], [lr, weight_decay, momentum, dampening], flags,
                          signature_streams=(0, 2))
    coefs, stats = _reduce(tables, params, alpha, eps, grad_scale, old_grad_scale, found_inf, sums)
    launch_elementwise(_sgd_prep, _sgd_elem, tables, L, pa=coefs, COPY=stash_mode == 0, OPT=has_buf)
    return stats
