"""GSAM (Zhuang et al., ICLR 2022) on fused multi-tensor kernels: the surrogate-gap decomposition
of the second gradient, fused with the restore and (for SGD) the base step.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.<op>``
(``csrc/cpu/gsam.cpp``, ``csrc/cuda/gsam.cu``) or ``saf_kernels::<op>_triton``
(``saf_kernels/triton/gsam.py``) or :mod:`saf_kernels.reference`.

The three reductions ``<g, g_p>``, ``|g|^2``, ``|g_p|^2`` are one pass reading both gradients
(per-chunk partials summed in a fixed order: deterministic); the decomposition
``g_p - alpha * g_perp`` is two scalars computed on the device, applied in the next pass. CUDA:
3 launches per op, whatever the number of tensors; no host synchronisation.

Bytes per element: reductions read ``g, g_p``; :func:`gsam_combine_` then reads ``g, g_p`` (and
the stash) and writes ``g_p`` (and ``w``); :func:`gsam_restore_sgd_` reads ``stash, g, g_p, buf``
and writes ``w, buf`` -- one pass more than SAM's fused step (the reductions), none for the
decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks, reference
from . import _multi_tensor as mt
from ._multi_tensor import Bools, Floats

mt.register("gsam_combine_",
            "(Tensor(a0!)[] params, Tensor(a1!)[] grads, Tensor[] old_grads, Tensor[] stash, float alpha, float eps, "
            "SymInt stash_mode, bool restore, Tensor? grad_scale, Tensor? old_grad_scale, Tensor? found_inf, "
            "Tensor? sums=None) -> Tensor",
            mt.stats_fake, "gsam.gsam_combine")
mt.register("gsam_restore_sgd_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor[] old_grads, Tensor[] stash, "
            "Tensor(a4!)[] momentum_buffers, float[] lr, float[] weight_decay, float[] momentum, float[] dampening, "
            "SymInt[] flags, float alpha, float eps, SymInt stash_mode, Tensor? grad_scale, Tensor? old_grad_scale, "
            "Tensor? found_inf, Tensor? sums=None) -> Tensor",
            mt.stats_fake, "gsam.gsam_restore_sgd")
mt.register("gsam_sums", "(Tensor[] grads, Tensor[] old_grads) -> Tensor", mt.sums_fake, "gsam.gsam_sums")


@torch.no_grad()
def gsam_combine_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], old_grads: Sequence[torch.Tensor],
                  stash: Sequence[torch.Tensor] = (), alpha: float = 0.4, eps: float = 1e-12, *, restore: bool = True,
                  stash_mode: str = "copy", grad_scale: torch.Tensor | None = None,
                  old_grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """GSAM's gradient decomposition in place, with the restore of the weights in the same pass.

    With ``g_p = grads`` (the gradient at the perturbed weights) and ``g = old_grads`` (the
    first gradient), both unscaled by their ``grad_scale``::

        cos    = <g, g_p> / (||g_p|| ||g|| + eps)
        g_perp = g - cos * ||g|| * g_p / (||g_p|| + eps)
        grads  = g_p - alpha * g_perp                 (unscaled)

    as juntang-zhuang/GSAM's ``gradient_decompose``; norms and the inner product are global over
    the list. With ``restore``, the weights are put back from ``stash`` (as
    :func:`saf_kernels.ops.sam_restore_`, copy mode bit exact) in the same pass; a base
    optimizer's ``step()`` can follow directly.

    ``found_inf > 0``: the gradients are left as they are (skip the step). A non-finite sum
    without AMP: the decomposition is undefined and ``grads = g_p`` (unscaled).

    On lists of ``DTensor`` s sharded on dim 0 (FSDP2's ``fully_shard``) the two norms and the
    inner product are global over every shard: :func:`gsam_sums` of the local shards, one
    ``all_reduce`` of those 3 values on the mesh's group, then the decomposition of the local
    shards from them.

    Returns:
        ``[cos, ||g||, ||g_p||]`` (float32, float64 with float64 params) on the device.
    """
    fn = "saf_kernels.gsam_combine_"
    params, grads, old, stash, group = mt.local_shards(fn, params=params, grads=grads, old_grads=old_grads,
                                                       stash=stash)
    n = mt.check_lengths(fn, params=params, grads=grads, old_grads=old)
    if restore and len(stash) != n:
        raise ValueError(f"{fn}: restore=True needs one stash tensor per param ({n}), got {len(stash)}")
    alpha = _checks.number(alpha, "alpha", fn)
    eps = mt.check_eps(eps, fn)
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return torch.zeros(3)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, old_grad_scale=old_grad_scale, found_inf=found_inf)
    streams = [("params", params), ("grads", grads), ("old_grads", old)] + ([("stash", stash)] if restore else [])
    sums = _global_sums(fn, backend, dev, grads, old, group)
    return mt.run(
        "gsam_combine_", fn, backend, dev, streams,
        lambda: reference.gsam_combine_(params, grads, old, stash, alpha, eps, stash_mode, restore, grad_scale,
                                        old_grad_scale, found_inf, sums),
        params, grads, old, stash if restore else [], alpha, eps, mode, bool(restore), grad_scale, old_grad_scale,
        found_inf, sums, same_dtype=("grads", "old_grads") + (("stash",) if restore and mode == 0 else ()))


@torch.no_grad()
def gsam_restore_sgd_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], old_grads: Sequence[torch.Tensor],
                      stash: Sequence[torch.Tensor], momentum_buffers: Sequence[torch.Tensor], *, lr: Floats,
                      alpha: float = 0.4, eps: float = 1e-12, weight_decay: Floats = 0.0, momentum: Floats = 0.0,
                      dampening: Floats = 0.0, nesterov: Bools = False, maximize: Bools = False,
                      first_run: Bools = False, stash_mode: str = "copy", grad_scale: torch.Tensor | None = None,
                      old_grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """GSAM's second step fused: the reductions, then restore + one ``torch.optim.SGD`` step with
    ``g_p - alpha * g_perp`` (:func:`gsam_combine_`'s gradient, which is never written to memory).

    SGD arguments as :func:`saf_kernels.ops.sam_restore_sgd_`; ``found_inf > 0`` restores only
    and leaves the buffers. Returns ``[cos, ||g||, ||g_p||]`` on the device. ``DTensor`` lists:
    as :func:`gsam_combine_` (one all-reduce of 3 values).
    """
    fn = "saf_kernels.gsam_restore_sgd_"
    params, grads, old, stash, bufs, group = mt.local_shards(fn, params=params, grads=grads, old_grads=old_grads,
                                                             stash=stash, momentum_buffers=momentum_buffers)
    n = mt.check_lengths(fn, params=params, grads=grads, old_grads=old, stash=stash)
    if bufs and len(bufs) != n:
        raise ValueError(f"{fn}: momentum_buffers has {len(bufs)} tensors but params has {n} (pass [] for none)")
    alpha = _checks.number(alpha, "alpha", fn)
    eps = mt.check_eps(eps, fn)
    opts = mt.sgd_options(fn, n, bufs, lr, weight_decay, momentum, dampening, nesterov, maximize, first_run)
    opts = [mt.full(v, n) for v in opts]
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return torch.zeros(3)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, old_grad_scale=old_grad_scale, found_inf=found_inf)
    streams = [("params", params), ("grads", grads), ("old_grads", old), ("stash", stash)]
    streams += [("momentum_buffers", bufs)] if bufs else []
    sums = _global_sums(fn, backend, dev, grads, old, group)
    return mt.run(
        "gsam_restore_sgd_", fn, backend, dev, streams,
        lambda: reference.gsam_restore_sgd_(params, grads, old, stash, bufs, *opts, alpha, eps, stash_mode, grad_scale,
                                            old_grad_scale, found_inf, sums),
        params, grads, old, stash, bufs, *opts[:4], mt.sgd_flags(*opts[4:], n), alpha, eps, mode, grad_scale,
        old_grad_scale, found_inf, sums,
        same_dtype=("grads", "old_grads", "momentum_buffers") + (("stash",) if mode == 0 else ()))


def _sums(fn, backend, dev, streams, grads, old) -> torch.Tensor:
    return mt.run("gsam_sums", fn, backend, dev, streams, lambda: reference.gsam_sums(grads, old), grads, old,
                  same_dtype=("old_grads",))


def _global_sums(fn, backend, dev, grads, old, group) -> torch.Tensor | None:
    """Sharded: this rank's :func:`gsam_sums` (3 float64 values), all-reduced; else None."""
    return mt.global_sums(group, lambda: _sums(fn, backend, dev, [("grads", grads), ("old_grads", old)], grads, old))


@torch.no_grad()
def gsam_sums(grads: Sequence[torch.Tensor], old_grads: Sequence[torch.Tensor], *,
              backend: str = "auto") -> torch.Tensor:
    """The partial-sum stage of :func:`gsam_combine_` and :func:`gsam_restore_sgd_` alone:
    ``[<old_g, g>, |old_g|^2, |g|^2]`` over the tensors (``g = grads``), a float64 tensor of 3
    values on their device, in the gradients' (scaled) units. Sharded training sums it over the
    shards (one all-reduce) and passes it as ``sums``; the GSAM ops do this themselves on lists
    of ``DTensor`` s. Plain tensors only (pass the local shards)."""
    fn = "saf_kernels.gsam_sums"
    grads, old, n = mt.tensor_lists(fn, grads=grads, old_grads=old_grads)
    if n == 0:
        return torch.zeros(3, dtype=torch.float64)
    return _sums(fn, backend, grads[0].device, [("grads", grads), ("old_grads", old)], grads, old)
