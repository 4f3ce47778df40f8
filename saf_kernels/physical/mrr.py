"""Microring-resonator (MRR) weight banks: layers whose trainable tensor is each ring's control
(heater current, as a resonance detuning), mapped to the weight it applies by the ring's
Lorentzian transmission, with the device's imperfections as explicit, seedable state.

Device model (Xu et al., arXiv 2411.12352, and the paper's code)::

    w = L(x + offset + k * dT),    L(x) = A - 2A / (1 + ((x - x0) / gamma)^2)

``A = 1, x0 = 0, gamma = 0.15`` by default; ``offset`` is a per-ring fabrication error, fixed
for a device instance (``N(0, sigma^2)``, :func:`fabrication_variance`), and ``k * dT`` a thermal
drift, ``k = 0.08`` control units (80 pm) per kelvin, the same for every ring of a layer
(:func:`thermal_drift`). ``L`` maps ``[x0, inf)`` onto ``[-A, A)``; its inverse
``L^-1(w) = x0 + gamma * sqrt((A + w) / (A - w))`` initialises controls from ordinary weights and
deploys a network trained on weights (:func:`deploy_weights`), as the paper's BP baseline.

The curve is steepest at ``x = x0 +- gamma / sqrt(3)`` (``|dL/dx| = 3 sqrt(3) A / (4 gamma)``,
about 8.7 for the defaults) and flat at the bottom of the dip (``x = x0``, ``w = -A``) and far
from it (``w -> A``): a drift of ``dT = -2 K`` (``-0.16``) moves a ring at ``x = gamma``
(``w = 0``) to ``w = -0.99``. Sharpness-aware training of the controls moves them towards the
flat parts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ._common import PhysicalLayer, check_generator, pair_of_ints, real, select_layers

#: Thermal drift of a ring's resonance, in control units per kelvin (80 pm/K in the paper).
DRIFT_PER_KELVIN = 0.08


@dataclass(frozen=True)
class Lorentzian:
    """A ring's transmission as a function of its control: ``L(x) = A - 2A / (1 + u^2)``,
    ``u = (x - x0) / gamma``. Values in ``[-A, A)``; minimum ``-A`` at ``x0``."""

    amplitude: float = 1.0
    x0: float = 0.0
    gamma: float = 0.15

    def __post_init__(self):
        real("amplitude", self.amplitude, "Lorentzian", positive=True)
        real("x0", self.x0, "Lorentzian")
        real("gamma", self.gamma, "Lorentzian", positive=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = (x - self.x0) / self.gamma
        return self.amplitude - 2.0 * self.amplitude / (1.0 + u * u)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``dL/dx = 4 A u / (gamma (1 + u^2)^2)``."""
        u = (x - self.x0) / self.gamma
        return 4.0 * self.amplitude * u / (self.gamma * (1.0 + u * u) ** 2)

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        """The control ``x >= x0`` with ``L(x) = w``; ``w`` must lie in ``[-A, A)`` (``ValueError``
        with the offending range otherwise: clamp first, e.g. to ``+-0.999 A`` as the paper's BP)."""
        w = torch.as_tensor(w)
        a = self.amplitude
        bad = ~torch.isfinite(w) | (w < -a) | (w >= a)
        if bool(bad.any()):
            raise ValueError(
                f"Lorentzian.inverse: weights must lie in [-{a}, {a}) (the ring's range), got values "
                f"in [{w.min().item()!r}, {w.max().item()!r}] ({int(bad.sum())} outside); clamp them first"
            )
        return self.x0 + self.gamma * torch.sqrt((a + w) / (a - w))


