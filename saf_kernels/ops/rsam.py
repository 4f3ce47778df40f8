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
from .philox import check_offset, check_seed

mt.register("rsam_noise_",
            "(Tensor(a0!)[] params, Tensor(a1!)[] stash, float[] std, SymInt seed, SymInt offset) -> ()",
            mt.void_fake, "rsam.rsam_noise")
mt.register("rsam_perturb_",
            "(Tensor(a0!)[] params, Tensor[] grads, Tensor[] stash, float[] rho, float lam, float eps, "
            "Tensor? grad_scale, Tensor? found_inf) -> Tensor",
            mt.norm_fake, "rsam.rsam_perturb")


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
    """
    fn = "saf_kernels.rsam_noise_"
    params, stash, n = mt.tensor_lists(fn, params=params, stash=stash)
    std_l = mt.per_tensor_full(std, n, "std", fn, nonneg=True)
    seed = check_seed(seed, fn)
    offset = check_offset(offset, fn)
    if n == 0:
        return
    mt.run(
        "rsam_noise_", fn, backend, params[0].device, [("params", params), ("stash", stash)],
        lambda: reference.rsam_noise_(params, stash, std_l, seed, offset),
        params, stash, std_l, seed, offset, same_dtype=("stash",), more_checks=lambda: _check_units(params, fn))


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
    """
    fn = "saf_kernels.rsam_perturb_"
    params, grads, stash, n = mt.tensor_lists(fn, params=params, grads=grads, stash=stash)
    rho_l = mt.per_tensor_full(rho, n, "rho", fn, nonneg=True)
    lam = _checks.number(lam, "lam", fn)
    eps = mt.check_eps(eps, fn)
    dev = mt.amp_scalars(fn, params, n, grad_scale=grad_scale, found_inf=found_inf)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev)
    return mt.run(
        "rsam_perturb_", fn, backend, dev, [("params", params), ("grads", grads), ("stash", stash)],
        lambda: reference.rsam_perturb_(params, grads, stash, rho_l, lam, eps, grad_scale, found_inf),
        params, grads, stash, rho_l, lam, eps, grad_scale, found_inf, same_dtype=("grads", "stash"))
