"""Argument checks and layer selection shared by the physical-network modules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from .. import _checks


class PhysicalLayer(nn.Module):
    """A layer whose trainable tensor ``control`` drives a device (heater currents, SLM pixels),
    mapped to the weights it computes with by a model of that device. Subclasses hold the
    device's imperfections as buffers that are *not* part of ``state_dict()``: they belong to a
    device instance, not to the trained network, so that loading a checkpoint onto another
    (simulated) device keeps that device's offsets.

    ``constrain_()`` projects the controls back into what the device can be set to (a no-op
    unless a subclass says otherwise); call it after an optimizer step.
    """

    control: nn.Parameter

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def constrain_(self) -> None:
        """Project the controls into the device's range in place (default: nothing to do)."""


def real(name: str, value, fn: str, *, positive: bool = False, nonneg: bool = False) -> float:
    """``value`` as a finite float; ``ValueError`` naming ``name`` and the value otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")
    return float(value)


def check_generator(value, fn: str):
    """``value`` if it is a ``torch.Generator`` or None; ``TypeError`` otherwise."""
    if value is None or isinstance(value, torch.Generator):
        return value
    raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(value).__name__}")


def pair_of_ints(v, name: str, fn: str, *, lo: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (not bools), each ``>= lo``, as a pair."""
    vals = (v, v) if isinstance(v, numbers.Integral) else v
    try:
        a, b = vals
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}") from None
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in (a, b)):
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
    if a < lo or b < lo:
        raise ValueError(f"{fn}: {name} must be {'positive' if lo == 1 else f'>= {lo}'}, got {v!r}")
    return int(a), int(b)


def sweep_values(values: Iterable, name: str, fn: str, **kw) -> list[float]:
    """A non-empty list of finite sweep values."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{fn}: {name} must be a sequence of numbers, got {values!r}")
    out = [real(f"{name}[{i}]", v, fn, **kw) for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{fn}: {name} is empty: give at least one value to sweep")
    return out


def select_layers(model: nn.Module, kind: type, layers, fn: str, what: str) -> list[nn.Module]:
    """The layers of ``kind`` that a perturbation applies to.

    ``layers=None``: every ``kind`` layer of ``model`` (at least one must exist). Otherwise an
    iterable of module names (as in ``model.named_modules()``) or modules; each must be a
    ``kind`` layer of ``model``, else ``ValueError`` saying which one and why (``what``
    describes what the perturbation needs, e.g. "tiles to misalign").
    """
    _checks.module(model, "model", fn)
    named = dict(model.named_modules())
    if layers is None:
        out = [m for m in named.values() if isinstance(m, kind)]
        if not out:
            raise ValueError(f"{fn}: the model has no {kind.__name__} layers ({what})")
        return out
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): n for n, m in named.items()}
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"{fn}: the model has no layer named {item!r}")
            name, mod = item, named[item]
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"{fn}: layer {type(item).__name__} is not part of the model")
            name, mod = by_id[id(item)], item
        else:
            raise ValueError(f"{fn}: layers must hold module names or modules, got {item!r}")
        if not isinstance(mod, kind):
            raise ValueError(
                f"{fn}: layer {name!r} ({type(mod).__name__}) has no {what}; this applies to "
                f"{kind.__name__} layers"
            )
        out.append(mod)
    if not out:
        raise ValueError(f"{fn}: layers is empty: name at least one {kind.__name__} layer")
    return out
