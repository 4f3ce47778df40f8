"""Tensor-list tables for the multi-tensor Triton kernels (sam.py, ema.py).

Choice (documented in the README): a **device pointer table** rather than a per-tensor launch
loop. Each table is one int64 buffer holding, for the tensors of one dtype signature, the
stream addresses (cast to pointers inside the kernel with ``.to(tl.pointer_type(DT))``, as
Triton's grouped-GEMM tutorial does), sizes, flags, per-tensor float64 scalars (read through a
float64 view of the same buffer) and the chunk -> (tensor, start) map; one program handles one
chunk. A launch therefore covers every tensor of a signature: a list of fp32 and bf16 tensors
is two launches per pass, not one per tensor. This works under ``TRITON_INTERPRET=1`` (the
interpreter treats the int-to-pointer cast as a bitcast of host addresses; tested) and is
public Triton usage on GPUs. Pointer element types must be compile-time constants in Triton,
which is why signatures are grouped (the CUDA kernels dispatch per block instead).

Tables are cached by a key of the tensors' addresses, sizes and dtypes and the per-tensor values
(:class:`PlanCache`), so a training loop whose tensors keep their addresses pays neither the
numpy build nor a host-to-device copy (a few microseconds of key building for 160 tensors); a
miss costs one pinned, asynchronous copy (no host synchronisation). On CUDA a cached table is
ordered after its upload when another stream uses it, and a table used while a CUDA graph is
being captured is never evicted (the graph replays its address).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import chain

import numpy as np
import torch
import triton
import triton.language as tl

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Integer arguments whose values vary between calls or models (table offsets, partial-sum
# offsets, counts, Philox seed and offset): ``do_not_specialize`` on these, or every new value
# that happens to be 1 or a multiple of 16 compiles a new variant on a GPU. Names a kernel does
# not have are ignored.
VARYING_ARGS = ("part_off", "n", "n_total", "seed", "offset", "thr", "O_NUMEL", "O_FLAGS", "O_PARAMS", "O_CT",
                "O_CS", "O_ROWS", "O_LEN", "O_PT", "O_PR")

# Elements per program and per inner step. The interpreter runs one numpy op per step, so fewer,
# wider steps are faster there; on a GPU 1024 x 4 B keeps enough bytes in flight per program.
CHUNK = 16384
BLOCK = 1024


@dataclass
class Table:
    """One dtype signature's tensors: ``meta`` (int64) and ``fmeta`` (float64 view of it)."""

    meta: torch.Tensor
    fmeta: torch.Tensor
    n: int
    n_chunks: int
    dtypes: tuple
    index: list  # positions of these tensors in the caller's lists


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def tensor_key(streams, signature_streams=(0,)) -> tuple:
    """What a table depends on in the tensors: every stream's addresses, the first stream's sizes
    and the signature streams' dtypes, built with C-level iteration (``map``)."""
    first = streams[0]
    return (
        first[0].device if first else None,
        tuple(chain.from_iterable(map(_data_ptr, s) for s in streams)),
        tuple(map(_numel, first)),
        tuple(chain.from_iterable([t.dtype for t in streams[s]] for s in signature_streams)),
    )


@dataclass
class _Entry:
    value: object
    device: torch.device
    uploads: list = field(default_factory=list)  # (device tensor, pinned host copy, event, stream)
    used: int = 0


class _Key:
    """A tuple key whose hash is computed once (a key holds hundreds of addresses)."""

    __slots__ = ("t", "h")

    def __init__(self, t: tuple):
        self.t = t
        self.h = hash(t)

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other) -> bool:
        return self.h == other.h and self.t == other.t


class PlanCache:
    """Least-recently-used cache of device tables by a cheap key (one dict lookup per hit); entries
    used while a CUDA graph is being captured are never evicted."""

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: dict[_Key, _Entry] = {}
        self.kept: set[_Key] = set()
        self.clock = 0

    def get(self, key: tuple, device: torch.device, build, deps: list | None = None):
        """The cached value for ``key``, or ``build(uploads)``'s (which uploads through
        :func:`upload` into the list it is given). ``deps``: a list to extend with the entry's
        uploads (an entry built from this one must be ordered after them too)."""
        k = _Key(key)
        entry = self.entries.get(k)
        if entry is None:
            entry = _Entry(None, device)
            entry.value = build(entry.uploads)
            self.entries[k] = entry
        self.clock += 1
        entry.used = self.clock  # before eviction: the entry just built is the newest, not the oldest
        if len(self.entries) > self.size + len(self.kept):
            old = min((x for x in self.entries if x not in self.kept), key=lambda x: self.entries[x].used)
            del self.entries[old]
        if device.type == "cuda":
            self._ready(k, entry)
        if deps is not None:
            deps.extend(entry.uploads)
        return entry.value

    def _ready(self, key, entry) -> None:
        if torch.cuda.is_current_stream_capturing():
            # A graph replays these addresses: the tables must outlive it.
            self.kept.add(key)
            return
        cur = torch.cuda.current_stream(entry.device)
        for dev, _, event, stream in entry.uploads:
            if stream != cur:  # read on another stream: after the copy, and not freed under it
                if event is not None:
                    cur.wait_event(event)
                dev.record_stream(cur)

    def clear(self) -> None:
        self.entries.clear()
        self.kept.clear()


