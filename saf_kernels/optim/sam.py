"""SAM and ASAM on the fused multi-tensor kernels (saf_kernels.ops.sam_perturb_ and friends)."""

from __future__ import annotations

from typing import Callable

import torch

from .. import _checks as C
from ..ops import sam as sam_ops
from .base import TwoPassOptimizer, nonneg


class SAM(TwoPassOptimizer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any base optimizer.

    Same constructor and two-step API as the widely used port (davda54/sam)::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)       # w += rho * g / (||g|| + 1e-12), one fused op
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)      # exact restore, then the base optimizer's step

    or ``opt.step(closure)`` where the closure computes the loss and calls ``backward()``. With
    AMP, ``first_step(..., grad_scaler=scaler)`` and ``scaler.step(opt)`` (see
    :mod:`saf_kernels.optim.base`). The norm is global over all parameters of all groups, each
    group perturbed with its own ``rho``.

    Args:
        params: parameters or groups (a group may set ``rho``, ``adaptive``, ``eta``).
        base_optimizer: the optimizer class; ``**base_kwargs`` go to it (``lr``, ``momentum``, ...).
        rho: perturbation radius, >= 0. ``rho=0`` gives exactly the base optimizer's result.
        adaptive: the port's "adaptive" SAM: ``e = rho * w^2 * g / ||w * g||`` (plus ``eta``).
            For the official ASAM rule use :class:`ASAM`.
        eta: ASAM's offset in ``T_w = |w| + eta`` (adaptive only).
        perturb_eps: added to the norm (1e-12, as the port).
        stash_mode, stash_dtype, fused_step, model, sync_first_pass, bn_first_pass_only, backend:
            see :class:`saf_kernels.optim.base.TwoPassOptimizer`.

    Gradient clipping: the perturbation divides by the gradient norm, so clipping the first
    gradients changes nothing (except with ``adaptive``, where it is also a uniform rescale: no
    effect); clip before the second step, e.g. ``scaler.unscale_(opt); clip_grad_norm_(...);
    scaler.step(opt)``, or before ``opt.second_step()`` without AMP.

    Sharded training (FSDP2): build it on a ``fully_shard``-ed model's parameters (DTensors); the
    perturbation uses the global norm over every shard (one all-reduce of one float64 value per
    step, no host synchronisation) with the first pass synchronised as FSDP does it (the
    reduce-scattered gradients: a global-batch perturbation; ``sync_first_pass`` has no effect);
    the stash and the base optimizer's state are sharded like the parameters. Equals one process
    training on the whole batch. See the README's "Sharded training (FSDP2)".

    Gradient accumulation: call ``backward()`` on several micro-batches before ``first_step``
    and again before ``second_step``; nothing else is needed (``first_step`` reads the summed
    gradients; pass ``zero_grad=True`` so the second pass starts from zero).
    """

    _options = {"rho": nonneg, "adaptive": C.flag, "eta": nonneg}
    _shardable = True  # FSDP2: the norm is reduced over the shards (saf_kernels.ops.sam_perturb_)

    def __init__(
        self,
        params,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        perturb_eps: float = 1e-12,
        stash_mode: str = "copy",
        stash_dtype: torch.dtype | None = None,
        fused_step: bool | None = None,
        model: torch.nn.Module | None = None,
        sync_first_pass: bool = False,
        bn_first_pass_only: bool = True,
        backend: str = "auto",
        **base_kwargs,
    ):
        self.perturb_eps = nonneg(perturb_eps, "perturb_eps", type(self).__name__)
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, adaptive=adaptive, eta=eta),
            base_kwargs,
            stash_mode=stash_mode,
            stash_dtype=stash_dtype,
            fused_step=fused_step,
            model=model,
            sync_first_pass=sync_first_pass,
            bn_first_pass_only=bn_first_pass_only,
            backend=backend,
        )

    def _adaptive(self, params: list[torch.Tensor], groups: list[dict]):
        if len(self.param_groups) == 1:
            return bool(self.param_groups[0]["adaptive"])
        return [bool(g["adaptive"]) for g in groups]

    def _perturb(self, params, grads, stash, groups, grad_scale):
        one = len(self.param_groups) == 1  # one value for all tensors: no per-tensor lists to build
        g0 = self.param_groups[0]
        return sam_ops.sam_perturb_(
            params,
            grads,
            stash,
            g0["rho"] if one else [g["rho"] for g in groups],
            adaptive=self._adaptive(params, groups),
            eta=g0["eta"] if one else [g["eta"] for g in groups],
            eps=self.perturb_eps,
            grad_scale=grad_scale,
            stash_mode=self.stash_mode,
            backend=self.backend,
        )


def default_adaptive_filter(p: torch.Tensor) -> bool:
    """ASAM's scaling on weight matrices and convolution kernels; biases and normalisation
    parameters (1-D tensors) stay unscaled."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"default_adaptive_filter: p must be a tensor (a parameter), got {type(p).__name__}")
    return p.dim() > 1


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021), the official rule (SamsungLabs/ASAM):
    ``T_w = |w| + eta`` elementwise, ``e = rho * T_w^2 * g / ||T_w * g||``.

    Args:
        rho: default 0.5 (the official default; its README uses 0.5 on CIFAR-10, 1.0 on CIFAR-100).
        eta: default 0.01.
        adaptive_filter: ``param -> bool``, which tensors get ``T_w`` (the others use ``T_w = 1``
            but still count in the norm). Default: tensors with more than one dimension, so
            biases and normalisation parameters are left unscaled. The official code selects by
            name (``'weight' in name``, which also scales normalisation weights); to reproduce it:
            ``names = {p for n, p in model.named_parameters() if "weight" in n};
            ASAM(..., adaptive_filter=lambda p: p in names)``. A group with ``adaptive=False``
            is never scaled.
        Other arguments: as :class:`SAM` (``perturb_eps`` 1e-12; the official code uses 1e-16).
    """

    def __init__(
        self,
        params,
        base_optimizer: type,
        rho: float = 0.5,
        eta: float = 0.01,
        *,
        adaptive_filter: Callable[[torch.Tensor], bool] | None = None,
        **kwargs,
    ):
        if "adaptive" in kwargs:
            raise TypeError("ASAM is always adaptive; use adaptive_filter (or a group with adaptive=False)")
        adaptive_filter = C.function(adaptive_filter, "adaptive_filter", type(self).__name__, " (param -> bool)",
                                     optional=True)
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)
        self.adaptive_filter = adaptive_filter or default_adaptive_filter
        self._filter_cache: dict[int, bool] = {}

    def _adaptive(self, params, groups):
        out = []
        for p, g in zip(params, groups):
            hit = self._filter_cache.get(id(p))
            if hit is None:
                hit = bool(self.adaptive_filter(p))
                self._filter_cache[id(p)] = hit
            out.append(hit and bool(g["adaptive"]))
        return out
