"""R-SAM (Liu et al., NeurIPS 2022) on the shared two-pass base: random smoothing with filter-wise
Gaussian noise drawn in the kernels, the first gradient at the smoothed point, and the SAM ascent
along ``lam * g1 + delta`` from the clean weights."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .. import _checks as C
from ..ops import rsam as rsam_ops
from ..ops import sam as sam_ops
from . import _rng
from .base import TwoPassOptimizer, nonneg, sharded_params
from .schedulers import CosineIncrease, ProportionScheduler


class RSAM(TwoPassOptimizer):
    """Random Sharpness-Aware Minimization (Liu et al., NeurIPS 2022), the official code's rule
    (RSAM-Optimizer/R-SAM, vit_jax/train.py), around any base optimizer::

        delta = std_t * ||W[j, ...]|| * N(0, 1)   per output unit j (dim 0 in torch's layout;
                                                  1-D params: std_t * (||p|| + 1e-16) * N(0, 1))
        g1    = grad L(w + delta)
        d     = lam * g1 + delta                  (lam = 2.0 in the code)
        w_adv = w + rho_t * d / (||d|| + 1e-12)   (from w, not from w + delta)
        w    <- base_step(w, grad L(w_adv))

    Usage, one call per step (the closure computes the loss and calls ``backward()``)::

        opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    or by hand: ``opt.noise_step()`` before the first forward, then as SAM (``first_step``,
    second forward + backward, ``second_step``; under AMP ``first_step(grad_scaler=scaler)``
    and ``scaler.step(opt)``).

    The noise is drawn per element inside the kernels (:func:`saf_kernels.ops.rsam_noise_`) from
    the optimizer's seed and step: every tensor has its own stretch of the Philox stream (the
    official code reuses one PRNG key for every tensor). It is never stored: the ascent takes it
    back as ``w - stash`` (the stash holds the clean weights for the exact restore anyway).

    Args:
        params, base_optimizer, **base_kwargs: as :class:`saf_kernels.optim.SAM`.
        rho: radius >= 0 (per group), used when ``rho_scheduler`` is None.
        rho_scheduler: ``(lr, step) -> rho_t``, e.g. :class:`ProportionScheduler` (the official
            schedule: ``ProportionScheduler(max_lr, min_lr, max_value=2.5, min_value=1.5,
            warmup_steps=10000)`` for its ViT run), called with each group's current ``lr``.
        noise_std: the noise scale ``std_t``: a number (constant), a ``step -> std`` callable, or
            a pair ``(start, end)`` rising on a half cosine over ``total_steps`` (the official
            ``(5e-4, 2.5e-3)``, :class:`CosineIncrease`). Default ``(5e-4, 2.5e-3)`` when
            ``total_steps`` is given, else ``5e-4``.
        total_steps: the length of the ``noise_std`` schedule.
        lam: the weight of ``g1`` in the ascent direction (2.0).
        perturb_eps: added to ``||d||`` (1e-12).
        seed: of the noise; None draws one from torch's default generator. Each step's key is
            ``splitmix64(seed + step)``; seed and step are in the state dict.
        fused_step, model, sync_first_pass, bn_first_pass_only, backend: as
            :class:`saf_kernels.optim.base.TwoPassOptimizer` (the stash is always a copy: the
            restore is exact). BatchNorm statistics come from the first pass, at ``w + delta``.

    Parameters that get no gradient in the first pass are put back at once and take no part
    in ``d`` (they do not change the loss, only ``||d||``).

    DDP: with ``sync_first_pass=False`` (default) every replica draws its own noise (counter
    offset ``rank * 2^40``; the official code folds the device index into its key) and ascends
    along its own first gradient; the second gradients are averaged by DDP.

    Sharded training (FSDP2): build it on a ``fully_shard``-ed model's parameters (DTensors). Both
    passes are synchronised as FSDP does it; every rank draws the noise of its own shards (a
    per-rank Philox offset: the same distribution, not the unsharded run's draw; 1-D parameters
    get their global norm, one all-reduce), and ``||d||`` is global (one all-reduce of one
    float64 value); ``sync_first_pass`` has no effect. See the README's "Sharded training
    (FSDP2)".
    """

    _schedulable = False  # its own step(closure): no every=/policy= (the filter applies)
    _shardable = True  # FSDP2: the noise's 1-D norms and ||d|| are reduced over the shards (the ops)

    _options = {"rho": nonneg}

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, *,
                 rho_scheduler: Callable[[float, int], float] | None = None,
                 noise_std: float | tuple[float, float] | Callable[[int], float] | None = None,
                 total_steps: int | None = None, lam: float = 2.0, perturb_eps: float = 1e-12,
                 seed: int | None = None, fused_step: bool | None = None, model: nn.Module | None = None,
                 sync_first_pass: bool = False, bn_first_pass_only: bool = True, backend: str = "auto",
                 **base_kwargs):
        name = type(self).__name__
        self.lam = C.number(lam, "lam", name)
        self.perturb_eps = nonneg(perturb_eps, "perturb_eps", name)
        self.rho_scheduler = C.function(rho_scheduler, "rho_scheduler", name, " (lr, step) -> rho", optional=True)
        self.noise_std = self._noise_schedule(noise_std, total_steps, name)
        self._seed = _rng.check_seed(seed, name)
        self._step = 0
        self._noised: list[torch.Tensor] | None = None
        self.last_rho: list[float] = []
        self.last_std: float | None = None
        super().__init__(params, base_optimizer, dict(rho=rho), base_kwargs, stash_mode="copy", fused_step=fused_step,
                         model=model, sync_first_pass=sync_first_pass, bn_first_pass_only=bn_first_pass_only,
                         backend=backend)
        self._sharded = sharded_params(name, self.param_groups)

    @staticmethod
    def _noise_schedule(noise_std, total_steps, name) -> Callable[[int], float]:
        if total_steps is not None:
            C.integer(total_steps, "total_steps", name, lo=1)
        if noise_std is None:
            noise_std = (5e-4, 2.5e-3) if total_steps is not None else 5e-4
        if callable(noise_std):
            return noise_std
        if isinstance(noise_std, (tuple, list)):
            if len(noise_std) != 2:
                raise ValueError(f"{name}: noise_std as a pair is (start, end), got {noise_std!r}")
            if total_steps is None:
                raise ValueError(f"{name}: noise_std=(start, end) needs total_steps")
            return CosineIncrease(noise_std[0], noise_std[1], total_steps)
        std = nonneg(noise_std, "noise_std", name)
        return lambda step: std

    def _rho(self, group: dict) -> float:
        if self.rho_scheduler is None:
            return group["rho"]
        return float(self.rho_scheduler(group["lr"], self._step))

    # ----------------------------------------------------------------------------------------
    # The steps
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def noise_step(self) -> None:
        """Adds the filter-wise noise to every parameter that requires a gradient (call before
        the first forward); the clean weights go to the stash."""
        if self._perturbed is not None or self._noised is not None:
            raise RuntimeError(f"{type(self).__name__}.noise_step() was called twice, or during a step")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        std = float(self.noise_std(self._step))
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"{type(self).__name__}: the noise schedule gave std = {std!r}")
        self.last_std = std
        rsam_ops.rsam_noise_(params, self._stash_for(params), std, _rng.step_key(self._seed, self._step),
                             self._rank_offset(), backend=self.backend)
        self._noised = params

    def begin_step(self) -> None:
        """:meth:`noise_step` unless this step is already noised or perturbed (what trainer
        integrations call at the start of every step, before its first micro-batch)."""
        if self._noised is None and self._perturbed is None:
            self.noise_step()

    def _rank_offset(self) -> int:
        """Under DDP with an unsynchronised first pass each replica draws its own noise (the
        official code folds the device index into its key): replica r's counters start at
        r * 2^40, disjoint for any model below 2^42 parameters."""
        dist = torch.distributed
        if self.sync_first_pass or self._sharded or not (dist.is_available() and dist.is_initialized()):
            return 0  # sharded (FSDP2): the ops give each rank's shards their own counters
        return dist.get_rank() << 40

    def _perturb(self, params, grads, stash, groups, grad_scale):
        if self._noised is None:
            raise RuntimeError(f"{type(self).__name__}: call noise_step() before the first forward (step(closure) "
                               "does it), so that the first gradient is taken at w + delta")
        rho = [self._rho(g) for g in groups]
        self.last_rho = rho
        return rsam_ops.rsam_perturb_(params, grads, stash, rho, self.lam, self.perturb_eps, grad_scale=grad_scale,
                                      backend=self.backend)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> torch.Tensor:
        """The ascent from the clean weights along ``lam * g1 + delta`` (see the class docstring).
        Returns ``||d||`` (a device tensor)."""
        norm = super().first_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        got = {id(p) for p in self._perturbed}
        lost = [p for p in self._noised if id(p) not in got]
        if lost:  # noised but no first gradient: clean again, left out of the ascent
            sam_ops.sam_restore_(lost, [self._stash[p] for p in lost], "copy", backend=self.backend)
        self._noised = None
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Exact restore and the base step (see :class:`TwoPassOptimizer`)."""
        super().second_step(zero_grad)
        self._step += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One R-SAM step: noise, the closure at ``w + delta``, the ascent, the closure at
        ``w_adv``, restore and base step. Returns the first loss. Without a closure: finishes a
        step begun by :meth:`first_step` (``GradScaler.step``)."""
        if closure is None:
            return super().step()
        self.noise_step()
        return super().step(closure)

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """As :class:`TwoPassOptimizer`, plus the noise seed and the step count (the schedules')."""
        sd = super().state_dict()
        sd["saf_kernels"].update(_rng.stream_state(self))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        info = state_dict.get("saf_kernels") or {}
        super().load_state_dict(state_dict)
        _rng.load_stream_state(self, info)
        self._noised = None


__all__ = ["RSAM", "ProportionScheduler", "CosineIncrease"]
