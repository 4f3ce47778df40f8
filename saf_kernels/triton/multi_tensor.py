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

Tables are cached by content, so a training loop whose tensors keep their addresses pays no
host-to-device copy; a miss costs one pinned, asynchronous copy (no host synchronisation).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

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


_CACHE: OrderedDict[bytes, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 32


def _upload(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    key = device.type.encode() + str(device.index).encode() + arr.tobytes()
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    host = torch.from_numpy(arr)
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    _CACHE[key] = dev
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return dev


def build_tables(
    streams: list[list[torch.Tensor]],
    params: list[list[float]],
    flags: list[int],
    signature_streams: tuple[int, ...] = (0,),
) -> list[Table]:
    """Tables grouping the tensors by the dtypes of ``signature_streams``.

    ``params`` holds K lists of per-tensor values and ``flags`` one int per tensor (a list of
    length 1 applies to all). Layout of ``meta`` (int64 words), for n tensors, L streams, K params, C chunks:
    ``[addr n*L | numel n | flags n | params n*K (float64 bits) | chunk_tensor C | chunk_start C]``.
    """
    n_all = len(streams[0])
    # Per-tensor lists of length 1 apply to every tensor (as in the C++ ops' schemas).
    flags = flags * n_all if len(flags) == 1 else flags
    params = [p * n_all if len(p) == 1 else p for p in params]
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
        par = np.array([[p[i] for p in params] for i in idx], dtype=np.float64).reshape(n, len(params))
        nc = (numel + CHUNK - 1) // CHUNK
        ct = np.repeat(np.arange(n, dtype=np.int64), nc)
        starts = np.arange(int(nc.sum()), dtype=np.int64) - np.repeat(np.cumsum(nc) - nc, nc)
        cs = starts * CHUNK
        arr = np.concatenate([addr.reshape(-1), numel, fl, par.reshape(-1).view(np.int64), ct, cs])
        meta = _upload(arr, streams[0][idx[0]].device)
        tables.append(Table(meta, meta.view(torch.float64), n, int(nc.sum()), sig, idx))
    return tables


@dataclass
class Offsets:
    numel: int
    flags: int
    params: int
    chunk_tensor: int
    chunk_start: int


def offsets(table: Table, n_streams: int, n_params: int) -> Offsets:
    n, c = table.n, table.n_chunks
    o_numel = n * n_streams
    o_flags = o_numel + n
    o_params = o_flags + n
    o_ct = o_params + n * n_params
    return Offsets(o_numel, o_flags, o_params, o_ct, o_ct + c)


def any_f64(tensors) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)
