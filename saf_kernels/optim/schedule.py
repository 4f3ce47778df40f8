"""When to take SAM's second pass, and which tensors to perturb: the schedule (``every=k``, the
AE-SAM adaptive policy) and the parameter filter every two-pass optimizer accepts
(:class:`saf_kernels.optim.base.TwoPassOptimizer`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import _checks as C

#: Module types whose parameters :func:`norm_layer_filter` selects.
NORM_LAYERS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def norm_layer_filter(model: nn.Module) -> Callable[[torch.Tensor], bool]:
    """A ``perturb_filter`` selecting the parameters of the normalisation layers of ``model``
    (BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm), as SAM-ON
    (Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
    NeurIPS 2023) does::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1,
                  perturb_filter=norm_layer_filter(model))
    """
    C.module(model, "model", "norm_layer_filter")
    ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    if not ids:
        raise ValueError(f"norm_layer_filter: model has no normalisation layer with parameters "
                         f"({type(model).__name__})")

    def is_norm_param(p: torch.Tensor) -> bool:
        return id(p) in ids

    return is_norm_param


class AdaptivePolicy:
    """AE-SAM's policy (Jiang, Yang, Zhang, Kwok, "An Adaptive Policy to Employ Sharpness-Aware
    Minimization", ICLR 2023): take SAM's two passes when the squared gradient norm is large
    against its running statistics, the base step otherwise::

        mu_t    = delta * mu_{t-1}    + (1 - delta) * |g_t|^2
        var_t   = delta * var_{t-1}   + (1 - delta) * (|g_t|^2 - mu_t)^2
        SAM at step t+1  iff  |g_t|^2 >= mu_t + c_t * sqrt(var_t)
        c_t     = c_start + (c_end - c_start) * min(t / total_steps, 1)   (c_start without total_steps)

    **One step of lag, by design**: the paper decides step t from |g_t|^2 of that very step;
    that needs the device's value on the host before the second pass, a synchronisation. Here
    step t+1 is decided from step t's statistic, copied to the host asynchronously (a pinned
    buffer and a CUDA event; if the copy has not landed when asked, the last landed decision
    is used). The first step is a SAM step. The statistic is the norm of the first (clean)
    gradient of every step, unscaled under AMP; under DDP the mean over the replicas (so that
    all take the same decision).

    Defaults: ``delta = 0.9``, ``c`` from -1 to 1 (our reading of the paper's choice; AE-SAM's
    code was not available to check against): early training takes SAM on most steps, late
    training on few.
    """

    def __init__(self, delta: float = 0.9, c_start: float = -1.0, c_end: float = 1.0,
                 total_steps: int | None = None):
        fn = "AdaptivePolicy"
        self.delta = C.number(delta, "delta", fn, lo=0, hi=1, hi_open=True)
        self.c_start = C.number(c_start, "c_start", fn)
        self.c_end = C.number(c_end, "c_end", fn)
        self.total_steps = None if total_steps is None else C.integer(total_steps, "total_steps", fn, lo=1)
        self._stats: torch.Tensor | None = None  # [mu, var, count] on the device, float64
        self._host: torch.Tensor | None = None
        self._event = None
        self._decided_for = 0  # the step the landed decision is for
        self._decision = True

    def threshold_c(self, t: int) -> float:
        if self.total_steps is None:
            return self.c_start
        return self.c_start + (self.c_end - self.c_start) * min(t / self.total_steps, 1.0)

    @torch.no_grad()
    def update(self, grad_norm: torch.Tensor, t: int) -> None:
        """Step ``t``'s first-gradient norm (a device tensor): update the statistics on the device
        and start the asynchronous copy of the decision for step ``t + 1``."""
        sq = grad_norm.detach().double().reshape(()) ** 2
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Unsynchronised first passes give each replica its own norm: every replica must
            # take the same decision, so the statistic is the replicas' mean (a collective on
            # one scalar, no host synchronisation).
            sq = sq.clone()
            dist.all_reduce(sq)
            sq = sq / dist.get_world_size()
        dev = sq.device
        if self._stats is None or self._stats.device != dev:
            self._stats = torch.zeros(3, dtype=torch.float64, device=dev)
        mu, var, count = self._stats[0], self._stats[1], self._stats[2]
        first = count == 0
        new_mu = torch.where(first, sq, self.delta * mu + (1 - self.delta) * sq)
        new_var = torch.where(first, torch.zeros_like(sq), self.delta * var + (1 - self.delta) * (sq - new_mu) ** 2)
        ok = torch.isfinite(sq)  # an overflowed step (AMP) leaves the statistics alone
        self._stats.copy_(torch.stack([torch.where(ok, new_mu, mu), torch.where(ok, new_var, var),
                                       torch.where(ok, count + 1, count)]))
        flag = (sq >= new_mu + self.threshold_c(t) * new_var.sqrt()) | ~ok
        if self._host is None:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=dev.type == "cuda")
        self._host.copy_(flag, non_blocking=dev.type == "cuda")
        self._event = None
        if dev.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._decided_for = t + 1

    def decide(self, t: int) -> bool:
        """Whether step ``t`` takes SAM's two passes (host-side, no synchronisation)."""
        if self._host is not None and self._decided_for == t and (self._event is None or self._event.query()):
            self._decision = bool(self._host)
        return self._decision

    def state_dict(self) -> dict[str, Any]:
        return {"stats": None if self._stats is None else self._stats.clone(),
                "decision": self.decide(self._decided_for), "decided_for": self._decided_for}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._stats = None if sd.get("stats") is None else sd["stats"].clone()
        self._decision = bool(sd.get("decision", True))
        self._decided_for = int(sd.get("decided_for", 0))
        self._host, self._event = None, None

    def __repr__(self) -> str:
        return (f"AdaptivePolicy(delta={self.delta}, c_start={self.c_start}, c_end={self.c_end}, "
                f"total_steps={self.total_steps})")


