"""Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033): SAM's perturbation taken along the momentum buffer,
one forward/backward per step. The authors' update (MarlonBecker/MSAM, ``optimizer/msam.py``,
``optimizer/adamW_msam.py``) on the fused ops :func:`saf_kernels.ops.msam_sgd_` /
:func:`saf_kernels.ops.msam_adamw_`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch

from .. import _checks as C
from ..ops import msam as msam_ops
from .base import TwoPassOptimizer, nonneg, refuse_sharded


class _MomentumSAM(torch.optim.Optimizer):
    """What MSAM and MSAMAdamW share: the perturbed weights between steps, the device-side
    ``1 / |buf|``, :meth:`unperturbed` and the checkpoint."""

    _buffer_key = "momentum_buffer"

    def __init__(self, params, defaults: dict, *, backend: str):
        name = type(self).__name__
        C.backend(backend, name)
        self.backend = backend
        super().__init__(params, defaults)
        refuse_sharded(name, self.param_groups)
        for g in self.param_groups:
            g.setdefault("rho_applied", 0.0)
        self._inv_norm: torch.Tensor | None = None

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("rho_applied", 0.0)
        super().add_param_group(param_group)

    def _inv(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._inv_norm is None or self._inv_norm.device != device:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            self._inv_norm = torch.zeros((), dtype=acc, device=device)
        return self._inv_norm

    _with_grads = TwoPassOptimizer._collect  # (params, grads, groups) of the params with a gradient

    def _fused(self, params, grads, groups) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step (un-perturb, moments, update, re-perturb; two fused passes). The closure, if
        given, computes the loss and calls ``backward()`` (once: MSAM costs one pass)."""
        C.function(closure, "closure", f"{type(self).__name__}.step", " (computes the loss and calls backward())",
                   optional=True)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, groups = self._with_grads()
        if params:
            self.last_momentum_norm = self._fused(params, grads, groups)
            for g in self.param_groups:
                g["rho_applied"] = g["rho"]
        return loss

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside the block the parameters hold the unperturbed weights ``w`` (evaluation,
        export: ``with opt.unperturbed(): torch.save(model.state_dict(), path)``); on exit the
        perturbed weights are put back bit for bit (copied, not recomputed). For resuming, save
        the model and ``opt.state_dict()`` as they are (outside the block): resuming is then bit
        identical."""
        saved = []
        with torch.no_grad():
            inv = self._inv_norm
            for g in self.param_groups:
                for p in g["params"]:
                    buf = self.state[p].get(self._buffer_key) if p in self.state else None
                    if buf is None or inv is None or g["rho_applied"] == 0:
                        continue
                    saved.append((p, p.clone()))
                    p.add_(buf * (g["rho_applied"] * inv.to(buf.device, buf.dtype)))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in saved:
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``1 / (|buf| + eps)`` of the last step (the groups keep
        ``rho_applied``, the radius the weights are perturbed with now)."""
        sd = super().state_dict()
        sd["saf_kernels"] = {"optimizer": type(self).__name__,
                             "inv_norm": None if self._inv_norm is None else self._inv_norm.clone()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        info = state_dict.get("saf_kernels") or {}
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "saf_kernels"})
        inv = info.get("inv_norm")
        self._inv_norm = None if inv is None else inv.clone()


