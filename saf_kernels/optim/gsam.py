"""GSAM (Zhuang et al., ICLR 2022) on the shared two-pass base: SAM's ascent, then the surrogate-gap
decomposition of the second gradient fused with the restore and the base step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .. import _checks as C
from ..ops import gsam as gsam_ops
from ..ops import sam as sam_ops
from . import utils
from .base import TwoPassOptimizer, nonneg, sharded_params
from .schedulers import ProportionScheduler


class GSAM(TwoPassOptimizer):
    """Surrogate Gap guided SAM (Zhuang et al., ICLR 2022), Algorithm 1, with the official PyTorch
    code's formulas (juntang-zhuang/GSAM)::

        g      = grad L(w)                       e = rho_t * g / (||g|| + eps)  (adaptive: * w^2)
        g_p    = grad L(w + e)
        cos    = <g, g_p> / (||g_p|| ||g|| + eps)
        g_perp = g - cos * ||g|| * g_p / (||g_p|| + eps)
        w     <- base_step(w, g_p - alpha * g_perp)

    Same API as :class:`saf_kernels.optim.SAM` (``first_step`` / ``second_step``, ``step(closure)``,
    AMP through ``first_step(grad_scaler=...)`` and ``scaler.step(opt)``). The three reductions
    are one fused pass; the decomposition is two scalars on the device, applied with the restore
    in the next pass (:func:`saf_kernels.ops.gsam_combine_`), and with ``fused_step=True`` and an
    SGD base also with the SGD update (:func:`saf_kernels.ops.gsam_restore_sgd_`; AdamW: the
    combined gradient, then the fused restore + AdamW). No host synchronisation.

    The first gradients are taken out of ``.grad`` by :meth:`first_step` and kept as they are (no
    copy, unlike the official ``old_g = p.grad.clone()``); the second backward writes fresh
    gradients. If something else may write into the same gradient memory (e.g. DDP with
    ``gradient_as_bucket_view=True``), pass ``copy_first_grads=True``.

    Args:
        params, base_optimizer, **base_kwargs: as :class:`saf_kernels.optim.SAM`.
        rho: radius >= 0 (per group), when ``rho_scheduler`` is None.
        alpha: weight of the orthogonal component (0.4 as pytorch_optimizer; the paper's Table 4:
            0.01 for ResNets, 0.4-1.0 for ViTs). ``alpha = 0`` is SAM.
        rho_scheduler: ``(lr, step) -> rho_t``, e.g. :class:`ProportionScheduler`
            (``rho_t = rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)``).
        adaptive: the ``|w|``-scaled perturbation of the official ``adaptive`` flag.
        perturb_eps: 1e-12 as the official code (norm and cosine).
        stash_mode, stash_dtype, fused_step, model, sync_first_pass, bn_first_pass_only, backend:
            as :class:`saf_kernels.optim.base.TwoPassOptimizer`.

    DDP (``sync_first_pass=False``, the default): as the official code, each replica perturbs
    with its own first gradient and decomposes its own second gradient (both passes under
    ``no_sync`` when the optimizer knows the DDP ``model``), then the decomposed gradients are
    averaged across replicas (one all-reduce per dtype and device, before the base step; the
    fused restore + SGD kernel is then not used, the combined gradient has to exist in memory to
    be reduced). Without ``model`` the second pass is averaged by DDP too and the average is
    taken again after the decomposition: the replicas stay identical either way.
    ``sync_first_pass=True``: both gradients are averages, the decomposition is the same on every
    replica and nothing extra is reduced.

    Sharded training (FSDP2): build it on a ``fully_shard``-ed model's parameters (DTensors). Both
    passes are synchronised as FSDP does it (reduce-scattered gradients), so the decomposition is
    the global one: SAM's norm (one all-reduce of one float64 value) and the three sums
    ``<g, g_p>, |g|^2, |g_p|^2`` over every shard (one all-reduce of 3 float64 values) per step,
    no host synchronisation; ``sync_first_pass`` has no effect. Equals one process training on
    the whole batch. See the README's "Sharded training (FSDP2)".
    """

    _shardable = True  # FSDP2: the norm and the 3 sums are reduced over the shards (the ops do it)
    _options = {"rho": nonneg, "alpha": lambda v, name, fn: C.number(v, name, fn), "adaptive": C.flag}

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, alpha: float = 0.4, *,
                 rho_scheduler: Callable[[float, int], float] | None = None, adaptive: bool = False,
                 perturb_eps: float = 1e-12, copy_first_grads: bool = False, stash_mode: str = "copy",
                 stash_dtype: torch.dtype | None = None, fused_step: bool | None = None,
                 model: nn.Module | None = None, sync_first_pass: bool = False, bn_first_pass_only: bool = True,
                 backend: str = "auto", **base_kwargs):
        name = type(self).__name__
        self.rho_scheduler = C.function(rho_scheduler, "rho_scheduler", name, " (lr, step) -> rho", optional=True)
        self.perturb_eps = nonneg(perturb_eps, "perturb_eps", name)
        self.copy_first_grads = C.flag(copy_first_grads, "copy_first_grads", name)
        self._step = 0
        self._old_g: dict[torch.Tensor, torch.Tensor] = {}
        self._old_scale: torch.Tensor | None = None
        self.last_rho: list[float] = []
        self.last_stats: torch.Tensor | None = None
        super().__init__(params, base_optimizer, dict(rho=rho, alpha=alpha, adaptive=adaptive), base_kwargs,
                         stash_mode=stash_mode, stash_dtype=stash_dtype, fused_step=fused_step, model=model,
                         sync_first_pass=sync_first_pass, bn_first_pass_only=bn_first_pass_only, backend=backend)
        self._sharded = sharded_params(name, self.param_groups)

    def _check_group(self, group: dict, index: int) -> None:
        super()._check_group(group, index)
        first = self.param_groups[0] if self.param_groups and index > 0 else group
        if group["alpha"] != first["alpha"]:
            raise ValueError(f"{type(self).__name__}: alpha must be the same for every group (the decomposition is "
                             f"global), got {sorted({first['alpha'], group['alpha']})}")

    def _rho(self, group: dict) -> float:
        if self.rho_scheduler is None:
            return group["rho"]
        return float(self.rho_scheduler(group["lr"], self._step))

    def _perturb(self, params, grads, stash, groups, grad_scale):
        rho = [self._rho(g) for g in groups]
        self.last_rho = rho
        self._old_g = {p: (g.clone() if self.copy_first_grads else g) for p, g in zip(params, grads)}
        self._old_scale = grad_scale
        return sam_ops.sam_perturb_(params, grads, stash, rho, adaptive=[bool(g["adaptive"]) for g in groups],
                                    eta=0.0, eps=self.perturb_eps, grad_scale=grad_scale, stash_mode=self.stash_mode,
                                    backend=self.backend)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> torch.Tensor:
        """SAM's ascent; the first gradients are then taken out of ``.grad`` (kept for the
        decomposition), so the second backward starts from empty gradients whatever
        ``zero_grad`` says."""
        norm = super().first_step(zero_grad=False, grad_scaler=grad_scaler)
        for p in self._perturbed:
            p.grad = None
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Decomposition + restore + base step (fused as the class docstring says). Under AMP
        call ``grad_scaler.step(optimizer)`` instead."""
        if self._single_pass_now():
            self.single_pass_step(zero_grad)
            return
        params, grad_scale, found = self._begin_second_step(zero_grad)
        alpha = float(self.param_groups[0]["alpha"]) if self.param_groups else 0.0
        # Perturbed but without a second gradient: restore only (torch skips such params too).
        lost = [p for p in params if p.grad is None]
        if lost:
            sam_ops.sam_restore_(lost, [self._stash[p] for p in lost], self.stash_mode, backend=self.backend)
        now, grads, groups = self._collect()
        # A gradient only in the second pass (rare): no first gradient (zeros) and nothing to
        # restore (the stash is the weight itself, or a zero perturbation).
        perturbed = {id(p) for p in params}
        old, stash = [], []
        for p in now:
            if id(p) in perturbed:
                old.append(self._old_g[p])
                stash.append(self._stash[p])
            else:
                old.append(torch.zeros_like(p))
                stash.append(p.clone() if self.stash_mode == "copy"
                             else torch.zeros_like(p, dtype=self.stash_dtype or p.dtype))
        base = self.base_optimizer
        fused = self.fused_step
        momenta = {g["momentum"] != 0 for g in groups} if type(base) is torch.optim.SGD else set()
        local = self._local_decomposition()
        if not now:
            pass
        elif fused and len(momenta) == 1 and not local:
            # One fused pass: restore + SGD with g_p - alpha g_perp (one call, so one global
            # decomposition; groups mixing momentum and none take the path below).
            self._fused_gsam_sgd(now, grads, old, stash, groups, alpha, grad_scale, found, momenta.pop())
        else:
            self.last_stats = gsam_ops.gsam_combine_(
                now, grads, old, stash, alpha, self.perturb_eps, restore=not fused,
                stash_mode=self.stash_mode, grad_scale=grad_scale, old_grad_scale=self._old_scale, found_inf=found,
                backend=self.backend)
            if local:  # each replica decomposed its own gradients: average them
                _all_reduce_mean(grads)
            # The gradients are unscaled now: the base step gets found_inf only.
            if fused:
                self._fused_second_step(now, stash, None, found)
            else:
                self._base_step(None, found)
        self._perturbed = None
        self._first_found_inf = None
        self._grad_scaler = None
        self._old_g = {}
        self._old_scale = None
        self._step += 1
        self._opt_called = True
        self._end_step(self.last_grad_norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _local_decomposition(self) -> bool:
        """True when replicas decompose different first gradients (DDP, unsynchronised first pass).
        Never on sharded parameters (FSDP2): the gradients are reduce-scattered and the
        decomposition is global (the GSAM ops all-reduce their 3 sums)."""
        dist = torch.distributed
        return (not self.sync_first_pass and not self._sharded and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """The second forward + backward: BatchNorm as :class:`TwoPassOptimizer`; under DDP with
        an unsynchronised first pass also without DDP's all-reduce (the decomposed gradient is
        averaged instead, as the official code does)."""
        model = model if model is not None else self.model
        with super().second_pass(model):
            if model is not None and utils.is_ddp(model) and self._local_decomposition():
                with model.no_sync():
                    yield
            else:
                yield

    def _fused_gsam_sgd(self, params, grads, old, stash, groups, alpha, grad_scale, found, has_buf) -> None:
        bufs, first = self._momentum_buffers(params) if has_buf else ([], [])
        self.last_stats = gsam_ops.gsam_restore_sgd_(
            params, grads, old, stash, bufs, lr=[g["lr"] for g in groups], alpha=alpha, eps=self.perturb_eps,
            weight_decay=[g["weight_decay"] for g in groups], momentum=[g["momentum"] for g in groups],
            dampening=[g["dampening"] for g in groups], nesterov=[g["nesterov"] for g in groups],
            maximize=[g.get("maximize", False) for g in groups], first_run=first if has_buf else False,
            stash_mode=self.stash_mode, grad_scale=grad_scale, old_grad_scale=self._old_scale, found_inf=found,
            backend=self.backend)
        if not has_buf:
            for p in params:
                self.state[p].setdefault("momentum_buffer", None)

    def state_dict(self) -> dict[str, Any]:
        """As :class:`TwoPassOptimizer`, plus the step count of the rho schedule."""
        sd = super().state_dict()
        sd["saf_kernels"].update(step=self._step)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        info = state_dict.get("saf_kernels") or {}
        super().load_state_dict(state_dict)
        self._step = int(info.get("step", 0))
        self._old_g = {}


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors across the default process group: one flat all-reduce per (device, dtype)."""
    dist = torch.distributed
    world = dist.get_world_size()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        flat.div_(world)
        torch._foreach_copy_(ts, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in ts]), ts)])


__all__ = ["GSAM", "ProportionScheduler"]
