"""R-SAM (Liu et al., NeurIPS 2022) on fused multi-tensor kernels: filter-wise Gaussian smoothing
and the ascent from the clean weights.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.<op>``
(``csrc/cpu/rsam.cpp``, ``csrc/cuda/rsam.cu``) or ``saf_kernels::<op>_triton``
(``saf_kernels/triton/rsam.py``) or :mod:`saf_kernels.reference`.

One step: :func:`rsam_noise_` (``w += delta``, the stash keeps ``w``), the first gradient at
``w + delta``, :func:`rsam_perturb_` (``w = stash + rho * d / ||d||``, ``d = lam * g1 + delta``),
the second gradient, then the SAM restore + base step (:func:`saf_kernels.ops.sam_restore_`,
``sam_restore_sgd_`` / ``sam_restore_adamw_``).

The noise is drawn per element inside the kernels from ``(seed, offset)`` and the element's
position -- every tensor its own stretch of one Philox stream (the official JAX code reuses one
PRNG key for every tensor, so same-shaped layers get identical draws) -- and never stored:
:func:`rsam_perturb_` takes the noise that was actually applied as ``w - stash``, exactly the
perturbation the first gradient saw (``w + delta`` rounded to the weights' dtype, minus ``w``),
with no second generation.

Launches on CUDA: :func:`rsam_noise_` 1 (a block owns whole output units: norm and noise in one
pass), :func:`rsam_perturb_` 3. No host synchronisation. Bytes per element: noise reads ``w``
(twice, the second from cache) and writes ``stash, w``; perturb reads ``g, w, stash`` twice and
writes ``w``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks, reference
from . import _multi_tensor as mt
from ._multi_tensor import Floats
from .philox import check_offset, check_seed, philox_, shard_offset

mt.register("rsam_noise_",
            "(Tensor(a0!)[] params, Tensor(a1!)[] stash, float[] std, SymInt seed, SymInt offset) -> ()",
            mt.void_fake, "rsam.rsam_noise")
mt.register("rsam_perturb_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor[] stash, float[] rho, float lam, float eps, "
            "Tensor? grad_scale, Tensor? found_inf, Tensor? sumsq=None) -> Tensor",
            mt.norm_fake, "rsam.rsam_perturb")
mt.register("rsam_sumsq",
            "(Tensor[] params, Tensor[] grads, Tensor[] stash, float lam, Tensor? grad_scale) -> Tensor",
            mt.sumsq_fake, "rsam.rsam_sumsq")


def _check_units(params, fn):
    """Output unit j (W[j, ...]) must be one block of memory (the row kernels' layout)."""
    for i, p in enumerate(params):
        if p.dim() >= 2 and p.numel() > 0 and p.shape[0] > 1 and p.stride(0) != p.numel() // p.shape[0]:
            raise ValueError(f"{fn}: params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) does not keep each "
                             f"output unit W[j, ...] contiguous in memory; pass a contiguous tensor")


@torch.no_grad()
def rsam_noise_(params: Sequence[torch.Tensor], stash: Sequence[torch.Tensor], std: Floats, seed: int,
                offset: int = 0, *, backend: str = "auto") -> None:
    """R-SAM's random smoothing, in place: ``stash = w``, then ``w += delta`` with, for every
    output unit ``j`` of a tensor (the slice ``W[j, ...]`` along dim 0, torch's ``[out, in, ...]``
    layout; the official JAX code's last axis)::

        delta[j, ...] = std * ||W[j, ...]||_2 * z,   z ~ N(0, 1) per element

    and ``delta = std * (||p||_2 + 1e-16) * z`` for tensors with fewer than 2 dims (biases,
    normalisation parameters), as the official code.

    Args:
        params: the weights (float32, float16, bfloat16 or float64; dims >= 2 must keep each
            ``W[j, ...]`` contiguous in memory: contiguous and channels_last tensors do).
        stash: one tensor like each param (same dtype): receives the weights before the noise.
        std: the noise scale (the official schedule's ``std_t``), >= 0; a number or one per tensor.
        seed: the Philox key (any integer in ``[-2**63, 2**64)``); use a new one every step.
        offset: counter offset >= 0.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

    Sharded tensors (lists of ``DTensor`` s sharded on dim 0, FSDP2's ``fully_shard``): a unit
    ``W[j, ...]`` lies whole on one rank, so the tensors with 2+ dims take this op on their local
    shards, drawn from the counter offset ``offset + rank * C`` (``C``: the counters of the whole
    list; the same N(0, 1) per element as unsharded, not the same draw). A tensor with fewer dims
    is one unit spread over the ranks: its norm is global (one ``all_reduce`` of one float64
    value per such tensor, all in one collective) and its noise ``z`` is drawn by
    :func:`saf_kernels.ops.philox_` per local shard, from the counters after the shards above
    (one small launch per such shard: biases and normalisation parameters).
    """
    fn = "saf_kernels.rsam_noise_"
    whole = params
    params, stash, group = mt.local_shards(fn, params=params, stash=stash)
    params, stash, n = mt.tensor_lists(fn, params=params, stash=stash)
    std_l = mt.per_tensor_full(std, n, "std", fn, nonneg=True)
    seed = check_seed(seed, fn)
    offset = shard_offset(whole, check_offset(offset, fn), group)
    if n == 0:
        return
    if group is not None:
        _sharded_noise(fn, params, stash, std_l, seed, offset, group, backend)
        return
    mt.run(
        "rsam_noise_", fn, backend, params[0].device, [("params", params), ("stash", stash)],
        lambda: reference.rsam_noise_(params, stash, std_l, seed, offset),
        params, stash, std_l, seed, offset, same_dtype=("stash",), more_checks=lambda: _check_units(params, fn))


def _sharded_noise(fn, params, stash, std_l, seed, offset, group, backend) -> None:
    """:func:`rsam_noise_` on local shards: the units of the tensors with 2+ dims are local (the
    op as it is); those with fewer dims get the global norm (one all-reduce for all of them)."""
    units = [i for i, p in enumerate(params) if p.dim() >= 2]
    vecs = [i for i, p in enumerate(params) if p.dim() < 2]
    if units:
        rsam_noise_([params[i] for i in units], [stash[i] for i in units], [std_l[i] for i in units], seed, offset,
                    backend=backend)
    if not vecs:
        return
    dev = params[vecs[0]].device
    sq = torch.stack([params[i].double().square().sum() for i in vecs])
    torch.distributed.all_reduce(sq, group=group)
    norms = sq.sqrt() + 1e-16  # stays on the device: no copy to or from the host
    ctr = offset + sum((params[i].numel() + 3) // 4 for i in units)
    for k, i in enumerate(vecs):
        p, s = params[i], stash[i]
        if p.numel():
            z = philox_(torch.empty(p.shape, dtype=torch.float32, device=dev), seed, ctr, "normal", backend=backend)
            s.copy_(p)
            p.copy_(p.to(_acc(p)) + (std_l[i] * norms[k]).to(_acc(p)) * z.to(_acc(p)))
        ctr += (p.numel() + 3) // 4


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def rsam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                  rho: Floats, lam: float = 2.0, eps: float = 1e-12, *, grad_scale: torch.Tensor | None = None,
                  found_inf: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """R-SAM's ascent step, in place, after :func:`rsam_noise_` and the first backward::

        delta = w - stash                      (the noise actually applied)
        d     = lam * g + delta                (g: the gradient at w + delta, / grad_scale)
        w     = stash + rho * d / (||d||_2 + eps)

    The norm is global over every tensor. The official code's ``lam`` is 2.0 and ``eps`` 1e-12.

    Returns:
        ``||d||`` as a 0-dim float32 tensor (float64 with float64 params), without a host
        synchronisation. When it is not finite, or ``found_inf > 0``, the weights go back to the
        stash (the clean weights, bit for bit) and nothing is perturbed.

    On lists of ``DTensor`` s sharded on dim 0 the norm is global: :func:`rsam_sumsq` of the
    local shards, one ``all_reduce`` of that value, then the finalize and the ascent of the local
    shards.
    """
    fn = "saf_kernels.rsam_perturb_"
    params, grads, stash, group = mt.local_shards(fn, params=params, grads=grads, stash=stash)
    params, grads, stash, n = mt.tensor_lists(fn, params=params, grads=grads, stash=stash)
    rho_l = mt.per_tensor_full(rho, n, "rho", fn, nonneg=True)
    lam = _checks.number(lam, "lam", fn)
    eps = mt.check_eps(eps, fn)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev)
    streams = [("params", params), ("grads", grads), ("stash", stash)]
    sumsq = mt.global_sums(group, lambda: _sumsq(fn, backend, dev, streams, params, grads, stash, lam, grad_scale))
    return mt.run(
        "rsam_perturb_", fn, backend, dev, streams,
        lambda: reference.rsam_perturb_(params, grads, stash, rho_l, lam, eps, grad_scale, found_inf, sumsq),
        params, grads, stash, rho_l, lam, eps, grad_scale, found_inf, sumsq, same_dtype=("grads", "stash"))


def _sumsq(fn, backend, dev, streams, params, grads, stash, lam, grad_scale) -> torch.Tensor:
    return mt.run("rsam_sumsq", fn, backend, dev, streams,
                  lambda: reference.rsam_sumsq(params, grads, stash, lam, grad_scale),
                  params, grads, stash, lam, grad_scale, same_dtype=("grads", "stash"))


@torch.no_grad()
def rsam_sumsq(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
               lam: float = 2.0, *, grad_scale: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The partial-sum stage of :func:`rsam_perturb_` alone: ``sum(d^2)`` with
    ``d = lam * g / grad_scale + (w - stash)`` over the tensors, a 0-dim float64 tensor on their
    device (unscaled). Sharded training sums it over the shards (one all-reduce);
    :func:`rsam_perturb_` does this itself on lists of ``DTensor`` s. Plain tensors only."""
    fn = "saf_kernels.rsam_sumsq"
    params, grads, stash, n = mt.tensor_lists(fn, params=params, grads=grads, stash=stash)
    lam = _checks.number(lam, "lam", fn)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale)
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    return _sumsq(fn, backend, dev, [("params", params), ("grads", grads), ("stash", stash)], params, grads, stash,
                  lam, grad_scale)
