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

from .multi_tensor import BLOCK, CHUNK, TL_DTYPE, VARYING_ARGS, any_f64, build_tables, offsets
from .sam import _sam_coef_kernel
from .trajectory_loss import _to_storage

ADAPTIVE_FLAG = 2
# Per-tensor float64 params of the ESAM tables: rho / beta, eta, Bernoulli threshold, rng base.
N_PARAMS = 4
LANES = BLOCK // 4  # counters per inner step


@triton.jit
def chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK: tl.constexpr):
    """(tensor, first element, element count) of this program's chunk."""
    c = tl.program_id(0)
    t = tl.load(meta + O_CT + c)
    start = tl.load(meta + O_CS + c)
    numel = tl.load(meta + O_NUMEL + t)
    return t, start, tl.minimum(numel - start, CHUNK)


@triton.jit
def stream_ptr(meta, t, s, L: tl.constexpr, DT: tl.constexpr):
    return tl.load(meta + t * L + s).to(tl.pointer_type(DT))


@triton.jit
def keep_of(r, thr):
    """Bernoulli decision of a Philox word: top 24 bits below the threshold."""
    return (r >> 8).to(tl.int64) < thr


@triton.jit
def _norm_lane(g, w, idx, m, r, thr, eta, adaptive, ACC: tl.constexpr, ADAPTIVE: tl.constexpr):
    x = tl.load(g + idx, mask=m, other=0.0).to(ACC)
    if ADAPTIVE:  # plain ESAM never reads the weights here
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC)
        x = x * tl.where(adaptive, tl.abs(wv) + eta, 1.0)
    # A select, not a product: a dropped element's inf / NaN gradient must not reach the norm.
    x = tl.where(keep_of(r, thr) & m, x, 0.0)
    return x * x


@triton.jit(do_not_specialize=VARYING_ARGS)
def _esam_norm_kernel(meta, fmeta, partial_ptr, part_off, seed: tl.int64, offset: tl.int64, O_NUMEL, O_FLAGS,
                      O_PARAMS, O_CT, O_CS, DT: tl.constexpr, ACC: tl.constexpr, ADAPTIVE: tl.constexpr,
                      CHUNK: tl.constexpr, LANES: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 3, DT)
    g = stream_ptr(meta, t, 1, 3, DT)
    adaptive = (tl.load(meta + O_FLAGS + t) & 2) != 0
    eta = tl.load(fmeta + O_PARAMS + t * 4 + 1).to(ACC)
    thr = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(tl.int64)
    ctr0 = offset + (tl.load(fmeta + O_PARAMS + t * 4 + 3).to(tl.int64) + start) // 4
    acc = tl.zeros([LANES], ACC)
    for off in range(0, end, 4 * LANES):
        j = off // 4 + tl.arange(0, LANES)
        r0, r1, r2, r3 = tl.randint4x(seed, ctr0 + j)
        e = 4 * j
        acc += _norm_lane(g, w, start + e, e < end, r0, thr, eta, adaptive, ACC, ADAPTIVE)
        acc += _norm_lane(g, w, start + e + 1, e + 1 < end, r1, thr, eta, adaptive, ACC, ADAPTIVE)
        acc += _norm_lane(g, w, start + e + 2, e + 2 < end, r2, thr, eta, adaptive, ACC, ADAPTIVE)
        acc += _norm_lane(g, w, start + e + 3, e + 3 < end, r3, thr, eta, adaptive, ACC, ADAPTIVE)
    tl.store(partial_ptr + part_off + tl.program_id(0), tl.sum(acc).to(tl.float64))


@triton.jit
def _perturb_lane(w, g, s, idx, m, r, thr, rc, eta, adaptive, ok, DT: tl.constexpr, SD: tl.constexpr,
                  ACC: tl.constexpr, COPY: tl.constexpr):
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


@triton.jit(do_not_specialize=VARYING_ARGS)
def _esam_perturb_kernel(meta, fmeta, coef_ptr, seed: tl.int64, offset: tl.int64, O_NUMEL, O_FLAGS, O_PARAMS, O_CT,
                         O_CS, DT: tl.constexpr, SD: tl.constexpr, ACC: tl.constexpr, COPY: tl.constexpr,
                         CHUNK: tl.constexpr, LANES: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 3, DT)
    g = stream_ptr(meta, t, 1, 3, DT)
    s = stream_ptr(meta, t, 2, 3, SD)
    coef = tl.load(coef_ptr)
    ok = coef != 0.0  # 0: perturb nothing (the stash still serves the restore)
    rc = (tl.load(fmeta + O_PARAMS + t * 4) * coef).to(ACC)
    eta = tl.load(fmeta + O_PARAMS + t * 4 + 1).to(ACC)
    thr = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(tl.int64)
    ctr0 = offset + (tl.load(fmeta + O_PARAMS + t * 4 + 3).to(tl.int64) + start) // 4
    adaptive = (tl.load(meta + O_FLAGS + t) & 2) != 0
    for off in range(0, end, 4 * LANES):
        j = off // 4 + tl.arange(0, LANES)
        r0, r1, r2, r3 = tl.randint4x(seed, ctr0 + j)
        e = 4 * j
        _perturb_lane(w, g, s, start + e, e < end, r0, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY)
        _perturb_lane(w, g, s, start + e + 1, e + 1 < end, r1, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY)
        _perturb_lane(w, g, s, start + e + 2, e + 2 < end, r2, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY)
        _perturb_lane(w, g, s, start + e + 3, e + 3 < end, r3, thr, rc, eta, adaptive, ok, DT, SD, ACC, COPY)