def upload(arr: np.ndarray, device: torch.device, uploads: list) -> torch.Tensor:
    """``arr`` on ``device``: a pinned, asynchronous copy on the current stream (recorded in
    ``uploads`` with an event, and the pinned copy kept, for :class:`PlanCache`)."""
    host = torch.from_numpy(arr)
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    stream = torch.cuda.current_stream(device)
    dev = pinned.to(device, non_blocking=True)
    event = None
    if not torch.cuda.is_current_stream_capturing():
        event = torch.cuda.Event()
        event.record(stream)
    uploads.append((dev, pinned, event, stream))
    return dev


TABLES = PlanCache()  # the tables (addresses, sizes, flags, chunk map) by tensor_key
PARAMS = PlanCache()  # the tables with their per-tensor values


def build_tables(
    streams: list[list[torch.Tensor]],
    params: list[list[float]],
    flags: list[int],
    signature_streams: tuple[int, ...] = (0,),
) -> list[Table]:
    """Tables grouping the tensors by the dtypes of ``signature_streams``.

    ``params`` holds K lists of per-tensor values and ``flags`` one int per tensor (a list of
    length 1 applies to all). Layout of ``meta`` (int64 words), for n tensors, L streams, C chunks:
    ``[addr n*L | numel n | flags n | chunk_tensor C | chunk_start C]``; ``fmeta`` (float64) holds
    the params, ``n*K`` values, in a buffer of its own: a new learning rate re-uploads those, not
    the table. Both are cached (:data:`TABLES`, :data:`PARAMS`): a hit costs the keys, tuples of
    the addresses, sizes and values.
    """
    device = streams[0][0].device if streams[0] else torch.device("cpu")
    skey = (tensor_key(streams, signature_streams), signature_streams, tuple(flags))

    def tables(deps=None):
        return TABLES.get(skey, device, lambda up: _build_tables(streams, flags, signature_streams, up), deps)

    if not params:
        return tables()
    return PARAMS.get((skey, tuple(map(tuple, params))), device,
                      lambda up: _with_params(tables(up), params, len(streams[0]), up))


def _build_tables(streams, flags, signature_streams, uploads) -> list[Table]:
    n_all = len(streams[0])
    # Per-tensor lists of length 1 apply to every tensor (as in the C++ ops' schemas).
    flags = flags * n_all if len(flags) == 1 else flags
    groups: dict[tuple, list[int]] = {}
    for i in range(n_all):
        sig = tuple(streams[s][i].dtype for s in signature_streams)
        groups.setdefault(sig, []).append(i)
    tables = []
    n_streams = len(streams)
    for sig, idx in groups.items():
        n = len(idx)
        addr = np.array([[streams[s][i].data_ptr() for s in range(n_streams)] for i in idx], dtype=np.int64)
        numel = np.array([streams[0][i].numel() for i in idx], dtype=np.int64)
        fl = np.array([flags[i] for i in idx], dtype=np.int64)
        nc = (numel + CHUNK - 1) // CHUNK
        ct = np.repeat(np.arange(n, dtype=np.int64), nc)
        starts = np.arange(int(nc.sum()), dtype=np.int64) - np.repeat(np.cumsum(nc) - nc, nc)
        cs = starts * CHUNK
        arr = np.concatenate([addr.reshape(-1), numel, fl, ct, cs])
        meta = upload(arr, streams[0][idx[0]].device, uploads)
        # No params: fmeta is never read; any float64 pointer will do.
        tables.append(Table(meta, meta.view(torch.float64), n, int(nc.sum()), sig, idx))
    return tables


