"""Sharpness measures of a trained model: the top Hessian eigenvalue and the worst loss in a
rho-ball, the two quantities the sharpness-aware papers use to say a minimum is flat.

Both take a model, a loss function ``loss_fn(outputs, targets) -> scalar`` (mean over the batch)
and an iterable of ``(inputs, targets)`` batches; the loss they study is the average of the batch
losses over the batches given (pass the same batches to compare models). The model is evaluated
in ``eval()`` mode by default, so that BatchNorm uses its running statistics and the loss is a
deterministic function of the weights; its mode and weights are restored afterwards.

Example::

    lam = hessian_top_eigenvalue(model, F.cross_entropy, loader, max_batches=4)
    inc = max_loss_increase(model, F.cross_entropy, loader, rho=0.05, max_batches=4)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

import torch

from . import _checks as C

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EigenResult:
    """Top Hessian eigenvalue by power iteration."""

    eigenvalue: float
    iterations: int
    converged: bool
    history: list[float]


@dataclass
class BallResult:
    """Largest loss increase found within an L2 ball of radius rho (a lower bound of the true max)."""

    increase: float
    base_loss: float
    perturbed_loss: float
    rho: float
    steps: int


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _batches(data: Iterable, max_batches: int | None, device: torch.device) -> list:
    it = data if max_batches is None else itertools.islice(data, max_batches)
    out = [(x.to(device), y.to(device)) for x, y in it]
    if not out:
        raise ValueError("saf_kernels.sharpness: the data iterable yielded no batches")
    return out


@contextlib.contextmanager
def _mode(model: torch.nn.Module, train: bool):
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


def _check_common(fn, model, loss_fn, max_batches, train_mode, seed):
    fn = f"saf_kernels.sharpness.{fn}"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    C.function(loss_fn, "loss_fn", fn, " (outputs, targets -> loss)")
    if max_batches is not None:
        C.integer(max_batches, "max_batches", fn, lo=1)
    C.flag(train_mode, "train_mode", fn)
    C.integer(seed, "seed", fn)
    if not _params(model):
        raise ValueError(f"{fn}: the model has no trainable parameters")
    return fn


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = torch.sqrt(_dot(v, v))
    return [x / n for x in v]


def hessian_top_eigenvalue(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    max_batches: int | None = None,
    train_mode: bool = False,
    seed: int = 0,
) -> EigenResult:
    """Largest-magnitude eigenvalue of the Hessian of the loss w.r.t. the trainable parameters.

    Power iteration on Hessian-vector products (double backward), the loss being the mean of
    the batch losses over the batches of ``data`` (at most ``max_batches``). Stops when the
    relative change of the Rayleigh quotient falls below ``tol`` or after ``iters`` iterations.
    At a minimum the Hessian is (near) positive semi-definite, so this is the top eigenvalue
    the papers report.
    """
    fn = _check_common("hessian_top_eigenvalue", model, loss_fn, max_batches, train_mode, seed)
    C.integer(iters, "iters", fn, lo=1)
    tol = C.number(tol, "tol", fn, lo=0)
    params = _params(model)
    device = params[0].device
    batches = _batches(data, max_batches, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = _normalize([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in params])

    def hvp(vec):
        out = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(_dot(grads, vec), params)
            for o, h in zip(out, hv):
                o.add_(h.detach(), alpha=1.0 / len(batches))
        return out

    history: list[float] = []
    converged = False
    with _mode(model, train_mode):
        for _ in range(iters):
            hv = hvp(v)
            lam = _dot(hv, v).item()
            history.append(lam)
            norm = torch.sqrt(_dot(hv, hv))
            if norm.item() == 0.0:
                converged = True
                break
            v = [h / norm for h in hv]
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * max(abs(history[-1]), 1e-12):
                converged = True
                break
    return EigenResult(history[-1], len(history), converged, history)


def _mean_loss(model, loss_fn, batches) -> float:
    with torch.no_grad():
        return sum(loss_fn(model(x), y).item() for x, y in batches) / len(batches)


def max_loss_increase(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    *,
    rho: float = 0.05,
    steps: int = 10,
    max_batches: int | None = None,
    train_mode: bool = False,
    seed: int = 0,
) -> BallResult:
    """``max_{||e|| <= rho} L(w + e) - L(w)`` by projected normalised gradient ascent.

    Starts from a random direction of norm ``rho / 10`` (at an exact minimum the gradient is
    zero), takes ``steps`` ascent steps of length ``2 rho / steps`` along the normalised
    gradient, projecting back onto the ball after each, and returns the largest increase seen
    (a lower bound of the true maximum; more steps tighten it). The weights are restored
    bit for bit afterwards.
    """
    fn = _check_common("max_loss_increase", model, loss_fn, max_batches, train_mode, seed)
    rho = C.number(rho, "rho", fn, lo=0, lo_open=True)
    C.integer(steps, "steps", fn, lo=1)
    params = _params(model)
    device = params[0].device
    batches = _batches(data, max_batches, device)
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    e = _normalize([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in params])
    e = [x * (rho / 10) for x in e]
    step = 2 * rho / steps
    with _mode(model, train_mode):
        base = _mean_loss(model, loss_fn, batches)
        best = base
        try:
            for _ in range(steps):
                with torch.no_grad():
                    for p, s, d in zip(params, saved, e):
                        p.copy_(s + d)
                grads = [torch.zeros_like(p) for p in params]
                for x, y in batches:
                    g = torch.autograd.grad(loss_fn(model(x), y), params)
                    for acc, gi in zip(grads, g):
                        acc.add_(gi, alpha=1.0 / len(batches))
                gnorm = torch.sqrt(_dot(grads, grads))
                if gnorm.item() == 0.0:
                    break
                e = [d + step * g / gnorm for d, g in zip(e, grads)]
                enorm = torch.sqrt(_dot(e, e))
                if enorm.item() > rho:
                    e = [d * (rho / enorm) for d in e]
                with torch.no_grad():
                    for p, s, d in zip(params, saved, e):
                        p.copy_(s + d)
                best = max(best, _mean_loss(model, loss_fn, batches))
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return BallResult(best - base, base, best, rho, steps)
