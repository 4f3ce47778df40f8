"""Triton kernel of ema_update_ (``ema = lerp(ema, model, 1 - decay)``, torch.lerp's formula).

The element function on the elementwise skeleton of saf_kernels/triton/multi_tensor.py: one
program per chunk of a pointer table, one launch per (ema dtype, model dtype) pair; the decay
may be read from a device scalar.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import block_of, build_tables, launch_elementwise, stream_ptr


@triton.jit
def _prep(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT):
    """Streams (ema, model); the weight 1 - decay from the host in float64 (``x``) or from the
    device decay (``pa``, OPT), rounded once to ACC."""
    if OPT:
        wt = (1.0 - tl.load(pa).to(tl.float64)).to(ACC)
    else:
        wt = tl.full([], x, ACC)
    return stream_ptr(meta, t, 0, L, DT), stream_ptr(meta, t, 1, L, SD), wt


@triton.jit
def lerp(a, b, wt):
    """torch.lerp's formula (exact at both ends)."""
    return tl.where(wt < 0.5, a + wt * (b - a), b - (b - a) * (1.0 - wt))


@triton.jit
def _elem(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK):
    e, x, wt = ctx
    idx, m = block_of(start, off, end, BLOCK)
    a = tl.load(e + idx, mask=m, other=0.0).to(ACC)
    b = tl.load(x + idx, mask=m, other=0.0).to(ACC)
    tl.store(e + idx, lerp(a, b, wt).to(DT), mask=m)


def ema_update(ema, model, decay: float, decay_tensor) -> None:
    """The semantics of ``torch.ops.saf_kernels.ema_update_`` (lists already checked)."""
    tables = build_tables([ema, model], [], [0] * len(ema), signature_streams=(0, 1))
    launch_elementwise(_prep, _elem, tables, 2, pa=decay_tensor, x=1.0 - float(decay), OPT=decay_tensor is not None)