def _with_params(tables: list[Table], params, n_all: int, uploads) -> list[Table]:
    """The tables with their tensors' params (a list of length 1 applies to all) in ``fmeta``."""
    cols = np.stack([np.broadcast_to(np.asarray(p, dtype=np.float64), (n_all,)) for p in params], axis=1)
    return [replace(t, fmeta=upload(np.ascontiguousarray(cols[t.index]).reshape(-1), t.meta.device, uploads))
            for t in tables]


@dataclass
class Offsets:
    numel: int
    flags: int
    params: int
    chunk_tensor: int
    chunk_start: int


def offsets(table: Table, n_streams: int) -> Offsets:
    """Where each part of a table starts (``params`` in ``fmeta``, the rest in ``meta``)."""
    n, c = table.n, table.n_chunks
    o_numel = n * n_streams
    o_flags = o_numel + n
    o_ct = o_flags + n
    return Offsets(o_numel, o_flags, 0, o_ct, o_ct + c)


def any_f64(tensors) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def acc_dtype(dtype: torch.dtype):
    """The accumulation type of a storage dtype: float64 for float64, float32 else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# The kernel skeletons. A method supplies triton.jit functions, passed as constexpr arguments
# (inlined when the skeleton compiles, so the machine code is what a hand-written kernel gives):
#
#   PREP(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE,
#        HAS_FOUND, OPT) -> ctx
#       once per program (chunk ``start`` of tensor ``t``): the stream pointers and the per-tensor
#       values, as a tuple;
#   ELEM(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK)
#       the elements ``start + off ..`` (``BLOCK`` of them, masked at ``end``): loads, math, stores;
#   TERM(ctx, start, off, end, seed, offset, a0, a1, a2, ACC, ADAPTIVE..., BLOCK) -> (a0, a1, a2)
#       the same for a reduction: adds the block's terms to up to three accumulators.
#
# ``pa, pb, pc`` are a method's device scalars (coefficients, grad_scale, found_inf), ``x`` a
# float64 kernel argument, ``seed``/``offset`` Philox's; COPY / HAS_SCALE / HAS_FOUND / OPT its
# compile-time switches (OPT: one of its own). Unused ones are passed as any tensor, 0 or False.
# ---------------------------------------------------------------------------------------------


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
    """Tensor ``t``'s address in stream ``s`` of a table of ``L`` streams, typed ``DT``."""
    return tl.load(meta + t * L + s).to(tl.pointer_type(DT))


@triton.jit
def block_of(start, off, end, BLOCK: tl.constexpr):
    """Element indices and mask of the block at ``off`` of a chunk."""
    lane = off + tl.arange(0, BLOCK)
    return start + lane, lane < end


@triton.jit
def restored(w, s, idx, m, ACC: tl.constexpr, COPY: tl.constexpr):
    """(stash as stored, the weights before the perturbation in ACC): a copy, or w - delta."""
    sr = tl.load(s + idx, mask=m, other=0.0)
    if COPY:
        wv = sr.to(ACC)
    else:
        wv = tl.load(w + idx, mask=m, other=0.0).to(ACC) - sr.to(ACC)
    return sr, wv


@triton.jit
def sum_partials(p, n, BLOCK: tl.constexpr):
    """Fixed-order float64 sum of ``p[0:n]`` (one program)."""
    acc = tl.zeros([BLOCK], tl.float64)
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK)
        acc += tl.load(p + i, mask=i < n, other=0.0)
    return tl.sum(acc)


