"""Triton kernels of R-SAM (same math as csrc/include/saf/multi_tensor.h, namespace rsam).

``rsam_noise``: one program per tile of whole rows (output units) of one tensor, ``RB x CB``
elements per step with ``CB`` the row length rounded up to a power of two (at most BLOCK), so a
unit's norm is a reduction over axis 1 of the tile and the noise is applied in the same program;
the normals are Triton's ``tl.randn4x(seed, offset + position // 4)``, word ``position % 4``, the
stream of csrc/include/saf/philox.h. One launch per (dtype, CB) group.

``rsam_perturb``: norm partials of ``d = lam * g / grad_scale + (w - stash)`` per chunk, the SAM
finalize (fixed-order sum, no host synchronisation), then ``w = stash + rho * d * coef``.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .esam import rng_bases
from .multi_tensor import (
    BLOCK,
    TL_DTYPE,
    VARYING_ARGS,
    PlanCache,
    acc_dtype,
    block_of,
    build_tables,
    chunk_partials,
    launch_elementwise,
    stream_ptr,
    tensor_key,
    upload,
)
from .sam import sam_finalize

VECTOR_FLAG = 2


@triton.jit(do_not_specialize=VARYING_ARGS)
def _rsam_noise_kernel(meta, fmeta, seed: tl.int64, offset: tl.int64, std_mult: tl.float64, O_ROWS, O_LEN, O_FLAGS,
                       O_PARAMS, O_PT, O_PR, DT: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr,
                       CB: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(meta + O_PT + pid)
    r0 = tl.load(meta + O_PR + pid)
    w = stream_ptr(meta, t, 0, 2, DT)
    s = stream_ptr(meta, t, 1, 2, DT)
    nrows = tl.load(meta + O_ROWS + t)
    rlen = tl.load(meta + O_LEN + t)
    vector = (tl.load(meta + O_FLAGS + t) & 2) != 0
    std = tl.load(fmeta + O_PARAMS + t * 2) * std_mult
    base = tl.load(fmeta + O_PARAMS + t * 2 + 1).to(tl.int64)
    rows = r0 + tl.arange(0, RB)
    rmask = rows < nrows
    acc = tl.zeros([RB, CB], ACC)
    for c0 in range(0, rlen, CB):
        cols = c0 + tl.arange(0, CB)
        m = rmask[:, None] & (cols < rlen)[None, :]
        x = tl.load(w + rows[:, None] * rlen + cols[None, :], mask=m, other=0.0).to(ACC)
        acc += x * x
    norm = tl.sqrt(tl.sum(acc, axis=1).to(tl.float64))
    scale = (std * (norm + tl.where(vector, 1e-16, 0.0))).to(ACC)
    for c0 in range(0, rlen, CB):
        cols = c0 + tl.arange(0, CB)
        m = rmask[:, None] & (cols < rlen)[None, :]
        e = rows[:, None] * rlen + cols[None, :]
        pos = base + e
        lane = pos % 4
        n0, n1, n2, n3 = tl.randn4x(seed, offset + pos // 4)
        z = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
        wr = tl.load(w + e, mask=m, other=0.0)
        tl.store(s + e, wr, mask=m)
        tl.store(w + e, (wr.to(ACC) + scale[:, None] * z.to(ACC)).to(DT), mask=m)


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    """Streams (w, g, stash); lam / grad_scale (``x`` = lam, ``pa`` = grad_scale) in ACC; with a
    coef (``pb``, OPT): rho * coef and whether it is nonzero."""
    li = tl.full([], x, tl.float64)
    if HAS_SCALE:
        li = li / tl.load(pa).to(tl.float64)
    rc = tl.load(fmeta + O_PARAMS + t).to(ACC)
    ok = True
    if OPT:
        coef = tl.load(pb)
        rc = (tl.load(fmeta + O_PARAMS + t) * coef).to(ACC)
        ok = coef != 0.0  # 0: back to the clean weights, bit exact
    ptrs = (stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, DT), stream_ptr(meta, t, 2, L, DT))
    return ptrs, li.to(ACC), rc, ok


@triton.jit
def _direction(ctx, idx, m, ACC):
    """``d = lam * g / grad_scale + (w - stash)`` and the stash."""
    ptrs, li, rc, ok = ctx
    w, g, s = ptrs
    wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    sv = tl.load(s + idx, mask=m, other=0.0).to(ACC)
    return li * gv + (wv - sv), sv


@triton.jit
def _norm_term(ctx, start, off, end, seed, offset, a0, a1, a2, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    idx, m = block_of(start, off, end, BLOCK)
    d, _ = _direction(ctx, idx, m, ACC)
    return a0 + d * d, a1, a2


@triton.jit
def _perturb_elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    """``w = stash + rho * d * coef`` (the stash's bits when coef is 0)."""
    ptrs, li, rc, ok = ctx
    w, g, s = ptrs
    idx, m = block_of(start, off, end, BLOCK)
    d, sv = _direction(ctx, idx, m, ACC)
    sr = tl.load(s + idx, mask=m, other=0.0)
    tl.store(w + idx, tl.where(ok, (sv + rc * d).to(DT), sr), mask=m)


def _rows(p: torch.Tensor) -> tuple[int, int, bool]:
    """(units, unit length, one-unit tensor) as csrc/mt_plan.h's row plan of rsam_noise_."""
    if p.dim() < 2 or p.numel() == 0:
        return 1, max(1, p.numel()), True
    return p.shape[0], p.numel() // p.shape[0], False


def rsam_noise(params, stash, std, seed, offset) -> None:
    """The semantics of ``torch.ops.saf_kernels.rsam_noise_`` (lists already checked)."""
    if not params:
        return
    # One std for all tensors (the usual case) is a kernel argument, so that a schedule of std
    # does not change the (cached) tables.
    common = std[0] if std and all(x == std[0] for x in std) else 1.0
    scale = float(common) if common else 1.0
    rel = tuple(x / scale for x in std)
    key = (tensor_key([params, stash]), tuple(p.shape for p in params), rel)
    plans = NOISE_PLANS.get(key, params[0].device, lambda up: _noise_plans(params, stash, rel, up))
    for meta, n_progs, offs, dtype, rb, cb in plans:
        _rsam_noise_kernel[(n_progs,)](meta, meta.view(torch.float64), seed, offset, scale, *offs, DT=TL_DTYPE[dtype],
                                       ACC=acc_dtype(dtype), RB=rb, CB=cb, num_warps=4)


NOISE_PLANS = PlanCache()


def _noise_plans(params, stash, rel_std, uploads) -> list[tuple]:
    """Per (dtype, row tile) group: the table, its program count and offsets."""
    bases = rng_bases(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        _, rlen, _ = _rows(p)
        cb = min(BLOCK, triton.next_power_of_2(rlen))
        groups.setdefault((p.dtype, cb), []).append(i)
    plans = []
    for (dtype, cb), idx in groups.items():
        rb = max(1, BLOCK // cb)
        n = len(idx)
        addr = np.array([[params[i].data_ptr(), stash[i].data_ptr()] for i in idx], dtype=np.int64)
        shape = [_rows(params[i]) for i in idx]
        nrows = np.array([r for r, _, _ in shape], dtype=np.int64)
        rlen = np.array([c for _, c, _ in shape], dtype=np.int64)
        flags = np.array([VECTOR_FLAG if v else 0 for _, _, v in shape], dtype=np.int64)
        par = np.array([[rel_std[i], bases[i]] for i in idx], dtype=np.float64)
        progs = [(k, r0) for k in range(n) for r0 in range(0, int(nrows[k]), rb)]
        pt = np.array([k for k, _ in progs], dtype=np.int64)
        pr = np.array([r for _, r in progs], dtype=np.int64)
        arr = np.concatenate([addr.reshape(-1), nrows, rlen, flags, par.reshape(-1).view(np.int64), pt, pr])
        meta = upload(arr, params[idx[0]].device, uploads)
        o_rows = 2 * n
        o_len, o_flags, o_params = o_rows + n, o_rows + 2 * n, o_rows + 3 * n
        o_pt = o_params + 2 * n
        plans.append((meta, len(progs), (o_rows, o_len, o_flags, o_params, o_pt, o_pt + len(progs)), dtype, rb, cb))
    return plans


def rsam_perturb(params, grads, stash, rho, lam, eps, grad_scale, found_inf, sumsq=None) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.rsam_perturb_``. With ``sumsq`` (the all-reduced
    :func:`rsam_sumsq` of every shard) the partial-sum stage is skipped."""
    tables = build_tables([params, grads, stash], [rho], [0] * len(params))
    scaled = dict(x=lam, pa=grad_scale, HAS_SCALE=grad_scale is not None)
    if sumsq is None:
        partials, total = chunk_partials(_prep, _norm_term, tables, 3, **scaled)
    else:
        partials, total = sumsq.to(torch.float64).reshape(1).contiguous(), 1
    # d is already unscaled: no grad_scale in the finalize, only found_inf.
    norm, coef = sam_finalize(partials, total, params, eps, None, found_inf)
    launch_elementwise(_prep, _perturb_elem, tables, 3, pb=coef, OPT=True, **scaled)
    return norm


def rsam_sumsq(params, grads, stash, lam, grad_scale) -> torch.Tensor:
    """The partial-sum stage of :func:`rsam_perturb` alone: ``sum(d^2)`` (unscaled), float64."""
    tables = build_tables([params, grads, stash], [[0.0] * len(params)], [0] * len(params))
    partials, total = chunk_partials(_prep, _norm_term, tables, 3, x=lam, pa=grad_scale,
                                     HAS_SCALE=grad_scale is not None)
    return partials[:total].sum()