class MRRLayer(PhysicalLayer):
    """Shared state of the MRR layers: ``control`` (trainable), and two buffers outside
    ``state_dict()``: ``offset`` (the per-ring fabrication error, zeros until set) and
    ``delta_t`` (the temperature change in kelvin, a 0-d tensor). ``weight`` is
    ``transfer(control + offset + drift_per_kelvin * delta_t)``, differentiable in ``control``.
    """

    def _init_layer(self, shape, fan_in: int, bias: bool, weight, transfer, drift_per_kelvin, factory) -> None:
        """Controls at ``L^-1`` of ``weight`` or of torch's default initialisation
        (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as nn.Linear / nn.Conv2d), a digital bias."""
        fn = type(self).__name__
        _checks.flag(bias, "bias", fn)
        w = torch.empty(shape, **factory)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if weight is not None:
            w = torch.as_tensor(weight).to(w)
            if w.shape != torch.Size(shape):
                raise ValueError(f"{fn}: weight has shape {tuple(w.shape)}, the layer's {tuple(shape)}")
        self._init_device(w, transfer, drift_per_kelvin)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        self.bias = nn.Parameter(torch.empty(shape[0], **factory).uniform_(-bound, bound)) if bias else None

    def _load_from(self, module: nn.Module, clamp: float | None):
        """Controls that apply ``module``'s weights (clamped) on the ideal device, and its bias."""
        self.set_weights(module.weight, clamp=clamp)
        if module.bias is not None:
            with torch.no_grad():
                self.bias.copy_(module.bias)
        return self

    def _init_device(self, weight: torch.Tensor, transfer: Lorentzian | None, drift_per_kelvin: float):
        self.transfer = transfer if transfer is not None else Lorentzian()
        if not isinstance(self.transfer, Lorentzian):
            raise TypeError(f"{type(self).__name__}: transfer must be a Lorentzian, got {transfer!r}")
        self.drift_per_kelvin = real("drift_per_kelvin", drift_per_kelvin, type(self).__name__)
        self.control = nn.Parameter(self.transfer.inverse(weight.detach()))
        self.register_buffer("offset", torch.zeros_like(self.control), persistent=False)
        self.register_buffer(
            "delta_t", torch.zeros((), dtype=self.control.dtype, device=self.control.device), persistent=False
        )

    def effective_control(self) -> torch.Tensor:
        """What the ring sees: ``control + offset + drift_per_kelvin * delta_t``."""
        return self.control + self.offset + self.drift_per_kelvin * self.delta_t

    @property
    def weight(self) -> torch.Tensor:
        """The weights the device applies now (imperfections included)."""
        return self.transfer(self.effective_control())

    @torch.no_grad()
    def set_weights(self, weight: torch.Tensor, clamp: float | None = None) -> None:
        """Set the controls so that the ideal device applies ``weight``: ``control = L^-1(w)``.
        ``clamp``: clamp ``w`` to ``[-clamp, clamp]`` first (e.g. 0.999, the paper's BP)."""
        w = torch.as_tensor(weight).to(self.control)
        if w.shape != self.control.shape:
            raise ValueError(
                f"{type(self).__name__}.set_weights: weight has shape {tuple(w.shape)}, the layer's "
                f"controls {tuple(self.control.shape)}"
            )
        if clamp is not None:
            c = _clamp(clamp, self.transfer, f"{type(self).__name__}.set_weights")
            w = w.clamp(-c, c)
        self.control.copy_(self.transfer.inverse(w))

    @torch.no_grad()
    def set_drift(self, delta_t: float) -> None:
        """Temperature change of this layer's rings, in kelvin (0 = as trained)."""
        self.delta_t.fill_(real("delta_t", delta_t, f"{type(self).__name__}.set_drift"))

    @torch.no_grad()
    def sample_offsets(self, sigma: float, generator: torch.Generator | None = None) -> None:
        """Draw a new device: per-ring offsets ``~ N(0, sigma^2)`` (drawn on the CPU from
        ``generator``, so a seed gives the same device on every machine)."""
        sigma = real("sigma", sigma, f"{type(self).__name__}.sample_offsets", nonneg=True)
        generator = check_generator(generator, f"{type(self).__name__}.sample_offsets")
        noise = torch.randn(self.offset.shape, generator=generator, dtype=torch.float64)
        self.offset.copy_((sigma * noise).to(self.offset))

    def _device_repr(self) -> str:
        t = self.transfer
        return f"L(A={t.amplitude}, x0={t.x0}, gamma={t.gamma}), drift={self.drift_per_kelvin}/K"


class MRRLinear(MRRLayer):
    """``y = x L(control + offset + k dT)^T + bias``: a fully connected layer on an MRR weight
    bank, one ring per weight; the bias is digital.

    The controls start at ``L^-1`` of ``nn.Linear``'s default initialisation (the paper's SAT
    start: ``x`` near ``gamma``, the steep part of the curve), or at ``L^-1(weight)`` if
    ``weight`` is given (see also :meth:`from_linear`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, transfer: Lorentzian | None = None,
                 drift_per_kelvin: float = DRIFT_PER_KELVIN, weight: torch.Tensor | None = None, device=None,
                 dtype=None):
        super().__init__()
        self.in_features = _checks.integer(in_features, "in_features", "MRRLinear", lo=1)
        self.out_features = _checks.integer(out_features, "out_features", "MRRLinear", lo=1)
        self._init_layer((self.out_features, self.in_features), self.in_features, bias, weight, transfer,
                         drift_per_kelvin, {"device": device, "dtype": dtype})

    @classmethod
    def from_linear(cls, linear: nn.Linear, clamp: float | None = 0.999, **kw) -> MRRLinear:
        """The MRR layer that applies ``linear``'s weights (clamped to ``+-clamp``) on the ideal
        device, with its bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        return layer._load_from(linear, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._device_repr()}"
        )


