"""``philox_``: the counter-based random numbers of the ESAM / R-SAM ops, as a tensor.

Philox4x32-10 (key = the seed's 64 bits, counter = ``offset + position // 4``, word
``position % 4``; csrc/include/saf/philox.h), bit for bit Triton's ``tl.randint4x``. Raw words,
uniforms and Bernoulli draws are identical on every backend; normals go through float32
log / cos / sin and agree across backends to a few float32 ulps (exactly within one backend).
Use it to see the exact mask ESAM draws, or for reproducible noise of your own.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference
from . import _multi_tensor as mt

KINDS = {"words": 0, "uniform": 1, "normal": 2, "bernoulli": 3}


mt.register("philox_",
            "(Tensor(a0!) out, SymInt seed, SymInt offset, SymInt kind, float p) -> ()",
            mt.void_fake, "esam.philox")


def check_seed(seed, fn: str) -> int:
    """A seed as the signed 64-bit int the kernels take (its two's-complement bits are the key)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"{fn}: seed must be an integer in [-2**63, 2**64), got {seed!r}")
    seed = int(seed)
    return seed - 2**64 if seed >= 2**63 else seed


def check_offset(offset, fn: str) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or not 0 <= offset < 2**62:
        raise ValueError(f"{fn}: offset must be an integer in [0, 2**62), got {offset!r}")
    return int(offset)


def shard_offset(tensors, offset: int, group) -> int:
    """The Philox counter offset of this rank's shards (ESAM's masks, R-SAM's noise): ``offset``
    for plain tensors (``group`` None); for the ``DTensor`` s ``tensors`` sharded over ``group``
    (``_multi_tensor.local_shards``), ``offset + rank * C`` with ``C`` the counters of the whole
    unsharded list, its element counts padded to multiples of 4 (a rank's shards never need
    more), so the ranks draw from disjoint stretches of the stream."""
    if group is None:
        return offset
    counters = sum((t.numel() + 3) // 4 for t in tensors)  # a DTensor's numel() is the global one
    return check_offset(offset + torch.distributed.get_rank(group) * counters, "saf_kernels.philox")


@torch.no_grad()
def philox_(out: torch.Tensor, seed: int, offset: int = 0, kind: str = "normal", p: float = 0.5, *,
            backend: str = "auto") -> torch.Tensor:
    """Fills ``out`` (contiguous) with the Philox stream of positions ``0 .. numel - 1``.

    Args:
        out: ``kind="words"``: an int64 tensor (each value a 32-bit word); else floating.
        seed: any integer in ``[-2**63, 2**64)``; its 64 bits are the Philox key.
        offset: counter offset, >= 0 (``offset + position // 4`` is the counter).
        kind: ``"words"``, ``"uniform"`` ([0, 1), Triton's ``tl.rand``), ``"normal"``
            (Box-Muller, Triton's ``tl.randn4x`` layout) or ``"bernoulli"`` (1 with probability
            ``p``, resolution 2^-24, as ESAM's keep mask).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

    Returns:
        ``out``.
    """
    fn = "saf_kernels.philox_"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: out must be a tensor, got {type(out).__name__}")
    if kind not in KINDS:
        raise ValueError(f"{fn}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    if kind == "words" and out.dtype != torch.int64:
        raise TypeError(f"{fn}: kind='words' needs an int64 out, got {out.dtype}")
    if kind != "words" and not out.is_floating_point():
        raise TypeError(f"{fn}: kind={kind!r} needs a floating out, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{fn}: out must be contiguous")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: p must be in [0, 1], got {p!r}")
    seed = check_seed(seed, fn)
    offset = check_offset(offset, fn)
    impl = _backend.resolve(backend, out.device, "philox_")
    if impl == "torch":
        return reference.philox_(out, seed, offset, kind, p)
    mt.kernels("philox_")[impl](out, seed, offset, KINDS[kind], float(p))
    return out
