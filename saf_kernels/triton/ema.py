"""Triton kernel of ema_update_ (``ema = lerp(ema, model, 1 - decay)``, torch.lerp's formula).

One program per chunk of a pointer table (saf_kernels/triton/multi_tensor.py), one launch per
(ema dtype, model dtype) pair; the decay may be read from a device scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import BLOCK, CHUNK, TL_DTYPE, VARYING_ARGS, build_tables, offsets


@triton.jit(do_not_specialize=VARYING_ARGS)
def _ema_kernel(
    meta,
    decay_ptr,
    weight: tl.float64,
    O_NUMEL,
    O_CT,
    O_CS,
    DT: tl.constexpr,
    MD: tl.constexpr,
    ACC: tl.constexpr,
    HAS_DECAY_PTR: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(meta + O_CT + c)
    start = tl.load(meta + O_CS + c)
    end = tl.minimum(tl.load(meta + O_NUMEL + t) - start, CHUNK)
    e = tl.load(meta + t * 2).to(tl.pointer_type(DT))
    x = tl.load(meta + t * 2 + 1).to(tl.pointer_type(MD))
    # The weight 1 - decay comes from the host in float64 (annotated: a plain float argument is
    # fp32 on a GPU) and is rounded once to ACC.
    if HAS_DECAY_PTR:
        wt = (1.0 - tl.load(decay_ptr).to(tl.float64)).to(ACC)
    else:
        wt = tl.full([], weight, ACC)
    for off in range(0, end, BLOCK):
        lane = off + tl.arange(0, BLOCK)
        m = lane < end
        idx = start + lane
        a = tl.load(e + idx, mask=m, other=0.0).to(ACC)
        b = tl.load(x + idx, mask=m, other=0.0).to(ACC)
        r = tl.where(wt < 0.5, a + wt * (b - a), b - (b - a) * (1.0 - wt))
        tl.store(e + idx, r.to(DT), mask=m)


def ema_update(ema, model, decay: float, decay_tensor) -> None:
    """The semantics of ``torch.ops.saf_kernels.ema_update_`` (lists already checked)."""
    tables = build_tables([ema, model], [], [0] * len(ema), signature_streams=(0, 1))
    for tb in tables:
        o = offsets(tb, 2)
        if tb.n_chunks:
            _ema_kernel[(tb.n_chunks,)](
                tb.meta,
                decay_tensor if decay_tensor is not None else tb.meta,
                1.0 - float(decay),
                o.numel,
                o.chunk_tensor,
                o.chunk_start,
                DT=TL_DTYPE[tb.dtypes[0]],
                MD=TL_DTYPE[tb.dtypes[1]],
                ACC=tl.float64 if tb.dtypes[0] == torch.float64 else tl.float32,
                HAS_DECAY_PTR=decay_tensor is not None,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=4,
            )
