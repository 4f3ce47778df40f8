"""Robustness of a trained physical network: accuracy under a sweep of a device perturbation
(thermal drift, fabrication variance over random devices, misalignment) and the top Hessian
eigenvalue of the loss with respect to the controls.

``data`` is an iterable of ``(inputs, targets)`` batches (a list, or a DataLoader that can be
iterated more than once). By default the model is evaluated in ``eval()`` mode: BatchNorm uses
its running statistics, as a deployed network would. ``train_mode=True`` normalises with each
batch's own statistics instead (what the paper's notebooks do, since they never call
``eval()``); the running statistics are left untouched either way. Accuracies are in percent.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .. import _checks, sharpness
from ..optim.utils import frozen_bn_stats, no_grad_for
from ._common import real, sweep_values
from .freespace import KNOBS, misalignment
from .mrr import fabrication_variance, thermal_drift
from .sat import control_parameters, digital_parameters


def _batches(data: Iterable, fn: str) -> Iterable:
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError(f"{fn}: data holds no batches")
    return data


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable, *, train_mode: bool = False) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``data``; one host synchronisation at the end."""
    _checks.module(model, "model", "accuracy")
    _checks.flag(train_mode, "train_mode", "accuracy")
    correct, total = None, 0
    was = model.training
    model.train(train_mode)
    try:
        with frozen_bn_stats(model):
            for x, y in _batches(data, "accuracy"):
                hit = (model(x).argmax(dim=-1) == y).sum()
                correct = hit if correct is None else correct + hit
                total += y.numel()
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("accuracy: data holds no samples")
    return 100.0 * correct.item() / total


def sweep(
    model: nn.Module,
    data: Iterable,
    values: Iterable,
    perturb: Callable[[float], contextlib.AbstractContextManager],
    *,
    train_mode: bool = False,
    name: str = "values",
) -> dict[float, float]:
    """``{v: accuracy under perturb(v)}`` for every value; ``perturb(v)`` is a context manager
    that changes the device and restores it on exit (e.g. ``lambda d: thermal_drift(model, d)``)."""
    vals = sweep_values(values, name, "sweep")
    _checks.module(model, "model", "sweep")
    _checks.flag(train_mode, "train_mode", "sweep")
    if not callable(perturb):
        raise TypeError(f"sweep: perturb must be a callable returning a context manager, got {type(perturb).__name__}")
    out = {}
    for v in vals:
        with perturb(v):
            out[v] = accuracy(model, data, train_mode=train_mode)
    return out


def drift_sweep(model, data, delta_ts, *, layers=None, train_mode: bool = False) -> dict[float, float]:
    """Accuracy vs temperature change (kelvin) of the chosen MRR layers (default: all)."""
    vals = sweep_values(delta_ts, "delta_ts", "drift_sweep")
    return sweep(model, data, vals, lambda d: thermal_drift(model, d, layers=layers), train_mode=train_mode)


def fabrication_sweep(
    model, data, sigmas, *, devices: int = 10, seed: int = 0, layers=None, train_mode: bool = False
) -> dict[float, dict]:
    """Accuracy on ``devices`` random devices per fabrication sigma (per-ring offsets
    ``N(0, sigma^2)`` on the chosen MRR layers): ``{sigma: {"mean", "std", "min", "max", "accs"}}``
    (``std``: sample standard deviation over devices). Device ``i`` is drawn from seed
    ``seed + i`` (scaled by sigma), so every sigma and every model sees the same devices."""
    vals = sweep_values(sigmas, "sigmas", "fabrication_sweep", nonneg=True)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"fabrication_sweep: devices must be an int >= 1, got {devices!r}")
    _checks.integer(seed, "seed", "fabrication_sweep")
    out = {}
    for s in vals:
        accs = []
        for i in range(devices):
            with fabrication_variance(model, s, seed=seed + i, layers=layers):
                accs.append(accuracy(model, data, train_mode=train_mode))
        out[s] = {
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs),
            "max": max(accs),
            "accs": accs,
        }
    return out


def misalignment_sweep(
    model, data, values, *, kind: str = "shift_y", layers=None, train_mode: bool = False
) -> dict[float, float]:
    """Accuracy vs one misalignment of the chosen free-space layers (default: all):
    ``kind`` in ``rotation`` (degrees), ``shift_x``, ``shift_y`` (pixels), ``scale``."""
    if kind not in KNOBS:
        raise ValueError(f"misalignment_sweep: kind must be one of {KNOBS}, got {kind!r}")
    vals = sweep_values(values, "values", "misalignment_sweep", positive=(kind == "scale"))
    return sweep(model, data, vals, lambda v: misalignment(model, layers=layers, **{kind: v}),
                 train_mode=train_mode)


def control_hessian_top_eigenvalue(
    model: nn.Module, loss_fn, data: Iterable, **kwargs
) -> sharpness.EigenResult:
    """Top eigenvalue of the Hessian of the loss with respect to the *controls* only (the
    digital parameters held fixed), by :func:`saf_kernels.sharpness.hessian_top_eigenvalue`
    (power iteration on Hessian-vector products; ``iters``, ``tol``, ``max_batches``,
    ``train_mode``, ``seed`` are passed on). The paper reports it for BP-deployed and SAT
    networks (745.5 vs 1.05 on its LeNet-5)."""
    if "iters" in kwargs:
        real("iters", kwargs["iters"], "control_hessian_top_eigenvalue", positive=True)
    _checks.module(model, "model", "control_hessian_top_eigenvalue")
    if not control_parameters(model):
        raise ValueError("control_hessian_top_eigenvalue: the model has no physical layers with trainable controls")
    with no_grad_for(digital_parameters(model)):
        return sharpness.hessian_top_eigenvalue(model, loss_fn, data, **kwargs)
