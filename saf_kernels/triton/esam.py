"""Triton kernels of ESAM's stochastic weight perturbation and of ``philox_`` (same math as
csrc/include/saf/multi_tensor.h, namespace esam).

Random numbers are Triton's own ``tl.randint4x(seed, counter)``: Philox4x32-10 with the key =
the seed's 64 bits and the counter in words (c0, c1), which is bit for bit the generator of
csrc/include/saf/philox.h. Each program handles one chunk 4 lanes at a time: counter j of the
chunk serves elements 4j .. 4j + 3 (every tensor's first position and every chunk start are
multiples of 4), so one Philox evaluation feeds 4 elements, as on CPU and CUDA.

``esam_perturb`` = per-chunk partial sums of the kept ``(T g)^2`` + the SAM finalize kernel
(saf_kernels/triton/sam.py: fixed-order sum, norm, coef, no host synchronisation) + the
perturbation, which regenerates the mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from .multi_tensor import (
    BLOCK,
    VARYING_ARGS,
    build_tables,
    chunk_partials,
    launch_elementwise,
    stream_ptr,
)
from .sam import adaptive_switch, sam_finalize
from .trajectory_loss import _to_storage

ADAPTIVE_FLAG = 2
_ADAPTIVE = tl.constexpr(ADAPTIVE_FLAG)
# Per-tensor float64 params of the ESAM tables: rho / beta, eta, Bernoulli threshold, rng base.
N_PARAMS = 4
LANES = BLOCK // 4  # counters per inner step


@triton.jit
def keep_of(r, thr):
    """Bernoulli decision of a Philox word: top 24 bits below the threshold."""
    return (r >> 8).to(tl.int64) < thr


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    """Streams (w, g, stash); eta, the threshold, the chunk's first Philox counter (less the
    call's offset), adaptive; with a coef (``pa``): rho / beta * coef and whether it is nonzero."""
    p = fmeta + O_PARAMS + t * 4
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, SD))
    ctr0 = (tl.load(p + 3).to(tl.int64) + start) // 4
    adaptive = (tl.load(meta + O_FLAGS + t) & _ADAPTIVE) != 0
    rc = tl.load(p).to(ACC)
    ok = True
    if HAS_SCALE:  # the perturbation: pa holds the coef (0: perturb nothing; the stash still serves the restore)
        coef = tl.load(pa)
        rc = (tl.load(p) * coef).to(ACC)
        ok = coef != 0.0
    return ptrs, tl.load(p + 1).to(ACC), tl.load(p + 2).to(tl.int64), ctr0, adaptive, rc, ok


@triton.jit
def _norm_lane(g, w, idx, m, r, thr, eta, adaptive, ACC, ADAPTIVE):
    x = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    if ADAPTIVE:  # plain ESAM never reads the weights here
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
        x = x * tl.where(adaptive, tl.abs(wv) + eta, 1.0)
    # A select, not a product: a dropped element's inf / NaN gradient must not reach the norm.
    x = tl.where(keep_of(r, thr) & m, x, 0.0)
    return x * x


@triton.jit
def _norm_term(ctx, start, off, end, seed, offset, a0, a1, a2, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """The kept ``(T g)^2``, 4 elements per Philox evaluation (OPT: some tensor is adaptive)."""
    ptrs, eta, thr, ctr0, adaptive, rc, ok = ctx
    w, g, s = ptrs
    j = off // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, offset + ctr0 + j)
    e = 4 * j
    a0 += _norm_lane(g, w, start + e, e < end, r0, thr, eta, adaptive, ACC, OPT)
    a0 += _norm_lane(g, w, start + e + 1, e + 1 < end, r1, thr, eta, adaptive, ACC, OPT)
    a0 += _norm_lane(g, w, start + e + 2, e + 2 < end, r2, thr, eta, adaptive, ACC, OPT)
    a0 += _norm_lane(g, w, start + e + 3, e + 3 < end, r3, thr, eta, adaptive, ACC, OPT)
    return a0, a1, a2


@triton.jit
def _perturb_lane(w, g, s, idx, m, r, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY):
    wr = tl.load(w + idx, mask=m, other=0.0)
    wv = wr.to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    tw = tl.where(adaptive, tl.abs(wv) + eta, 1.0)
    keep = (keep_of(r, thr).to(tl.int32) * ok.to(tl.int32)) != 0  # (a scalar & a block fails in the interpreter)
    ev = tl.where(keep, rc * (tw * tw) * gv, 0.0)
    if COPY:
        tl.store(s + idx, wr, mask=m)  # raw: bit exact
    else:
        er = _to_storage(ev, s)  # float64 -> 16 bits through float32, as sam.py
        tl.store(s + idx, er, mask=m)
        ev = er.to(ACC)  # add exactly what the restore subtracts
    # Dropped elements keep their exact bits.
    tl.store(w + idx, tl.where(keep, (wv + ev).to(DT), wr), mask=m)


@triton.jit
def _restore_lane(w, s, idx, m, r, thr, DT, ACC):
    wr = tl.load(w + idx, mask=m, other=0.0)
    sv = tl.load(s + idx, mask=m, other=0.0).to(ACC)
    tl.store(w + idx, tl.where(keep_of(r, thr), (wr.to(ACC) - sv).to(DT), wr), mask=m)


@triton.jit
def _lane(ctx, idx, m, r, DT, SD, ACC, COPY, RESTORE):
    ptrs, eta, thr, ctr0, adaptive, rc, ok = ctx
    w, g, s = ptrs
    if RESTORE:
        _restore_lane(w, s, idx, m, r, thr, DT, ACC)
    else:
        _perturb_lane(w, g, s, idx, m, r, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY)


@triton.jit
def _each_lane(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, RESTORE, BLOCK):
    """The perturbation or the delta restore of a block, one Philox evaluation per 4 elements."""
    j = off // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, offset + ctx[3] + j)
    e = 4 * j
    _lane(ctx, start + e, e < end, r0, DT, SD, ACC, COPY, RESTORE)
    _lane(ctx, start + e + 1, e + 1 < end, r1, DT, SD, ACC, COPY, RESTORE)
    _lane(ctx, start + e + 2, e + 2 < end, r2, DT, SD, ACC, COPY, RESTORE)
    _lane(ctx, start + e + 3, e + 3 < end, r3, DT, SD, ACC, COPY, RESTORE)


@triton.jit
def _perturb_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    _each_lane(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, False, BLOCK)


@triton.jit
def _restore_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """The delta restore: subtract the stash where the mask kept the element."""
    _each_lane(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, True, BLOCK)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _philox_kernel(out, n, seed: tl.int64, offset: tl.int64, thr, KIND: tl.constexpr, LANES: tl.constexpr):
    j = tl.program_id(0) * LANES + tl.arange(0, LANES)
    ctr = offset + j.to(tl.int64)
    if KIND == 2:
        a0, a1, a2, a3 = tl.randn4x(seed, ctr)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, ctr)
        if KIND == 0:
            a0, a1, a2, a3 = r0.to(tl.int64), r1.to(tl.int64), r2.to(tl.int64), r3.to(tl.int64)
        elif KIND == 1:
            a0, a1 = uint_to_uniform_float(r0), uint_to_uniform_float(r1)
            a2, a3 = uint_to_uniform_float(r2), uint_to_uniform_float(r3)
        else:
            a0, a1 = keep_of(r0, thr).to(tl.float32), keep_of(r1, thr).to(tl.float32)
            a2, a3 = keep_of(r2, thr).to(tl.float32), keep_of(r3, thr).to(tl.float32)
    e = 4 * j.to(tl.int64)
    tl.store(out + e, a0.to(out.dtype.element_ty), mask=e < n)
    tl.store(out + e + 1, a1.to(out.dtype.element_ty), mask=e + 1 < n)
    tl.store(out + e + 2, a2.to(out.dtype.element_ty), mask=e + 2 < n)
    tl.store(out + e + 3, a3.to(out.dtype.element_ty), mask=e + 3 < n)


