"""SAM / ASAM on fused multi-tensor kernels: the perturbation, the exact restore, and fused
restore + SGD / AdamW steps.

Flow: public function -> :func:`saf_kernels._backend.resolve` -> ``torch.ops.saf_kernels.<op>``
(C++ CPU / CUDA kernels: ``csrc/cpu/sam.cpp``, ``csrc/cuda/sam.cu``) or
``saf_kernels::<op>_triton`` (``saf_kernels/triton/sam.py``) or :mod:`saf_kernels.reference`.

Launches per call on CUDA, whatever the number of tensors: :func:`sam_perturb_` 3 (norm partials,
finalize, perturbation; on ``DTensor`` lists the partials are :func:`sam_sumsq`'s, then one
all-reduce of that one value, then the other 2), :func:`sam_restore_` 1, :func:`sam_restore_sgd_` /
:func:`sam_restore_adamw_` 1. Triton: the same per dtype signature of the list. No function here
synchronises with the device: the norm, the AMP scale, ``found_inf`` and the "perturb nothing"
decision stay on it.

Bytes per element (``s`` = element size) of the kernels, the floors of performance.md 4.3:
perturb reads ``g`` (norm; ASAM also ``w``), then reads ``w, g`` and writes ``w, stash``: 5 passes
(ASAM 6); restore (copy) reads the stash and writes ``w``: 2; fused restore + SGD with momentum
reads ``stash, g, buf`` and writes ``w, buf``: 5 (a separate restore + ``torch.optim.SGD`` is 2 + 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from . import _multi_tensor as mt
from ._multi_tensor import Bools, Floats

ADAPTIVE = 2  # flags bit of sam_perturb_ (csrc/include/saf/multi_tensor.h)
ADAMW_MAXIMIZE = 2

mt.register("sam_perturb_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] stash, float[] rho, float[] eta, SymInt[] flags, "
            "float eps, SymInt stash_mode, Tensor? grad_scale, Tensor? found_inf, Tensor? sumsq=None) -> Tensor",
            mt.norm_fake, "sam.sam_perturb")
mt.register("sam_sumsq",
            "(Tensor[] params, Tensor[] grads, float[] eta, SymInt[] flags) -> Tensor",
            mt.sumsq_fake, "sam.sam_sumsq")
mt.register("sam_restore_",
            "(Tensor(a0!)[] params, Tensor[] stash, SymInt stash_mode) -> ()",
            mt.void_fake, "sam.sam_restore")
mt.register("sam_restore_sgd_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor[] stash, Tensor(a3!)[] momentum_buffers, float[] lr, "
            "float[] weight_decay, float[] momentum, float[] dampening, SymInt[] flags, SymInt stash_mode, "
            "Tensor? grad_scale, Tensor? found_inf) -> ()",
            mt.void_fake, "sam.sam_restore_sgd")
mt.register("sam_restore_adamw_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor[] stash, Tensor(a3!)[] exp_avg, Tensor(a4!)[] exp_avg_sq, "
            "Tensor[] steps, float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
            "SymInt[] flags, SymInt stash_mode, Tensor? grad_scale, Tensor? found_inf) -> ()",
            mt.void_fake, "sam.sam_restore_adamw")


@torch.no_grad()
def sam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                 rho: Floats, adaptive: Bools = False, eta: Floats = 0.0, eps: float = 1e-12, *,
                 grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                 stash_mode: str = "copy", backend: str = "auto") -> torch.Tensor:
    """SAM / ASAM ascent step over a list of tensors, in place: ``w += e`` with
    ``e = rho * T_w^2 * g / (||T_w * g||_2 + eps)``.

    The norm is global: over every element of every tensor of the list (SAM's
    ``sqrt(sum over leaves of sum(g^2))``). On lists of ``DTensor`` s sharded on dim 0 (FSDP2's
    ``fully_shard``) it is global over every shard of every rank: :func:`sam_sumsq` of the local
    shards, one ``all_reduce`` of that value on the mesh's group, then the finalize and the
    perturbation of the local shards in place; every rank gets the same norm. ``T_w = |w| + eta``
    on tensors whose ``adaptive`` is true (ASAM; ``eta = 0`` gives the "adaptive" of the widely
    used port), 1 elsewhere.

    Args:
        params: the weights, perturbed in place (float32, float16, bfloat16 or float64; dtypes may
            differ between tensors).
        grads: their gradients, same shapes, layouts and dtypes. May be scaled by ``grad_scale``.
        stash: written here. ``stash_mode="copy"``: one tensor like each param (the weights
            before the step; :func:`sam_restore_` puts them back bit for bit). ``"delta"``: the
            perturbation ``e`` in the stash tensor's dtype (e.g. bfloat16 to halve the memory);
            the weights get exactly that rounded ``e`` added, and the restore subtracts it, which
            is not bit exact (``w + e - e != w`` in floating point).
        rho: the radius, >= 0; a number or one per tensor (per-group rho).
        adaptive: ASAM scaling, a bool or one per tensor (biases and normalisation parameters
            are usually left out).
        eta: ASAM's offset, >= 0; a number or one per tensor.
        eps: added to the norm (1e-12 as the widely used port; zero gradients give ``e = 0``, not NaN).
        grad_scale: a one-element tensor on the tensors' device, e.g. ``GradScaler``'s scale: the
            gradients are divided by it inside the kernels (they are not modified).
        found_inf: a one-element tensor; when > 0 nothing is perturbed.
        stash_mode: ``"copy"`` (exact) or ``"delta"`` (lossy, lower memory).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

    Returns:
        The norm ``||T_w * g||`` of the unscaled gradients as a 0-dim float32 tensor (float64 if
        a param is float64) on the tensors' device, without a host synchronisation. When it is
        not finite (an inf or NaN gradient, or overflow of the sum of squares), nothing is
        perturbed: the weights stay as they were and the stash still allows the restore.
    """
    fn = "saf_kernels.sam_perturb_"
    params, grads, stash, group = mt.local_shards(fn, params=params, grads=grads, stash=stash)
    params, grads, stash, n = mt.tensor_lists(fn, params=params, grads=grads, stash=stash)
    rho_l = mt.per_tensor(rho, n, "rho", fn, nonneg=True)
    eta_l = mt.per_tensor(eta, n, "eta", fn, nonneg=True)
    flags = [ADAPTIVE if a else 0 for a in mt.per_tensor(adaptive, n, "adaptive", fn, kind=bool)]
    eps = mt.check_eps(eps, fn)
    mode = mt.stash_mode_code(stash_mode, fn)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev)
    streams = [("params", params), ("grads", grads), ("stash", stash)]
    sumsq = mt.global_sums(group, lambda: _sumsq(fn, backend, dev, streams, params, grads, eta_l, flags))
    return mt.run(
        "sam_perturb_", fn, backend, dev, streams,
        lambda: reference.sam_perturb_(params, grads, stash, mt.full(rho_l, n), [bool(f) for f in mt.full(flags, n)],
                                       mt.full(eta_l, n), eps, grad_scale, found_inf, stash_mode, sumsq),
        params, grads, stash, rho_l, eta_l, flags, eps, mode, grad_scale, found_inf, sumsq,
        same_dtype=("grads",) + (("stash",) if mode == 0 else ()))


def _sumsq(fn, backend, dev, streams, params, grads, eta_l, flags) -> torch.Tensor:
    n = len(params)
    return mt.run("sam_sumsq", fn, backend, dev, streams,
                  lambda: reference.sam_sumsq(params, grads, [bool(f) for f in mt.full(flags, n)], mt.full(eta_l, n)),
                  params, grads, eta_l, flags, same_dtype=("grads",))


@torch.no_grad()
def sam_sumsq(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], adaptive: Bools = False,
              eta: Floats = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """The partial-sum stage of :func:`sam_perturb_` alone: ``sum((T_w * g)^2)`` over the tensors
    (``T_w`` as there), a 0-dim float64 tensor on their device, in the gradients' units (scaled
    by ``grad_scale`` if they are). Sharded training sums it over the shards (one all-reduce) and
    passes the result to the finalize + perturbation stage; :func:`sam_perturb_` does this itself
    on lists of ``DTensor`` s. Plain tensors only (on a DTensor list it is each rank's own sum, so
    pass the local shards)."""
    fn = "saf_kernels.sam_sumsq"
    params, grads, n = mt.tensor_lists(fn, params=params, grads=grads)
    eta_l = mt.per_tensor(eta, n, "eta", fn, nonneg=True)
    flags = [ADAPTIVE if a else 0 for a in mt.per_tensor(adaptive, n, "adaptive", fn, kind=bool)]
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    return _sumsq(fn, backend, params[0].device, [("params", params), ("grads", grads)], params, grads, eta_l, flags)


@torch.no_grad()
def sam_restore_(params: Sequence[torch.Tensor], stash: Sequence[torch.Tensor], stash_mode: str = "copy",
                 backend: str = "auto") -> None:
    """Puts back the weights :func:`sam_perturb_` started from, in place.

    ``stash_mode="copy"``: the stash is copied back, bit for bit. ``"delta"``: the stashed
    perturbation is subtracted (lossy by a rounding). Use the same mode as the perturbation.
    """
    fn = "saf_kernels.sam_restore_"
    params, stash, _ = mt.local_shards(fn, params=params, stash=stash)
    params, stash, n = mt.tensor_lists(fn, params=params, stash=stash)
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return
    mt.run(
        "sam_restore_", fn, backend, params[0].device, [("params", params), ("stash", stash)],
        lambda: reference.sam_restore_(params, stash, stash_mode),
        params, stash, mode, same_dtype=("stash",) if mode == 0 else ())


@torch.no_grad()
def sam_restore_sgd_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                     momentum_buffers: Sequence[torch.Tensor], *, lr: Floats, weight_decay: Floats = 0.0,
                     momentum: Floats = 0.0, dampening: Floats = 0.0, nesterov: Bools = False, maximize: Bools = False,
                     first_run: Bools = False, stash_mode: str = "copy", grad_scale: torch.Tensor | None = None,
                     found_inf: torch.Tensor | None = None, backend: str = "auto") -> None:
    """SAM's second step fused into one pass: restore the weights, then one
    ``torch.optim.SGD`` step on them with the gradients ``g / grad_scale``.

    Same math and order of operations as ``torch.optim.SGD`` (weight decay, momentum with
    dampening, nesterov, maximize); results agree with it to rounding (the compiler may fuse
    multiply-adds), not bit for bit -- the optimizers' default path (restore, then the base
    optimizer's own step) is the exact one.

    Args:
        momentum_buffers: one buffer like each param (same dtype), read and written; an empty
            list when no tensor has momentum. A tensor whose ``first_run`` is true gets its
            buffer initialised to the gradient, as torch does on the first step.
        lr, weight_decay, momentum, dampening, nesterov, maximize, first_run: numbers / bools,
            or one per tensor (per-group hyperparameters).
        grad_scale, found_inf: GradScaler's tensors; ``found_inf > 0`` restores the weights and
            leaves the buffers, as a skipped step.
    """
    fn = "saf_kernels.sam_restore_sgd_"
    params, grads, stash, bufs, _ = mt.local_shards(fn, params=params, grads=grads, stash=stash,
                                                    momentum_buffers=momentum_buffers)
    n = mt.check_lengths(fn, params=params, grads=grads, stash=stash)
    if bufs and len(bufs) != n:
        raise ValueError(
            f"{fn}: momentum_buffers has {len(bufs)} tensors but params has {n} (pass [] for none)"
        )
    opts = mt.sgd_options(fn, n, bufs, lr, weight_decay, momentum, dampening, nesterov, maximize, first_run)
    flags = mt.sgd_flags(*opts[4:], n)
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    streams = [("params", params), ("grads", grads), ("stash", stash)] + ([("momentum_buffers", bufs)] if bufs else [])
    mt.run(
        "sam_restore_sgd_", fn, backend, dev, streams,
        lambda: reference.sam_restore_sgd_(params, grads, stash, bufs, *(mt.full(v, n) for v in opts), stash_mode,
                                           grad_scale, found_inf),
        params, grads, stash, bufs, *opts[:4], flags, mode, grad_scale, found_inf,
        same_dtype=("grads", "momentum_buffers") + (("stash",) if mode == 0 else ()))


@torch.no_grad()
def sam_restore_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                       exp_avg: Sequence[torch.Tensor], exp_avg_sq: Sequence[torch.Tensor],
                       steps: Sequence[torch.Tensor], *, lr: Floats, beta1: Floats = 0.9, beta2: Floats = 0.999,
                       eps: Floats = 1e-8, weight_decay: Floats = 1e-2, maximize: Bools = False,
                       stash_mode: str = "copy", grad_scale: torch.Tensor | None = None,
                       found_inf: torch.Tensor | None = None, backend: str = "auto") -> None:
    """SAM's second step fused into one pass: restore the weights, then one
    ``torch.optim.AdamW`` step (no amsgrad) on them with the gradients ``g / grad_scale``.

    ``steps`` are one-element float32 tensors on the params' device holding the step count
    *including* this step (increment them first, e.g. ``torch._foreach_add_(steps, 1)``; with
    AMP add ``1 - found_inf`` so that a skipped step does not count). ``exp_avg`` and
    ``exp_avg_sq`` have the params' dtypes. Agrees with ``torch.optim.AdamW`` to rounding.
    """
    fn = "saf_kernels.sam_restore_adamw_"
    params, grads, stash, exp_avg, exp_avg_sq, _ = mt.local_shards(fn, params=params, grads=grads, stash=stash,
                                                                  exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    params, grads, stash, exp_avg, exp_avg_sq, steps, n = mt.tensor_lists(
        fn, params=params, grads=grads, stash=stash, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, steps=steps
    )
    lr_l = mt.per_tensor(lr, n, "lr", fn, nonneg=True)
    b1 = mt.per_tensor(beta1, n, "beta1", fn, nonneg=True)
    b2 = mt.per_tensor(beta2, n, "beta2", fn, nonneg=True)
    eps_l = mt.per_tensor(eps, n, "eps", fn, nonneg=True)
    wd_l = mt.per_tensor(weight_decay, n, "weight_decay", fn, nonneg=True)
    maxi = mt.per_tensor(maximize, n, "maximize", fn, kind=bool)
    for name, vals in (("beta1", b1), ("beta2", b2)):
        for i, v in enumerate(vals):
            if not v < 1.0:
                raise ValueError(f"{fn}: {name}[{i}] must be in [0, 1), got {v!r}")
    mode = mt.stash_mode_code(stash_mode, fn)
    if n == 0:
        return
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    opts = (lr_l, b1, b2, eps_l, wd_l)

    def steps_float32():
        for i, s in enumerate(steps):
            if s.dtype != torch.float32:
                raise TypeError(f"{fn}: steps[{i}] must be float32, got {s.dtype}")

    streams = [("params", params), ("grads", grads), ("stash", stash), ("exp_avg", exp_avg),
               ("exp_avg_sq", exp_avg_sq), ("steps", steps)]
    mt.run(
        "sam_restore_adamw_", fn, backend, dev, streams,
        lambda: reference.sam_restore_adamw_(params, grads, stash, exp_avg, exp_avg_sq, steps,
                                             *(mt.full(v, n) for v in opts + (maxi,)), stash_mode, grad_scale,
                                             found_inf),
        params, grads, stash, exp_avg, exp_avg_sq, steps, *opts, [ADAMW_MAXIMIZE if m else 0 for m in maxi], mode,
        grad_scale, found_inf, scalar=("steps",),
        same_dtype=("grads", "exp_avg", "exp_avg_sq") + (("stash",) if mode == 0 else ()), more_checks=steps_float32)
