"""Triton kernels of Momentum-SAM (saf_kernels/ops/msam.py) on the multi-tensor skeleton.

Two passes, the fewest the rule allows: (1) un-perturb, momentum (AdamW: moments), step, and the
partial sums of ``|buf|^2`` in the same pass (the partials kernel's term stores as it sums);
a one-program finalize writes ``inv_norm = 1 / (|buf| + eps)``; (2) the re-perturbation
``w -= rho * inv_norm * buf``. ``inv_norm`` is read by pass 1 (the previous step's) before the
finalize overwrites it (launches on one stream run in order). No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    VARYING_ARGS,
    any_f64,
    block_of,
    build_tables,
    chunk_partials,
    launch_elementwise,
    stream_ptr,
    sum_partials,
)


@triton.jit
def _sgd_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
              OPT):
    """Streams (w, g, buf); params (lr, wd, momentum, rho_prev, rho); ``pa``: inv_norm."""
    lr = tl.load(fmeta + O_PARAMS + t * 5).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 5 + 1).to(ACC)
    mom = tl.load(fmeta + O_PARAMS + t * 5 + 2).to(ACC)
    up = (tl.load(fmeta + O_PARAMS + t * 5 + 3) * tl.load(pa).to(tl.float64)).to(ACC)
    down = (tl.load(fmeta + O_PARAMS + t * 5 + 4) * tl.load(pa).to(tl.float64)).to(ACC)
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, DT))
    return ptrs, lr, wd, mom, up, down


@triton.jit
def _sgd_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """Pass 1: ``d = g + wd w``; ``w += up buf``; ``buf = mom buf + d``; ``w -= lr buf``; sum ``buf^2``."""
    ptrs, lr, wd, mom, up, down = ctx
    w, g, bp = ptrs
    idx, m = block_of(start, off, end, BLOCK)
    wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
    bv = tl.load(bp + idx, mask=m, other=0.0).to(ACC)
    dv = tl.load(g + idx, mask=m, other=0.0).to(ACC) + wd * wv
    wv = wv + up * bv
    nb = (mom * bv + dv).to(DT)
    tl.store(bp + idx, nb, mask=m)
    nbv = nb.to(ACC)
    tl.store(w + idx, (wv - lr * nbv).to(DT), mask=m)
    return a + nbv * nbv, b, d


@triton.jit
def _perturb_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
                  HAS_FOUND, OPT):
    """Pass 2 (both rules): ``w`` is stream 0, the buffer stream ``OPT`` is not used: the buffer
    is stream 2 (SGD: buf; AdamW tables put exp_avg there too); param column 4 (SGD) or 7 (AdamW)."""
    k = tl.where(OPT, 8, 5)
    col = tl.where(OPT, 7, 4)
    down = (tl.load(fmeta + O_PARAMS + t * k + col) * tl.load(pa).to(tl.float64)).to(ACC)
    return stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 2, L, DT), down


@triton.jit
def _perturb_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    w, bp, down = ctx
    idx, m = block_of(start, off, end, BLOCK)
    wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
    bv = tl.load(bp + idx, mask=m, other=0.0).to(ACC)
    tl.store(w + idx, (wv - down * bv).to(DT), mask=m)


@triton.jit
def _adamw_prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
                HAS_FOUND, OPT):
    """Streams (w, g, exp_avg, exp_avg_sq, step); params (lr, b1, b2, eps, wd, rho_prev, -, rho)."""
    lr = tl.load(fmeta + O_PARAMS + t * 8)
    b1 = tl.load(fmeta + O_PARAMS + t * 8 + 1)
    b2 = tl.load(fmeta + O_PARAMS + t * 8 + 2)
    eps = tl.load(fmeta + O_PARAMS + t * 8 + 3).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 8 + 4)
    up = (tl.load(fmeta + O_PARAMS + t * 8 + 5) * tl.load(pa).to(tl.float64)).to(ACC)
    step = tl.load(stream_ptr(meta, t, 4, L, tl.float32)).to(tl.float64)
    step_size = (lr / (1.0 - tl.exp(step * tl.log(b1)))).to(ACC)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(b2))).to(ACC)
    hyper = (eps, step_size, bc2_sqrt, (1.0 - lr * wd).to(ACC), b1.to(ACC), b2.to(ACC), up)
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, DT),
            stream_ptr(meta, t, 3, L, DT))
    return ptrs, hyper


@triton.jit
def _adamw_term(ctx, start, off, end, seed, offset, a, b, d, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """Pass 1: un-perturb, moments, Adam step, then the decay (the authors' order); sum ``m^2``."""
    ptrs, hyper = ctx
    w, g, mp, vp = ptrs
    eps, step_size, bc2_sqrt, decay, b1, b2, up = hyper
    idx, m = block_of(start, off, end, BLOCK)
    mv = tl.load(mp + idx, mask=m, other=0.0).to(ACC)
    vv = tl.load(vp + idx, mask=m, other=0.0).to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    wv = tl.load(w + idx, mask=m, other=0.0).to(ACC) + up * mv
    nm = (mv * b1 + (1.0 - b1) * gv).to(DT)
    nv = vv * b2 + (1.0 - b2) * gv * gv
    nmv = nm.to(ACC)
    wv = (wv - step_size * (nmv / (tl.sqrt(nv) / bc2_sqrt + eps))) * decay
    tl.store(mp + idx, nm, mask=m)
    tl.store(vp + idx, nv.to(DT), mask=m)
    tl.store(w + idx, wv.to(DT), mask=m)
    return a + nmv * nmv, b, d


@triton.jit(do_not_specialize=VARYING_ARGS)
def _inv_kernel(partial_ptr, n, inv_ptr, out_ptr, eps: tl.float64, BLOCK: tl.constexpr):
    norm = tl.sqrt(sum_partials(partial_ptr, n, BLOCK))
    tl.store(inv_ptr, (1.0 / (norm + eps)).to(inv_ptr.dtype.element_ty))
    tl.store(out_ptr, norm.to(out_ptr.dtype.element_ty))


def _finish(tables, n_streams, partials, total, inv_norm, params, eps, adamw):
    out = torch.empty((), dtype=torch.float64 if any_f64(params) else torch.float32, device=params[0].device)
    _inv_kernel[(1,)](partials, total, inv_norm, out, eps, BLOCK=1024)
    launch_elementwise(_perturb_prep, _perturb_elem, tables, n_streams, pa=inv_norm, OPT=adamw)
    return out


def msam_sgd(params, grads, bufs, inv_norm, lr, weight_decay, momentum, rho_prev, rho, eps) -> torch.Tensor:
    """The semantics of ``saf_kernels::msam_sgd_triton`` (lists already checked)."""
    tables = build_tables([params, grads, bufs], [lr, weight_decay, momentum, rho_prev, rho], [0])
    partials, total = chunk_partials(_sgd_prep, _sgd_term, tables, 3, pa=inv_norm)
    return _finish(tables, 3, partials, total, inv_norm, params, eps, False)


def msam_adamw(params, grads, exp_avg, exp_avg_sq, steps, inv_norm, lr, beta1, beta2, eps, weight_decay, rho_prev,
               rho, norm_eps) -> torch.Tensor:
    """The semantics of ``saf_kernels::msam_adamw_triton``."""
    tables = build_tables([params, grads, exp_avg, exp_avg_sq, steps],
                          [lr, beta1, beta2, eps, weight_decay, rho_prev, rho_prev, rho], [0])
    partials, total = chunk_partials(_adamw_prep, _adamw_term, tables, 5, pa=inv_norm)
    return _finish(tables, 5, partials, total, inv_norm, params, norm_eps, True)