def rng_bases(tensors) -> list[float]:
    """First Philox position of each tensor: element counts padded to multiples of 4."""
    out, off = [], 0
    for t in tensors:
        out.append(float(off))
        off += (t.numel() + 3) // 4 * 4
    return out


def _thresholds(beta) -> list[float]:
    from ..reference import bernoulli_threshold

    return [float(bernoulli_threshold(b)) for b in beta]


def esam_perturb(params, grads, stash, rho, eta, beta, flags, eps, seed, offset, stash_mode, grad_scale,
                 found_inf, sumsq=None) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.esam_perturb_`` (lists already checked). With
    ``sumsq`` (the all-reduced sum of every shard's :func:`esam_sumsq`) the partial-sum stage is
    skipped and the finalize reads that one value."""
    cols = [[r / b for r, b in zip(rho, beta)], eta, _thresholds(beta), rng_bases(params)]
    tables = build_tables([params, grads, stash], cols, flags, signature_streams=(0, 2))
    rng = dict(seed=seed, offset=offset)
    if sumsq is None:
        partials, total = _partials(tables, flags, len(params), rng)
    else:
        partials, total = sumsq.to(torch.float64).reshape(1).contiguous(), 1
    norm, coef = sam_finalize(partials, total, params, eps, grad_scale, found_inf)
    launch_elementwise(_prep, _perturb_elem, tables, 3, pa=coef, HAS_SCALE=True, COPY=stash_mode == 0, **rng)
    return norm


def _partials(tables, flags, n, rng):
    return chunk_partials(_prep, _norm_term, tables, 3, width=LANES, per_table=adaptive_switch(flags, n), **rng)


def esam_sumsq(params, grads, eta, beta, flags, seed, offset) -> torch.Tensor:
    """The partial-sum stage of :func:`esam_perturb` alone: ``sum((keep T g)^2)`` over the
    tensors, a 0-dim float64 tensor (the gradients stand in for the stash, never read)."""
    cols = [[0.0] * len(params), eta, _thresholds(beta), rng_bases(params)]
    tables = build_tables([params, grads, grads], cols, flags, signature_streams=(0, 2))
    partials, total = _partials(tables, flags, len(params), dict(seed=seed, offset=offset))
    return partials[:total].sum()


def esam_restore(params, stash, beta, seed, offset, stash_mode) -> None:
    """The semantics of ``torch.ops.saf_kernels.esam_restore_``."""
    if stash_mode == 0:
        from .sam import sam_restore

        sam_restore(params, stash, 0)  # bit exact; the mask is not needed
        return
    cols = [[0.0] * len(params), [0.0] * len(params), _thresholds(beta), rng_bases(params)]
    tables = build_tables([params, stash, stash], cols, [0] * len(params), signature_streams=(0, 2))
    launch_elementwise(_prep, _restore_elem, tables, 3, seed=seed, offset=offset)


def philox(out: torch.Tensor, seed: int, offset: int, kind: int, p: float) -> None:
    """The semantics of ``torch.ops.saf_kernels.philox_`` (out contiguous)."""
    from ..reference import bernoulli_threshold

    n = out.numel()
    if n == 0:
        return
    flat = out.view(-1)
    grid = (triton.cdiv(triton.cdiv(n, 4), LANES),)
    _philox_kernel[grid](flat, n, seed, offset, bernoulli_threshold(p), KIND=kind, LANES=LANES)
