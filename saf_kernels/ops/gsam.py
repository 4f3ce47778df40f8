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

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch

from .. import _backend, reference
from ._multi_tensor import (as_list, check_lengths, check_scalar, check_streams, full, sgd_options,
                            stash_mode_code)
from .sam import SGD_FIRST_RUN, SGD_MAXIMIZE, SGD_NESTEROV, _check_eps

Floats = Union[float, Sequence[float]]
Bools = Union[bool, Sequence[bool]]


def _stats_fake(params, *args):
    dt = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.empty(3, dtype=dt, device=params[0].device)


if _backend.HAS_EXT:
    torch.library.register_fake("saf_kernels::gsam_combine_")(_stats_fake)
    torch.library.register_fake("saf_kernels::gsam_restore_sgd_")(_stats_fake)


@torch.library.custom_op("saf_kernels::gsam_combine_triton", mutates_args=("params", "grads"))
def _gsam_combine_triton(params: list[torch.Tensor], grads: list[torch.Tensor], old_grads: list[torch.Tensor],
                         stash: list[torch.Tensor], alpha: float, eps: float, stash_mode: int, restore: bool,
                         grad_scale: Optional[torch.Tensor], old_grad_scale: Optional[torch.Tensor],
                         found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    from ..triton.gsam import gsam_combine

    return gsam_combine(params, grads, old_grads, stash, alpha, eps, stash_mode, restore, grad_scale, old_grad_scale,
                        found_inf)


_gsam_combine_triton.register_fake(_stats_fake)


@torch.library.custom_op("saf_kernels::gsam_restore_sgd_triton", mutates_args=("params", "momentum_buffers"))
def _gsam_restore_sgd_triton(params: list[torch.Tensor], grads: list[torch.Tensor], old_grads: list[torch.Tensor],
                             stash: list[torch.Tensor], momentum_buffers: list[torch.Tensor], lr: list[float],
                             weight_decay: list[float], momentum: list[float], dampening: list[float],
                             flags: list[int], alpha: float, eps: float, stash_mode: int,
                             grad_scale: Optional[torch.Tensor], old_grad_scale: Optional[torch.Tensor],
                             found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    from ..triton.gsam import gsam_restore_sgd

    return gsam_restore_sgd(params, grads, old_grads, stash, momentum_buffers, lr, weight_decay, momentum, dampening,
                            flags, alpha, eps, stash_mode, grad_scale, old_grad_scale, found_inf)


_gsam_restore_sgd_triton.register_fake(_stats_fake)


def _op(name: str, impl: str):
    if impl == "triton":
        return getattr(torch.ops.saf_kernels, f"{name.rstrip('_')}_triton")
    return getattr(torch.ops.saf_kernels, name)


def _check_alpha(alpha, fn):
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"{fn}: alpha must be a finite number, got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def gsam_combine_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    old_grads: Sequence[torch.Tensor],
    stash: Sequence[torch.Tensor] = (),
    alpha: float = 0.4,
    eps: float = 1e-12,
    *,
    restore: bool = True,
    stash_mode: str = "copy",
    grad_scale: torch.Tensor | None = None,
    old_grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
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

    Returns:
        ``[cos, ||g||, ||g_p||]`` (float32, float64 with float64 params) on the device.
    """
    fn = "saf_kernels.gsam_combine_"
    params, grads, old = as_list(params, "params", fn), as_list(grads, "grads", fn), as_list(old_grads, "old_grads", fn)
    stash = as_list(stash, "stash", fn)
    n = check_lengths(fn, params=params, grads=grads, old_grads=old)
    if restore and len(stash) != n:
        raise ValueError(f"{fn}: restore=True needs one stash tensor per param ({n}), got {len(stash)}")
    alpha = _check_alpha(alpha, fn)
    eps = _check_eps(eps, fn)
    mode = stash_mode_code(stash_mode, fn)
    if n == 0:
        return torch.zeros(3)
    dev = params[0].device
    for name, t in (("grad_scale", grad_scale), ("old_grad_scale", old_grad_scale), ("found_inf", found_inf)):
        check_scalar(t, name, fn, dev)
    impl = _backend.resolve(backend, dev, "gsam_combine_")
    if impl in ("triton", "torch"):
        streams = [("params", params), ("grads", grads), ("old_grads", old)] + ([("stash", stash)] if restore else [])
        check_streams(fn, streams, same_dtype=("grads", "old_grads") + (("stash",) if restore and mode == 0 else ()))
    if impl == "torch":
        return reference.gsam_combine_(params, grads, old, stash, alpha, eps, stash_mode, restore, grad_scale,
                                       old_grad_scale, found_inf)
    return _op("gsam_combine_", impl)(params, grads, old, stash if restore else [], alpha, eps, mode, bool(restore),
                                      grad_scale, old_grad_scale, found_inf)


@torch.no_grad()
def gsam_restore_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    old_grads: Sequence[torch.Tensor],
    stash: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: Floats,
    alpha: float = 0.4,
    eps: float = 1e-12,
    weight_decay: Floats = 0.0,
    momentum: Floats = 0.0,
    dampening: Floats = 0.0,
    nesterov: Bools = False,
    maximize: Bools = False,
    first_run: Bools = False,
    stash_mode: str = "copy",
    grad_scale: torch.Tensor | None = None,
    old_grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GSAM's second step fused: the reductions, then restore + one ``torch.optim.SGD`` step with
    ``g_p - alpha * g_perp`` (:func:`gsam_combine_`'s gradient, which is never written to memory).

    SGD arguments as :func:`saf_kernels.ops.sam_restore_sgd_`; ``found_inf > 0`` restores only
    and leaves the buffers. Returns ``[cos, ||g||, ||g_p||]`` on the device.
    """
    fn = "saf_kernels.gsam_restore_sgd_"
    params, grads, old = as_list(params, "params", fn), as_list(grads, "grads", fn), as_list(old_grads, "old_grads", fn)
    stash = as_list(stash, "stash", fn)
    bufs = as_list(momentum_buffers, "momentum_buffers", fn)
    n = check_lengths(fn, params=params, grads=grads, old_grads=old, stash=stash)
    if bufs and len(bufs) != n:
        raise ValueError(f"{fn}: momentum_buffers has {len(bufs)} tensors but params has {n} (pass [] for none)")
    alpha = _check_alpha(alpha, fn)
    eps = _check_eps(eps, fn)
    lr_l, wd_l, mom_l, damp_l, nest, maxi, first = (full(v, n) for v in sgd_options(
        fn, n, bufs, lr, weight_decay, momentum, dampening, nesterov, maximize, first_run))
    mode = stash_mode_code(stash_mode, fn)
    if n == 0:
        return torch.zeros(3)
    dev = params[0].device
    for name, t in (("grad_scale", grad_scale), ("old_grad_scale", old_grad_scale), ("found_inf", found_inf)):
        check_scalar(t, name, fn, dev)
    impl = _backend.resolve(backend, dev, "gsam_restore_sgd_")
    if impl in ("triton", "torch"):
        streams = [("params", params), ("grads", grads), ("old_grads", old), ("stash", stash)]
        streams += [("momentum_buffers", bufs)] if bufs else []
        check_streams(fn, streams, same_dtype=("grads", "old_grads", "momentum_buffers") + (("stash",) if mode == 0
                                                                                             else ()))
    if impl == "torch":
        return reference.gsam_restore_sgd_(params, grads, old, stash, bufs, lr_l, wd_l, mom_l, damp_l, nest, maxi,
                                           first, alpha, eps, stash_mode, grad_scale, old_grad_scale, found_inf)
    flags = [SGD_NESTEROV * a + SGD_MAXIMIZE * b + SGD_FIRST_RUN * c for a, b, c in zip(nest, maxi, first)]
    return _op("gsam_restore_sgd_", impl)(params, grads, old, stash, bufs, lr_l, wd_l, mom_l, damp_l, flags, alpha,
                                          eps, mode, grad_scale, old_grad_scale, found_inf)
