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

from .esam import chunk_of, rng_bases, stream_ptr
from .multi_tensor import (
    BLOCK,
    CHUNK,
    TL_DTYPE,
    VARYING_ARGS,
    PlanCache,
    any_f64,
    build_tables,
    offsets,
    tensor_key,
    upload,
)
from .sam import _sam_coef_kernel

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
def _direction(w, g, s, idx, m, li, ACC: tl.constexpr):
    wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
    gv = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    sv = tl.load(s + idx, mask=m, other=0.0).to(ACC)
    return li * gv + (wv - sv), sv


@triton.jit(do_not_specialize=VARYING_ARGS)
def _rsam_norm_kernel(meta, partial_ptr, part_off, lam: tl.float64, scale_ptr, O_NUMEL, O_CT, O_CS, DT: tl.constexpr,
                      ACC: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 3, DT)
    g = stream_ptr(meta, t, 1, 3, DT)
    s = stream_ptr(meta, t, 2, 3, DT)
    li = tl.full([], lam, tl.float64)
    if HAS_SCALE:
        li = li / tl.load(scale_ptr).to(tl.float64)
    li = li.to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        d, _ = _direction(w, g, s, start + lane, lane < end, li, ACC)
        acc += d * d
    tl.store(partial_ptr + part_off + tl.program_id(0), tl.sum(acc).to(tl.float64))


@triton.jit(do_not_specialize=VARYING_ARGS)
def _rsam_perturb_kernel(meta, fmeta, coef_ptr, lam: tl.float64, scale_ptr, O_NUMEL, O_PARAMS, O_CT, O_CS,
                         DT: tl.constexpr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 3, DT)
    g = stream_ptr(meta, t, 1, 3, DT)
    s = stream_ptr(meta, t, 2, 3, DT)
    coef = tl.load(coef_ptr)
    ok = coef != 0.0  # 0: back to the clean weights, bit exact
    rc = (tl.load(fmeta + O_PARAMS + t) * coef).to(ACC)
    li = tl.full([], lam, tl.float64)
    if HAS_SCALE:
        li = li / tl.load(scale_ptr).to(tl.float64)
    li = li.to(ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        d, sv = _direction(w, g, s, idx, m, li, ACC)
        sr = tl.load(s + idx, mask=m, other=0.0)
        tl.store(w + idx, tl.where(ok, (sv + rc * d).to(DT), sr), mask=m)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(p: torch.Tensor) -> tuple[int, int, bool]:
    """(units, unit length, one-unit tensor) as csrc/mt_plan_esam.h's rsam_noise_plan."""
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
                                       ACC=_acc(dtype), RB=rb, CB=cb, num_warps=4)


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


def rsam_perturb(params, grads, stash, rho, lam, eps, grad_scale, found_inf) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.rsam_perturb_``."""
    dev = params[0].device
    tables = build_tables([params, grads, stash], [rho], [0] * len(params))
    total = sum(tb.n_chunks for tb in tables)
    partials = torch.empty(max(total, 1), dtype=torch.float64, device=dev)
    has_scale = grad_scale is not None
    off = 0
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _rsam_norm_kernel[(tb.n_chunks,)](
                tb.meta, partials, off, lam, grad_scale if has_scale else partials, o.numel, o.chunk_tensor,
                o.chunk_start, DT=TL_DTYPE[tb.dtypes[0]], ACC=_acc(tb.dtypes[0]), HAS_SCALE=has_scale, CHUNK=CHUNK,
                BLOCK=BLOCK, num_warps=4)
        off += tb.n_chunks
    norm = torch.empty((), dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    coef = torch.empty((), dtype=torch.float64, device=dev)
    # d is already unscaled: no grad_scale in the finalize, only found_inf.
    _sam_coef_kernel[(1,)](partials, total, coef, found_inf if found_inf is not None else coef, norm, coef, eps,
                           HAS_SCALE=False, HAS_FOUND=found_inf is not None, BLOCK=1024)
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _rsam_perturb_kernel[(tb.n_chunks,)](
                tb.meta, tb.fmeta, coef, lam, grad_scale if has_scale else partials, o.numel, o.params,
                o.chunk_tensor, o.chunk_start, DT=TL_DTYPE[tb.dtypes[0]], ACC=_acc(tb.dtypes[0]), HAS_SCALE=has_scale,
                CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    return norm