class MSAM(_MomentumSAM):
    """Momentum-SAM with SGD, the authors' rule. Between steps the parameters hold the
    *perturbed* weights ``w - rho * buf / |buf|`` (as the authors' code: the forward/backward of
    a step is taken there); a step::

        d = g + weight_decay * w_perturbed;  w = w_perturbed + rho * buf / |buf|   (unperturbed)
        buf = momentum * buf + d;  w = w - lr * buf;  w_perturbed = w - rho * buf / (|buf| + 1e-12)

    ``|buf|`` is global over all parameters. ``rho = 0`` is ``torch.optim.SGD(lr, momentum,
    weight_decay)`` (dampening 0, no Nesterov, as the authors). One forward/backward per step;
    two fused passes over the parameters (:func:`saf_kernels.ops.msam_sgd_`); no extra memory
    beyond SGD's momentum buffer. No host synchronisation.

    A parameter without a gradient in a step is left where it is (as the authors' code): keep
    every parameter in the graph, or its perturbation goes stale. Evaluate or export inside
    :meth:`unperturbed`. Under AMP use ``scaler.step(opt)``: the
    scaler unscales and skips an overflowed step as for any torch optimizer.

    Args:
        lr: learning rate (0.1). momentum: in [0, 1) (0.9). rho: radius >= 0 (0.3, the authors'
        SGD default). weight_decay: L2 added to the gradient (0). eps: added to ``|buf|`` (1e-12).
        backend: ``"auto" | "triton" | "torch"`` (no C++ kernel yet).
    """

    _options = {}

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, rho: float = 0.3, weight_decay: float = 0.0,
                 *, eps: float = 1e-12, backend: str = "auto"):
        name = type(self).__name__
        defaults = dict(lr=nonneg(lr, "lr", name), momentum=C.number(momentum, "momentum", name, lo=0, hi=1,
                                                                      hi_open=True),
                        rho=nonneg(rho, "rho", name), weight_decay=nonneg(weight_decay, "weight_decay", name))
        self.eps = nonneg(eps, "eps", name)
        super().__init__(params, defaults, backend=backend)

    def _fused(self, params, grads, groups):
        bufs = []
        for p in params:
            st = self.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        return msam_ops.msam_sgd_(
            params, grads, bufs, self._inv(params[0].device, params[0].dtype), lr=[g["lr"] for g in groups],
            weight_decay=[g["weight_decay"] for g in groups], momentum=[g["momentum"] for g in groups],
            rho_prev=[g["rho_applied"] for g in groups], rho=[g["rho"] for g in groups], eps=self.eps,
            backend=self.backend)


class MSAMAdamW(_MomentumSAM):
    """Momentum-SAM with AdamW, the authors' ``AdamW_MSAM``: the perturbation ``-rho * m / |m|``
    follows the first moment ``m``; the decoupled decay multiplies the weights after the Adam
    step (the authors' order; ``torch.optim.AdamW`` decays first, a difference of ``lr * wd``
    times the Adam step). ``rho = 0`` with ``weight_decay = 0`` is ``torch.optim.AdamW``.

    Args:
        lr (1e-3), betas ((0.9, 0.999)), eps (1e-8), weight_decay (1e-2): as ``torch.optim.AdamW``.
        rho: radius >= 0 (0.3; the authors' files default to 1.0 and 0.05, tune it).
        norm_eps: added to ``|m|`` (1e-12). backend: as :class:`MSAM`.
    """

    _buffer_key = "exp_avg"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rho: float = 0.3, *, norm_eps: float = 1e-12, backend: str = "auto"):
        name = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        betas = tuple(C.number(b, f"betas[{i}]", name, lo=0, hi=1, hi_open=True) for i, b in enumerate(betas))
        defaults = dict(lr=nonneg(lr, "lr", name), betas=betas, eps=nonneg(eps, "eps", name),
                        weight_decay=nonneg(weight_decay, "weight_decay", name), rho=nonneg(rho, "rho", name))
        self.norm_eps = nonneg(norm_eps, "norm_eps", name)
        super().__init__(params, defaults, backend=backend)

    def _fused(self, params, grads, groups):
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        torch._foreach_add_(steps, 1.0)
        return msam_ops.msam_adamw_(
            params, grads, m, v, steps, self._inv(params[0].device, params[0].dtype), lr=[g["lr"] for g in groups],
            beta1=[g["betas"][0] for g in groups], beta2=[g["betas"][1] for g in groups],
            eps=[g["eps"] for g in groups], weight_decay=[g["weight_decay"] for g in groups],
            rho_prev=[g["rho_applied"] for g in groups], rho=[g["rho"] for g in groups], norm_eps=self.norm_eps,
            backend=self.backend)
