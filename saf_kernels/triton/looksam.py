"""Triton kernels of LookSAM (saf_kernels/ops/looksam.py), on the multi-tensor skeleton
(multi_tensor.py): element functions and one-program finalizes only.

looksam_gv: partials of ``<g, g_s>``, ``|g|^2``, ``|g_s|^2`` -> finalize (the coefficient
``<g, g_s> / |g|^2`` and whether it applies, the stats) -> one pass writing ``g_v`` *and*
summing ``|g_v|^2`` (the partials kernel's term stores as it sums) -> finalize (``|g_v|``).
looksam_combine: partials of ``|g|^2`` -> finalize (``alpha |g| / (|g_v| + eps)``) -> one
elementwise pass. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import VARYING_ARGS, any_f64, block_of, build_tables, chunk_partials, launch_elementwise
from .multi_tensor import stream_ptr, sum_partials


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    """Streams (a, b, c): gv, g_s, g for looksam_gv; g, gv (, gv) for looksam_combine; ``pa``:
    the coefficients in device memory."""
    return (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, DT),
            tl.load(pa).to(ACC), tl.load(pa + 1) != 0.0)


@triton.jit
def _dots_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """``<g, g_s>``, ``|g|^2``, ``|g_s|^2``."""
    v, gs, g, c, ok = ctx
    idx, m = block_of(start, off, end, BLOCK)
    sv = tl.load(gs + idx, mask=m, other=0.0).to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    return a + gv * sv, b + gv * gv, d + sv * sv


@triton.jit
def _write_gv_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """``gv = g_s - c g`` where the coefficient applies (else unchanged), summing ``|gv|^2``."""
    v, gs, g, c, ok = ctx
    idx, m = block_of(start, off, end, BLOCK)
    old = tl.load(v + idx, mask=m, other=0.0)
    new = (tl.load(gs + idx, mask=m, other=0.0).to(ACC) - c * tl.load(g + idx, mask=m, other=0.0).to(ACC)).to(DT)
    out = tl.where(ok, new, old)
    tl.store(v + idx, out, mask=m)
    o = out.to(ACC)
    return a + o * o, b, d


@triton.jit
def _sq_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    g = ctx[0]
    idx, m = block_of(start, off, end, BLOCK)
    x = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    return a + x * x, b, d


@triton.jit
def _combine_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """``g += coef * gv`` where it applies."""
    g, v, _, c, ok = ctx
    idx, m = block_of(start, off, end, BLOCK)
    gr = tl.load(g + idx, mask=m, other=0.0)
    new = (gr.to(ACC) + c * tl.load(v + idx, mask=m, other=0.0).to(ACC)).to(DT)
    tl.store(g + idx, tl.where(ok, new, gr), mask=m)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gv_coef_kernel(partial_ptr, n, stride, coef_ptr, stats_ptr, eps: tl.float64, BLOCK: tl.constexpr):
    dot = sum_partials(partial_ptr, n, BLOCK)
    gg = sum_partials(partial_ptr + stride, n, BLOCK)
    ss = sum_partials(partial_ptr + 2 * stride, n, BLOCK)
    c = dot / gg
    chk = c + ss
    ok = ((chk - chk) == 0.0) & (gg > 0.0)
    tl.store(coef_ptr, tl.where(ok, c, 0.0))
    tl.store(coef_ptr + 1, tl.where(ok, 1.0, 0.0))
    n_old = tl.sqrt(gg)
    n_new = tl.sqrt(ss)
    tl.store(stats_ptr, (dot / (n_old * n_new + eps)).to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + 1, n_old.to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + 2, n_new.to(stats_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=VARYING_ARGS)
def _gv_norm_kernel(partial_ptr, n, coef_ptr, norm_ptr, BLOCK: tl.constexpr):
    vv = sum_partials(partial_ptr, n, BLOCK)
    ok = tl.load(coef_ptr + 1) != 0.0
    old = tl.load(norm_ptr).to(tl.float64)
    tl.store(norm_ptr, tl.where(ok, tl.sqrt(vv), old).to(norm_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=VARYING_ARGS)
def _combine_coef_kernel(partial_ptr, n, norm_ptr, coef_ptr, out_ptr, alpha: tl.float64, eps: tl.float64,
                         BLOCK: tl.constexpr):
    ng = tl.sqrt(sum_partials(partial_ptr, n, BLOCK))
    nv = tl.load(norm_ptr).to(tl.float64)
    chk = ng + nv
    ok = ((chk - chk) == 0.0) & (nv > 0.0)
    tl.store(coef_ptr, tl.where(ok, alpha * ng / (nv + eps), 0.0))
    tl.store(coef_ptr + 1, tl.where(ok, 1.0, 0.0))
    tl.store(out_ptr, ng.to(out_ptr.dtype.element_ty))


def looksam_gv(gv, gv_norm, grads, old_grads, eps, sums=None) -> torch.Tensor:
    """The semantics of ``saf_kernels::looksam_gv_triton`` (lists already checked); ``sums``: the
    all-reduced ``[<g, g_s>, |g|^2, |g_s|^2]`` of every shard, instead of this list's."""
    dev = gv[0].device
    tables = build_tables([gv, grads, old_grads], [], [0])
    coef = torch.zeros(2, dtype=torch.float64, device=dev)
    if sums is None:
        partials, total = chunk_partials(_prep, _dots_term, tables, 3, nsum=3, pa=coef)
    else:
        partials, total = sums.to(torch.float64).reshape(3).contiguous(), 1
    stats = torch.empty(3, dtype=torch.float64 if any_f64(gv) else torch.float32, device=dev)
    _gv_coef_kernel[(1,)](partials, total, max(total, 1), coef, stats, eps, BLOCK=1024)
    partials, total = chunk_partials(_prep, _write_gv_term, tables, 3, nsum=1, pa=coef)
    _gv_norm_kernel[(1,)](partials, total, coef, gv_norm, BLOCK=1024)
    return stats


def looksam_combine(grads, gv, gv_norm, alpha, eps, sumsq=None) -> torch.Tensor:
    """The semantics of ``saf_kernels::looksam_combine_triton``; ``sumsq``: ``|g|^2`` of every shard."""
    dev = grads[0].device
    tables = build_tables([grads, gv, gv], [], [0])
    coef = torch.zeros(2, dtype=torch.float64, device=dev)
    if sumsq is None:
        partials, total = chunk_partials(_prep, _sq_term, tables, 3, nsum=1, pa=coef)
    else:
        partials, total = sumsq.to(torch.float64).reshape(1).contiguous(), 1
    out = torch.empty((), dtype=torch.float64 if any_f64(grads) else torch.float32, device=dev)
    _combine_coef_kernel[(1,)](partials, total, gv_norm, coef, out, alpha, eps, BLOCK=1024)
    launch_elementwise(_prep, _combine_elem, tables, 3, pa=coef)
    return out
