"""Triton kernels of the SAM family (same math as csrc/include/saf/multi_tensor.h).

One program per chunk of a pointer table (saf_kernels/triton/multi_tensor.py), one launch per
dtype signature and pass. ``sam_perturb`` = norm partials (one per chunk) + a one-program
finalize (fixed-order sum; norm; coef = 1 / (norm + eps) / grad_scale, 0 when the norm is
non-finite or found_inf is set) + the perturbation, which reads coef from device memory: no host
synchronisation. Restore and fused restore + SGD / AdamW are one pass each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import BLOCK, CHUNK, TL_DTYPE, VARYING_ARGS, any_f64, build_tables, offsets
from .trajectory_loss import _to_storage

ADAPTIVE_FLAG = 2
SGD_NESTEROV, SGD_MAXIMIZE, SGD_FIRST_RUN = 2, 4, 8
ADAMW_MAXIMIZE = 2


@triton.jit
def _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(meta + O_CT + c)
    start = tl.load(meta + O_CS + c)
    numel = tl.load(meta + O_NUMEL + t)
    return t, start, tl.minimum(numel - start, CHUNK)


@triton.jit
def _ptr(meta, t, s, L: tl.constexpr, DT: tl.constexpr):
    return tl.load(meta + t * L + s).to(tl.pointer_type(DT))


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_norm_kernel(
    meta,
    fmeta,
    partial_ptr,
    part_off,
    O_NUMEL,
    O_FLAGS,
    O_PARAMS,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    g = _ptr(meta, t, 1, 3, DT)
    w = _ptr(meta, t, 0, 3, DT)
    adaptive = (tl.load(meta + O_FLAGS + t) & 2) != 0
    eta = tl.load(fmeta + O_PARAMS + t * 2 + 1).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        x = tl.load(g + start + lane, mask=m, other=0.0).to(ACC)
        if ADAPTIVE:  # plain SAM never reads the weights here
            wv = tl.load(w + start + lane, mask=m, other=0.0).to(ACC)
            x = x * tl.where(adaptive, tl.abs(wv) + eta, 1.0)
        acc += x * x
    tl.store(partial_ptr + part_off + tl.program_id(0), tl.sum(acc).to(tl.float64))


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
    acc = tl.zeros([BLOCK], tl.float64)
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + i, mask=i < n, other=0.0)
    s = tl.sum(acc)
    inv = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        inv = 1.0 / tl.load(scale_ptr).to(tl.float64)
    norm = tl.sqrt(s) * inv
    ok = (norm - norm) == 0.0  # false for inf and NaN
    if HAS_FOUND:
        ok = ok & (tl.load(found_ptr) <= 0)
    coef = tl.where(ok, inv / (norm + eps), 0.0)
    tl.store(norm_ptr, norm.to(norm_ptr.dtype.element_ty))
    tl.store(coef_ptr, coef)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_perturb_kernel(
    meta,
    fmeta,
    coef_ptr,
    O_NUMEL,
    O_FLAGS,
    O_PARAMS,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    SD: tl.constexpr,
    ACC: tl.constexpr,
    COPY: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = _ptr(meta, t, 0, 3, DT)
    g = _ptr(meta, t, 1, 3, DT)
    s = _ptr(meta, t, 2, 3, SD)
    coef = tl.load(coef_ptr)
    ok = coef != 0.0  # 0: perturb nothing (the stash still serves the restore)
    rc = (tl.load(fmeta + O_PARAMS + t * 2) * coef).to(ACC)
    eta = tl.load(fmeta + O_PARAMS + t * 2 + 1).to(ACC)
    adaptive = (tl.load(meta + O_FLAGS + t) & 2) != 0
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
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


@triton.jit
def _restored(w, s, idx, m, ACC: tl.constexpr, COPY: tl.constexpr):
    sr = tl.load(s + idx, mask=m, other=0.0)
    if COPY:
        wv = sr.to(ACC)
    else:
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC) - sr.to(ACC)
    return sr, wv


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_restore_kernel(
    meta,
    O_NUMEL,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    SD: tl.constexpr,
    ACC: tl.constexpr,
    COPY: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = _ptr(meta, t, 0, 3, DT)
    s = _ptr(meta, t, 2, 3, SD)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        sr, wv = _restored(w, s, idx, m, ACC, COPY)
        if COPY:
            tl.store(w + idx, sr, mask=m)
        else:
            tl.store(w + idx, wv.to(DT), mask=m)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_sgd_kernel(
    meta,
    fmeta,
    scale_ptr,
    found_ptr,
    O_NUMEL,
    O_FLAGS,
    O_PARAMS,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    SD: tl.constexpr,
    ACC: tl.constexpr,
    COPY: tl.constexpr,
    HAS_BUF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = _ptr(meta, t, 0, 4, DT)
    g = _ptr(meta, t, 1, 4, DT)
    s = _ptr(meta, t, 2, 4, SD)
    b = _ptr(meta, t, 3, 4, DT)
    lr = tl.load(fmeta + O_PARAMS + t * 4).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 4 + 1).to(ACC)
    mom = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(ACC)
    damp = tl.load(fmeta + O_PARAMS + t * 4 + 3).to(ACC)
    fl = tl.load(meta + O_FLAGS + t)
    nesterov = (fl & 2) != 0
    maximize = (fl & 4) != 0
    first = (fl & 8) != 0
    use_buf = mom != 0.0
    if HAS_FOUND:
        skip = tl.load(found_ptr) > 0
    inv = tl.full([], 1.0, ACC)
    if HAS_SCALE:
        inv = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        sr, wv = _restored(w, s, idx, m, ACC, COPY)
        d = tl.load(g + idx, mask=m, other=0.0).to(ACC) * inv
        d = tl.where(maximize, -d, d)
        d = tl.where(wd != 0.0, d + wd * wv, d)
        if HAS_BUF:
            bv = tl.load(b + idx, mask=m, other=0.0).to(ACC)
            nb = tl.where(first, d, bv * mom + (1.0 - damp) * d)
            d = tl.where(use_buf, tl.where(nesterov, d + mom * nb, nb), d)
            bm = tl.where(use_buf, m, False)  # where(), not &: scalar masks
            if HAS_FOUND:
                bm = tl.where(skip, False, bm)
            tl.store(b + idx, nb.to(DT), mask=bm)
        new = (wv - lr * d).to(DT)
        if HAS_FOUND:  # a skipped step: the restore only
            if COPY:
                new = tl.where(skip, sr, new)
            else:
                new = tl.where(skip, wv.to(DT), new)
        tl.store(w + idx, new, mask=m)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _sam_adamw_kernel(
    meta,
    fmeta,
    scale_ptr,
    found_ptr,
    O_NUMEL,
    O_FLAGS,
    O_PARAMS,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    SD: tl.constexpr,
    ACC: tl.constexpr,
    COPY: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = _chunk(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = _ptr(meta, t, 0, 6, DT)
    g = _ptr(meta, t, 1, 6, DT)
    s = _ptr(meta, t, 2, 6, SD)
    ma = _ptr(meta, t, 3, 6, DT)
    va = _ptr(meta, t, 4, 6, DT)
    st = _ptr(meta, t, 5, 6, tl.float32)
    lr = tl.load(fmeta + O_PARAMS + t * 5)
    b1 = tl.load(fmeta + O_PARAMS + t * 5 + 1)
    b2 = tl.load(fmeta + O_PARAMS + t * 5 + 2)
    eps = tl.load(fmeta + O_PARAMS + t * 5 + 3).to(ACC)
    wd = tl.load(fmeta + O_PARAMS + t * 5 + 4)
    maximize = (tl.load(meta + O_FLAGS + t) & 2) != 0
    step = tl.load(st).to(tl.float64)
    step_size = (lr / (1.0 - tl.exp(step * tl.log(b1)))).to(ACC)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(b2))).to(ACC)
    decay = (1.0 - lr * wd).to(ACC)
    wm = (1.0 - b1).to(ACC)
    beta2 = b2.to(ACC)
    if HAS_FOUND:
        skip = tl.load(found_ptr) > 0
    inv = tl.full([], 1.0, ACC)
    if HAS_SCALE:
        inv = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        sr, wv = _restored(w, s, idx, m, ACC, COPY)
        d = tl.load(g + idx, mask=m, other=0.0).to(ACC) * inv
        d = tl.where(maximize, -d, d)
        mv = tl.load(ma + idx, mask=m, other=0.0).to(ACC)
        vv = tl.load(va + idx, mask=m, other=0.0).to(ACC)
        mv = tl.where(wm < 0.5, mv + wm * (d - mv), d - (d - mv) * (1.0 - wm))
        vv = vv * beta2 + (1.0 - beta2) * d * d
        new = (wv * decay - step_size * (mv / (tl.sqrt(vv) / bc2_sqrt + eps))).to(DT)
        sm = m
        if HAS_FOUND:  # a skipped step: the restore only, state untouched
            sm = tl.where(skip, False, m)
            if COPY:
                new = tl.where(skip, sr, new)
            else:
                new = tl.where(skip, wv.to(DT), new)
        tl.store(ma + idx, mv.to(DT), mask=sm)
        tl.store(va + idx, vv.to(DT), mask=sm)
        tl.store(w + idx, new, mask=m)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_warps() -> int:
    return 4


def sam_perturb(
    params, grads, stash, rho, eta, flags, eps, stash_mode, grad_scale, found_inf
) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.sam_perturb_`` (lists already checked)."""
    dev = params[0].device
    tables = build_tables([params, grads, stash], [rho, eta], flags, signature_streams=(0, 2))
    flags = flags * len(params) if len(flags) == 1 else flags  # one value for all tensors
    total = sum(tb.n_chunks for tb in tables)
    partials = torch.empty(max(total, 1), dtype=torch.float64, device=dev)
    off = 0
    for tb in tables:
        o = offsets(tb, 3)
        adaptive = any(flags[i] & ADAPTIVE_FLAG for i in tb.index)
        if tb.n_chunks:
            _sam_norm_kernel[(tb.n_chunks,)](
                tb.meta,
                tb.fmeta,
                partials,
                off,
                o.numel,
                o.flags,
                o.params,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                ACC=_acc(tb.dtypes[0]),
                ADAPTIVE=adaptive,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=_num_warps(),
            )
        off += tb.n_chunks
    norm = torch.empty((), dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    coef = torch.empty((), dtype=torch.float64, device=dev)
    _sam_coef_kernel[(1,)](
        partials,
        total,
        grad_scale if grad_scale is not None else coef,
        found_inf if found_inf is not None else coef,
        norm,
        coef,
        eps,
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND=found_inf is not None,
        BLOCK=1024,
    )
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _sam_perturb_kernel[(tb.n_chunks,)](
                tb.meta,
                tb.fmeta,
                coef,
                o.numel,
                o.flags,
                o.params,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                SD=TL_DTYPE[tb.dtypes[1]],
                ACC=_acc(tb.dtypes[0]),
                COPY=stash_mode == 0,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=_num_warps(),
            )
    return norm


def sam_restore(params, stash, stash_mode) -> None:
    tables = build_tables([params, stash, stash], [], [0] * len(params), signature_streams=(0, 2))
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _sam_restore_kernel[(tb.n_chunks,)](
                tb.meta,
                o.numel,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                SD=TL_DTYPE[tb.dtypes[1]],
                ACC=_acc(tb.dtypes[0]),
                COPY=stash_mode == 0,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=_num_warps(),
            )


def sam_restore_sgd(
    params,
    grads,
    stash,
    momentum_buffers,
    lr,
    weight_decay,
    momentum,
    dampening,
    flags,
    stash_mode,
    grad_scale,
    found_inf,
) -> None:
    has_buf = len(momentum_buffers) > 0
    bufs = momentum_buffers if has_buf else params
    tables = build_tables(
        [params, grads, stash, bufs], [lr, weight_decay, momentum, dampening], flags, signature_streams=(0, 2)
    )
    dummy = params[0]
    for tb in tables:
        o = offsets(tb, 4)
        if tb.n_chunks:
            _sam_sgd_kernel[(tb.n_chunks,)](
                tb.meta,
                tb.fmeta,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                o.numel,
                o.flags,
                o.params,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                SD=TL_DTYPE[tb.dtypes[1]],
                ACC=_acc(tb.dtypes[0]),
                COPY=stash_mode == 0,
                HAS_BUF=has_buf,
                HAS_SCALE=grad_scale is not None,
                HAS_FOUND=found_inf is not None,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=_num_warps(),
            )


def sam_restore_adamw(
    params,
    grads,
    stash,
    exp_avg,
    exp_avg_sq,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    flags,
    stash_mode,
    grad_scale,
    found_inf,
) -> None:
    tables = build_tables(
        [params, grads, stash, exp_avg, exp_avg_sq, steps],
        [lr, beta1, beta2, eps, weight_decay],
        flags,
        signature_streams=(0, 2),
    )
    dummy = params[0]
    for tb in tables:
        o = offsets(tb, 6)
        if tb.n_chunks:
            _sam_adamw_kernel[(tb.n_chunks,)](
                tb.meta,
                tb.fmeta,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                o.numel,
                o.flags,
                o.params,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                SD=TL_DTYPE[tb.dtypes[1]],
                ACC=_acc(tb.dtypes[0]),
                COPY=stash_mode == 0,
                HAS_SCALE=grad_scale is not None,
                HAS_FOUND=found_inf is not None,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=_num_warps(),
            )