@triton.jit
def _restore_lane(w, s, idx, m, r, thr, DT: tl.constexpr, ACC: tl.constexpr):
    wr = tl.load(w + idx, mask=m, other=0.0)
    sv = tl.load(s + idx, mask=m, other=0.0).to(ACC)
    tl.store(w + idx, tl.where(keep_of(r, thr), (wr.to(ACC) - sv).to(DT), wr), mask=m)


@triton.jit(do_not_specialize=VARYING_ARGS)
def _esam_restore_delta_kernel(meta, fmeta, seed: tl.int64, offset: tl.int64, O_NUMEL, O_PARAMS, O_CT, O_CS,
                               DT: tl.constexpr, SD: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr,
                               LANES: tl.constexpr):
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    w = stream_ptr(meta, t, 0, 3, DT)
    s = stream_ptr(meta, t, 2, 3, SD)
    thr = tl.load(fmeta + O_PARAMS + t * 4 + 2).to(tl.int64)
    ctr0 = offset + (tl.load(fmeta + O_PARAMS + t * 4 + 3).to(tl.int64) + start) // 4
    for off in range(0, end, 4 * LANES):
        j = off // 4 + tl.arange(0, LANES)
        r0, r1, r2, r3 = tl.randint4x(seed, ctr0 + j)
        e = 4 * j
        _restore_lane(w, s, start + e, e < end, r0, thr, DT, ACC)
        _restore_lane(w, s, start + e + 1, e + 1 < end, r1, thr, DT, ACC)
        _restore_lane(w, s, start + e + 2, e + 2 < end, r2, thr, DT, ACC)
        _restore_lane(w, s, start + e + 3, e + 3 < end, r3, thr, DT, ACC)


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


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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
                 found_inf) -> torch.Tensor:
    """The semantics of ``torch.ops.saf_kernels.esam_perturb_`` (lists already checked)."""
    dev = params[0].device
    cols = [[r / b for r, b in zip(rho, beta)], eta, _thresholds(beta), rng_bases(params)]
    tables = build_tables([params, grads, stash], cols, flags, signature_streams=(0, 2))
    total = sum(tb.n_chunks for tb in tables)
    partials = torch.empty(max(total, 1), dtype=torch.float64, device=dev)
    off = 0
    for tb in tables:
        o = offsets(tb, 3)
        adaptive = any(flags[i] & ADAPTIVE_FLAG for i in tb.index)
        if tb.n_chunks:
            _esam_norm_kernel[(tb.n_chunks,)](
                tb.meta, tb.fmeta, partials, off, seed, offset, o.numel, o.flags, o.params, o.chunk_tensor,
                o.chunk_start, DT=TL_DTYPE[tb.dtypes[0]], ACC=_acc(tb.dtypes[0]), ADAPTIVE=adaptive, CHUNK=CHUNK,
                LANES=LANES, num_warps=4)
        off += tb.n_chunks
    norm = torch.empty((), dtype=torch.float64 if any_f64(params) else torch.float32, device=dev)
    coef = torch.empty((), dtype=torch.float64, device=dev)
    _sam_coef_kernel[(1,)](partials, total, grad_scale if grad_scale is not None else coef,
                           found_inf if found_inf is not None else coef, norm, coef, eps,
                           HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, BLOCK=1024)
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _esam_perturb_kernel[(tb.n_chunks,)](
                tb.meta, tb.fmeta, coef, seed, offset, o.numel, o.flags, o.params, o.chunk_tensor, o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]], SD=TL_DTYPE[tb.dtypes[1]], ACC=_acc(tb.dtypes[0]), COPY=stash_mode == 0,
                CHUNK=CHUNK, LANES=LANES, num_warps=4)
    return norm


def esam_restore(params, stash, beta, seed, offset, stash_mode) -> None:
    """The semantics of ``torch.ops.saf_kernels.esam_restore_``."""
    if stash_mode == 0:
        from .sam import sam_restore

        sam_restore(params, stash, 0)  # bit exact; the mask is not needed
        return
    cols = [[0.0] * len(params), [0.0] * len(params), _thresholds(beta), rng_bases(params)]
    tables = build_tables([params, stash, stash], cols, [0] * len(params), signature_streams=(0, 2))
    for tb in tables:
        o = offsets(tb, 3)
        if tb.n_chunks:
            _esam_restore_delta_kernel[(tb.n_chunks,)](
                tb.meta, tb.fmeta, seed, offset, o.numel, o.params, o.chunk_tensor, o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]], SD=TL_DTYPE[tb.dtypes[1]], ACC=_acc(tb.dtypes[0]), CHUNK=CHUNK,
                LANES=LANES, num_warps=4)


def philox(out: torch.Tensor, seed: int, offset: int, kind: int, p: float) -> None:
    """The semantics of ``torch.ops.saf_kernels.philox_`` (out contiguous)."""
    from ..reference import bernoulli_threshold

    n = out.numel()
    if n == 0:
        return
    flat = out.view(-1)
    grid = (triton.cdiv(triton.cdiv(n, 4), LANES),)
    _philox_kernel[grid](flat, n, seed, offset, bernoulli_threshold(p), KIND=kind, LANES=LANES)