class MRRConv2d(MRRLayer):
    """``conv2d(x, L(control + offset + k dT), bias)``: a convolution whose kernel weights are
    rings of an MRR bank (zero padding; stride, padding, dilation, groups as ``nn.Conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, transfer: Lorentzian | None = None,
                 drift_per_kelvin: float = DRIFT_PER_KELVIN, weight: torch.Tensor | None = None, device=None,
                 dtype=None):
        super().__init__()
        fn = "MRRConv2d"
        self.in_channels = _checks.integer(in_channels, "in_channels", fn, lo=1)
        self.out_channels = _checks.integer(out_channels, "out_channels", fn, lo=1)
        self.groups = _checks.integer(groups, "groups", fn, lo=1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{fn}: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.kernel_size = pair_of_ints(kernel_size, "kernel_size", fn)
        self.stride, self.dilation = pair_of_ints(stride, "stride", fn), pair_of_ints(dilation, "dilation", fn)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{fn}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
            self.padding = padding
        else:
            self.padding = pair_of_ints(padding, "padding", fn, lo=0)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        fan_in = shape[1] * shape[2] * shape[3]
        self._init_layer(shape, fan_in, bias, weight, transfer, drift_per_kelvin, {"device": device, "dtype": dtype})

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, clamp: float | None = 0.999, **kw) -> MRRConv2d:
        """The MRR convolution that applies ``conv``'s weights (clamped) on the ideal device."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"MRRConv2d.from_conv: padding_mode must be 'zeros', got {conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                    dtype=conv.weight.dtype, **kw)
        return layer._load_from(conv, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, {self._device_repr()}"
        )


# ---------------------------------------------------------------------------------------------
# Whole-model device state
# ---------------------------------------------------------------------------------------------


def _clamp(clamp, transfer: Lorentzian, fn: str) -> float:
    """A clamp inside the ring's range ``(0, A)``: the inverse is defined on ``[-A, A)``."""
    c = real("clamp", clamp, fn, positive=True)
    if c >= transfer.amplitude:
        raise ValueError(f"{fn}: clamp must be below the ring's amplitude {transfer.amplitude}, got {clamp!r}")
    return c


@contextlib.contextmanager
def thermal_drift(model: nn.Module, delta_t: float, layers=None) -> Iterator[list[MRRLayer]]:
    """Inside the block the chosen MRR layers (default: all) are ``delta_t`` kelvin warmer
    (``control + 0.08 * delta_t`` per ring); their previous drift is restored on exit.
    ``layers``: names (as in ``model.named_modules()``) or modules, e.g. ``["fc2", "fc3"]``
    (the layers the paper drifts). Yields the layers."""
    dt = real("delta_t", delta_t, "thermal_drift")
    mods = select_layers(model, MRRLayer, layers, "thermal_drift", "rings to drift")
    saved = [m.delta_t.clone() for m in mods]
    try:
        for m in mods:
            m.set_drift(dt)
        yield mods
    finally:
        with torch.no_grad():
            for m, s in zip(mods, saved):
                m.delta_t.copy_(s)


@contextlib.contextmanager
def fabrication_variance(
    model: nn.Module, sigma: float, *, seed: int | None = None, generator: torch.Generator | None = None,
    layers=None,
) -> Iterator[list[MRRLayer]]:
    """Inside the block the chosen MRR layers (default: all) are one random device: per-ring
    resonance offsets ``~ N(0, sigma^2)`` (control units), drawn from ``generator`` or a fresh
    one seeded with ``seed``; the previous offsets are restored on exit. Yields the layers."""
    sigma = real("sigma", sigma, "fabrication_variance", nonneg=True)
    if seed is not None:
        _checks.integer(seed, "seed", "fabrication_variance")
    check_generator(generator, "fabrication_variance")
    mods = select_layers(model, MRRLayer, layers, "fabrication_variance", "rings to offset")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    saved = [m.offset.clone() for m in mods]
    try:
        for m in mods:
            m.sample_offsets(sigma, generator)
        yield mods
    finally:
        with torch.no_grad():
            for m, s in zip(mods, saved):
                m.offset.copy_(s)


def deploy_weights(physical: nn.Module, trained: nn.Module, clamp: float | None = 0.999) -> nn.Module:
    """Load a network trained on *weights* into its physical twin: for every MRR layer ``name``
    of ``physical``, ``name.control = L^-1(clamp(trained's name.weight))``; every other entry of
    ``trained.state_dict()`` (biases, BatchNorm) is copied as it is. The two must have the same
    architecture (``load_state_dict(strict=True)`` says what differs). Returns ``physical``."""
    _checks.module(physical, "physical", "deploy_weights")
    sd = dict(_checks.module(trained, "trained", "deploy_weights").state_dict())
    for name, mod in physical.named_modules():
        if not isinstance(mod, MRRLayer):
            continue
        key = f"{name}.weight" if name else "weight"
        if key not in sd:
            raise ValueError(f"deploy_weights: the trained model has no {key!r} for MRR layer {name!r}")
        w = sd.pop(key).to(mod.control)
        if clamp is not None:
            c = _clamp(clamp, mod.transfer, "deploy_weights")
            w = w.clamp(-c, c)
        sd[f"{name}.control" if name else "control"] = mod.transfer.inverse(w)
    physical.load_state_dict(sd, strict=True)
    return physical
