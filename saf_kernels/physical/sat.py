"""SAT: sharpness-aware training of a physical network's *controls*, on the library's own
two-pass optimizers.

Nothing new is needed in the optimizers: a physical layer's ``control`` is an ordinary
parameter, so ``SAM`` / ``ASAM`` over ``model.parameters()`` perturb the controls through the
device model (the loss sees ``L(control + e)``), which is the whole method. The paper's setting
is ``SAM(params, torch.optim.Adam, rho=0.5, adaptive=True, lr=0.01)`` (davda54's "adaptive"
rule, ``e = rho x^2 g / ||x g||``, on every parameter); :func:`sat_param_groups` puts the controls
and the digital parameters (biases, BatchNorm) in separate groups when they should get a
different ``rho`` (``digital_rho=0`` perturbs the controls only).

BatchNorm: the paper's code lets both passes update the running statistics; here
``second_pass`` (``bn_first_pass_only=True``, the optimizers' default) keeps those of the clean
first pass only, google-research/sam's choice: the perturbed pass describes a network that is
never deployed. The model-free probe runs with frozen statistics too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .. import _checks
from ..optim.base import TwoPassOptimizer
from ._common import PhysicalLayer, real
from .model_free import ModelFreeAscent


def physical_layers(model: nn.Module, fn: str = "physical_layers") -> list[PhysicalLayer]:
    return [m for m in _checks.module(model, "model", fn).modules() if isinstance(m, PhysicalLayer)]


def control_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The controls of every physical layer of ``model`` (MRR rings, free-space pixels)."""
    return [m.control for m in physical_layers(model, "control_parameters") if m.control.requires_grad]


def digital_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other trainable parameter (biases, BatchNorm, ordinary layers)."""
    _checks.module(model, "model", "digital_parameters")
    controls = {id(p) for p in control_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in controls]


def sat_param_groups(model: nn.Module, digital_rho: float | None = None) -> list[dict]:
    """Parameter groups for a two-pass optimizer: the controls, then the digital parameters,
    with their own ``rho`` if ``digital_rho`` is given (``0``: not perturbed; their gradients
    still count in SAM's global gradient norm, which is over every tensor with a gradient)."""
    _checks.module(model, "model", "sat_param_groups")
    controls = control_parameters(model)
    if not controls:
        raise ValueError("sat_param_groups: the model has no physical layers with trainable controls")
    groups = [{"params": controls}]
    digital = digital_parameters(model)
    if digital:
        g = {"params": digital}
        if digital_rho is not None:
            g["rho"] = real("digital_rho", digital_rho, "sat_param_groups", nonneg=True)
        groups.append(g)
    return groups


@torch.no_grad()
def constrain_(model: nn.Module) -> None:
    """Project every physical layer's controls into its device's range (free-space pixels to
    ``[-max_weight, max_weight]``; MRR controls are unconstrained, as in the paper's SAT)."""
    for m in physical_layers(model, "constrain_"):
        m.constrain_()


def sat_step(
    optimizer: TwoPassOptimizer,
    loss_fn: Callable[[], torch.Tensor],
    *,
    model: nn.Module | None = None,
    model_free: ModelFreeAscent | None = None,
) -> torch.Tensor:
    """One SAT step: first pass, perturbation of the controls (and of the non-differentiable
    knobs by ``model_free``'s finite-difference step), second pass, restore, base step.

    Args:
        optimizer: a ``saf_kernels.optim`` two-pass optimizer (``SAM``, ``ASAM``, ...) over the
            model's parameters.
        loss_fn: computes the minibatch loss (the forward), e.g. ``lambda: F.cross_entropy(model(x), y)``.
            Called twice (three times with ``model_free``).
        model: for the optimizer's pass contexts (BatchNorm statistics from the first pass
            only, DDP's unsynchronised first pass) and the probe's frozen statistics; defaults
            to ``optimizer.model``.
        model_free: a :class:`ModelFreeAscent` over knobs the forward reads.

    Returns the first pass's loss (a device tensor, detached; nothing synchronises).
    """
    if not isinstance(optimizer, TwoPassOptimizer):
        raise TypeError(
            f"sat_step: optimizer must be a saf_kernels.optim two-pass optimizer (SAM, ASAM, ...), "
            f"got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"sat_step: loss_fn must be a callable returning the loss, got {type(loss_fn).__name__}")
    _checks.module(model, "model", "sat_step", optional=True)
    if model_free is not None and not isinstance(model_free, ModelFreeAscent):
        raise TypeError(f"sat_step: model_free must be a ModelFreeAscent or None, got {type(model_free).__name__}")
    model = model if model is not None else optimizer.model
    with torch.enable_grad(), optimizer.first_pass(model):
        loss = loss_fn()
        if model_free is not None:
            model_free.probe(loss_fn, loss, model=model)
        loss.backward()
    optimizer.first_step(zero_grad=True)
    adv = model_free.adversarial() if model_free is not None else contextlib.nullcontext()
    with torch.enable_grad(), optimizer.second_pass(model), adv:
        loss_fn().backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach()
