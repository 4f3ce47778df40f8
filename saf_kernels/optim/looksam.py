"""LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022) on the shared two-pass base: SAM's step every k-th step, the reused
orthogonal component on the others."""

from __future__ import annotations

from typing import Any

import torch

from .. import _checks as C
from ..ops import looksam as looksam_ops
from .sam import SAM


class LookSAM(SAM):
    """LookSAM: on every k-th step, counting from the first, a SAM step that also keeps::

        g_v = g_s - (<g, g_s> / |g|^2) g          (g: clean gradient, g_s: at w + e)

    and on the other steps one forward/backward and the update direction::

        g + alpha * |g| / |g_v| * g_v

    handed to the base optimizer. Norms and the inner product are global over all parameters
    (the paper's Algorithm 1; the unofficial code Leminhbinh0209/LookSAM takes them per tensor).
    ``k = 1`` is SAM exactly.

    Usage as :class:`SAM`: ``opt.step(closure)`` calls the closure twice on a SAM step and once
    otherwise. In a plain loop ask :attr:`sam_step`::

        loss_fn(model(x), y).backward()
        if opt.sam_step:
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)        # SAM's second step, or the reuse step

    AMP: ``first_step(grad_scaler=...)`` on SAM steps and ``scaler.step(opt)`` always; the reuse
    direction is invariant to the gradients' scale (the base step unscales them), and an
    overflow leaves ``g_v`` as it was.

    Cost: a SAM step is SAM's plus one reduction pass (``<g, g_s>``, ``|g|^2``, ``|g_s|^2``) and
    one write of ``g_v`` and its norm (one read); a reuse step one forward/backward, one reduction (``|g|``), one pass
    adding ``g_v`` and the base step. Memory: ``g_v`` (one copy of the parameters) beside SAM's
    stash; the first gradients are kept (taken out of ``.grad``, no copy) during a SAM step.

    Args:
        rho: SAM radius (0.1, the unofficial code's default).
        k: a SAM step every ``k`` steps (5, as in the paper), the first step being one.
        alpha: weight of the reused component (0.7).
        gv_eps: added to ``|g_v|`` in the reuse ratio (1e-8, as the unofficial code).
        Other arguments as :class:`SAM` (``perturb_filter`` too; ``every`` / ``policy`` do not
        apply: ``k`` is LookSAM's schedule).

    Sharded training (FSDP2): build it on a ``fully_shard``-ed model's parameters (DTensors);
    ``g_v`` is sharded like them. Per SAM step: SAM's norm (one all-reduce of 8 bytes), the three
    sums of ``g_v`` (24 bytes) and ``|g_v|^2`` (8 bytes); per reuse step ``|g|^2`` (8 bytes); no
    host synchronisation. Equals one process training on the whole batch.
    """

    _shardable = True  # FSDP2: the norms and inner product are reduced over the shards (the ops do it)

    def __init__(self, params, base_optimizer: type, rho: float = 0.1, k: int = 5, alpha: float = 0.7, *,
                 gv_eps: float = 1e-8, **kwargs):
        name = type(self).__name__
        for key in ("every", "policy"):
            if kwargs.get(key) not in (None, 1):
                raise ValueError(f"{name}: {key}={kwargs[key]!r} does not apply; LookSAM's schedule is k")
        self.k = C.integer(k, "k", name, lo=1)
        self.alpha = C.number(alpha, "alpha", name)
        self.gv_eps = C.number(gv_eps, "gv_eps", name, lo=0)
        self._gv: dict[torch.Tensor, torch.Tensor] = {}
        self._gv_norm: torch.Tensor | None = None
        self._old_g: dict[torch.Tensor, torch.Tensor] = {}
        self.last_stats: torch.Tensor | None = None
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def _is_sam_step(self, t: int) -> bool:
        return t % self.k == 0

    def _gv_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            v = self._gv.get(p)
            if v is None or v.shape != p.shape or v.device != p.device or v.dtype != p.dtype:
                v = self._gv[p] = torch.zeros_like(p)
            out.append(v)
        return out

    def _norm_state(self, p: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        if self._gv_norm is None or self._gv_norm.device != p.device or self._gv_norm.dtype != acc:
            self._gv_norm = torch.zeros((), dtype=acc, device=p.device)
        return self._gv_norm

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> torch.Tensor:
        """SAM's ascent; the first gradients are then taken out of ``.grad`` (kept for ``g_v``),
        so the second backward starts from empty gradients whatever ``zero_grad`` says."""
        _, grads_before, _ = self._collect()
        params_before = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = super().first_step(zero_grad=False, grad_scaler=grad_scaler)
        self._old_g = dict(zip(params_before, grads_before))
        for p in params_before:
            p.grad = None
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """On a SAM step: ``g_v`` from both gradients, then SAM's restore + base step. On a reuse
        step: :meth:`single_pass_step`."""
        if not self._single_pass_now() and self._perturbed is not None:
            now = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p in self._old_g]
            if now:
                self.last_stats = looksam_ops.looksam_gv_(
                    self._gv_for(now), self._norm_state(now[0]), [p.grad for p in now],
                    [self._old_g[p] for p in now], backend=self.backend)
            self._old_g = {}
        super().second_step(zero_grad)

    def _single_pass_update(self, grad_scale, found) -> torch.Tensor | None:
        params, grads, _ = self._collect()
        norm = None
        if params:
            norm = looksam_ops.looksam_combine_(grads, self._gv_for(params), self._norm_state(params[0]),
                                                self.alpha, self.gv_eps, backend=self.backend)
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device, norm.dtype)
        self._base_step(grad_scale, found)
        return norm

    def state_dict(self) -> dict[str, Any]:
        """As :class:`TwoPassOptimizer`, plus ``g_v`` (in parameter order) and ``|g_v|``."""
        sd = super().state_dict()
        order = [p for g in self.param_groups for p in g["params"]]
        sd["saf_kernels"].update(
            gv={i: self._gv[p].clone() for i, p in enumerate(order) if p in self._gv},
            gv_norm=None if self._gv_norm is None else self._gv_norm.clone())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        info = state_dict.get("saf_kernels") or {}
        super().load_state_dict(state_dict)
        order = [p for g in self.param_groups for p in g["params"]]
        self._gv = {order[int(i)]: v.to(order[int(i)].device, order[int(i)].dtype).clone()
                    for i, v in (info.get("gv") or {}).items()}
        gn = info.get("gv_norm")
        self._gv_norm = None if gn is None else gn.clone().to(order[0].device if order else "cpu")
        self._old_g = {}