@triton.jit(do_not_specialize=VARYING_ARGS)
def elementwise_kernel(meta, fmeta, pa, pb, pc, x: tl.float64, seed: tl.int64, offset: tl.int64, O_NUMEL, O_FLAGS,
                       O_PARAMS, O_CT, O_CS, PREP: tl.constexpr, ELEM: tl.constexpr, L: tl.constexpr,
                       DT: tl.constexpr, SD: tl.constexpr, ACC: tl.constexpr, COPY: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, OPT: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One pass over a chunk: ``ELEM`` on each block, with ``PREP``'s per-tensor context."""
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    ctx = PREP(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
               OPT)
    for off in range(0, end, BLOCK):
        ELEM(ctx, start, off, end, seed, offset, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND, OPT, BLOCK)


@triton.jit(do_not_specialize=VARYING_ARGS)
def partials_kernel(meta, fmeta, pa, pb, pc, x: tl.float64, seed: tl.int64, offset: tl.int64, partial_ptr, part_off,
                    n_total, O_NUMEL, O_FLAGS, O_PARAMS, O_CT, O_CS, PREP: tl.constexpr, TERM: tl.constexpr,
                    L: tl.constexpr, NSUM: tl.constexpr, AW: tl.constexpr, DT: tl.constexpr, SD: tl.constexpr,
                    ACC: tl.constexpr, COPY: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                    OPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The partial-sum stage of a reduction: ``NSUM`` (1 to 3) sums of ``TERM`` over a chunk, in
    accumulators ``AW`` wide, stored as ``partial[k * n_total + part_off + chunk]`` (float64)."""
    t, start, end = chunk_of(meta, O_CT, O_CS, O_NUMEL, CHUNK)
    ctx = PREP(meta, fmeta, t, start, pa, pb, pc, x, O_FLAGS, O_PARAMS, L, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
               OPT)
    a0 = tl.zeros([AW], ACC)
    a1 = tl.zeros([AW], ACC)
    a2 = tl.zeros([AW], ACC)
    for off in range(0, end, BLOCK):
        a0, a1, a2 = TERM(ctx, start, off, end, seed, offset, a0, a1, a2, DT, SD, ACC, COPY, HAS_SCALE, HAS_FOUND,
                          OPT, BLOCK)
    i = part_off + tl.program_id(0)
    tl.store(partial_ptr + i, tl.sum(a0).to(tl.float64))
    if NSUM > 1:
        tl.store(partial_ptr + n_total + i, tl.sum(a1).to(tl.float64))
    if NSUM > 2:
        tl.store(partial_ptr + 2 * n_total + i, tl.sum(a2).to(tl.float64))


def _launch(kernel, tables, n_streams, head, tail, switches, per_table, constexprs) -> None:
    for tb in tables:
        if not tb.n_chunks:
            continue
        o = offsets(tb, n_streams)
        sw = dict(COPY=False, HAS_SCALE=False, HAS_FOUND=False, OPT=False)
        sw.update(switches)
        if per_table is not None:
            sw.update(per_table(tb))
        kernel[(tb.n_chunks,)](tb.meta, tb.fmeta, *head(tb), o.numel, o.flags, o.params, o.chunk_tensor,
                               o.chunk_start, *tail, L=n_streams, DT=TL_DTYPE[tb.dtypes[0]],
                               SD=TL_DTYPE[tb.dtypes[-1]], ACC=acc_dtype(tb.dtypes[0]), CHUNK=CHUNK,
                               BLOCK=BLOCK, num_warps=4, **constexprs, **sw)


def _scalars(tables, pa, pb, pc, x, seed, offset):
    dummy = tables[0].meta if tables else None
    return [dummy if p is None else p for p in (pa, pb, pc)] + [float(x), int(seed), int(offset)]


def launch_elementwise(prep, elem, tables, n_streams, *, pa=None, pb=None, pc=None, x=0.0, seed=0, offset=0,
                       per_table=None, **switches) -> None:
    """One elementwise pass (one launch per table): ``prep`` and ``elem`` as above; ``pa``..``pc``
    device scalars (None: unused), ``switches`` COPY / HAS_SCALE / HAS_FOUND / OPT, ``per_table``
    a function of a table giving switches that depend on its tensors. The tables' signature
    dtypes give DT (first) and SD (last)."""
    sc = _scalars(tables, pa, pb, pc, x, seed, offset)
    _launch(elementwise_kernel, tables, n_streams, lambda tb: sc, (), switches, per_table,
            dict(PREP=prep, ELEM=elem))


def chunk_partials(prep, term, tables, n_streams, *, nsum=1, width=BLOCK, pa=None, pb=None, pc=None, x=0.0, seed=0,
                   offset=0, per_table=None, **switches) -> tuple[torch.Tensor, int]:
    """The partial-sum stage of a reduction over ``tables``: a float64 tensor of ``nsum`` rows of
    one partial sum per chunk (row stride ``max(chunks, 1)``), and the number of chunks. This is
    the tensor a finalize kernel sums in a fixed order; a collective (an all-reduce of a sharded
    model's partial sums) can sit between the two stages."""
    total = sum(tb.n_chunks for tb in tables)
    stride = max(total, 1)
    dev = tables[0].meta.device if tables else torch.device("cpu")
    partials = torch.empty(nsum * stride, dtype=torch.float64, device=dev)
    sc = _scalars(tables, pa, pb, pc, x, seed, offset)
    offs = {}
    run = 0
    for tb in tables:
        offs[id(tb)] = run
        run += tb.n_chunks
    _launch(partials_kernel, tables, n_streams, lambda tb: sc + [partials, offs[id(tb)], stride], (), switches,
            per_table, dict(PREP=prep, TERM=term, NSUM=nsum, AW=width))
    return partials, total