def check_schedule(opt, every, policy, perturb_filter, schedulable: bool):
    """The checks of the schedule arguments of a two-pass optimizer ``opt`` (after its groups exist)."""
    fn = type(opt).__name__
    every = C.integer(every, "every", fn, lo=1)
    if policy is not None and not isinstance(policy, AdaptivePolicy):
        raise TypeError(f"{fn}: policy must be a saf_kernels.optim.AdaptivePolicy or None, got {policy!r}")
    if policy is not None and every != 1:
        raise ValueError(f"{fn}: give either every={every} or a policy, not both")
    if not schedulable and (every != 1 or policy is not None):
        raise ValueError(f"{fn} runs its own step logic and does not take a schedule (every={every}, "
                         f"policy={policy!r}); SAM, ASAM, GSAM and LookSAM do")
    perturb_filter = C.function(perturb_filter, "perturb_filter", fn, " (param -> bool)", optional=True)
    if perturb_filter is not None:
        params = [p for g in opt.param_groups for p in g["params"]]
        if not any(perturb_filter(p) for p in params):
            raise ValueError(f"{fn}: perturb_filter selects none of the {len(params)} parameters (an empty filter "
                             "would make every step a plain step at twice the cost)")
    return every, policy, perturb_filter


def selected(opt, p: torch.Tensor) -> bool:
    """Whether ``opt.perturb_filter`` selects ``p`` (cached per tensor)."""
    hit = opt._filter_hits.get(id(p))
    if hit is None:
        hit = opt._filter_hits[id(p)] = bool(opt.perturb_filter(p))
    return hit


def grad_norm(grads: list[torch.Tensor], grad_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """The global L2 norm of ``grads`` on their device (unscaled by ``grad_scale``), no sync."""
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    dev = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(dev, torch.float64) for n in norms]))
    if grad_scale is not None:
        total = total / grad_scale.to(dev, torch.float64)
    return total


__all__ = ["AdaptivePolicy", "NORM_LAYERS", "norm_layer_filter"]
