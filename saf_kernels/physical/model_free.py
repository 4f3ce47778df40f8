"""The model-free (finite-difference) adversarial step of SAT for physical parameters whose
effect cannot be differentiated: a misalignment angle, shift or scale, or an unknown device.

One SAM step with it (what the paper's free-space and D2NN notebooks do)::

    L0 = L(w; theta0)                         # the first forward, with its graph
    delta ~ U(delta_min, delta_max]           # random, one-sided
    L1 = L(w; theta0 + delta)                 # a no-grad probe on the same batch
    g = (L1 - L0) / delta                     # one-sided finite-difference slope
    theta_adv = theta0 + delta + c * g        # (clipped to bounds, e.g. scale in [1, 1.1])
    L0.backward(); opt.first_step()           # w + e
    L(w + e; theta_adv).backward()            # the second pass sees the adversarial device
    opt.second_step(); theta = theta0         # restore the weights and the device

:class:`ModelFreeAscent` is that piece: ``probe()`` after the first forward, ``adversarial()``
around the second; :func:`saf_kernels.physical.sat_step` strings it into a SAM step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from ..optim.utils import frozen_bn_stats
from ._common import real


@dataclass(eq=False)
class Knob:
    """One non-differentiable physical parameter: ``tensor`` is the 0-d floating tensor the
    forward reads (e.g. ``layer.shift_y`` of a :class:`FreeSpaceLinear`), changed in place.

    Args:
        delta_max, delta_min: the probe step is drawn ``U(delta_min, delta_max]``
            (``0 <= delta_min < delta_max``; the paper uses ``delta_min = 0``).
        c: gain of the ascent, ``theta_adv = theta0 + delta + c * g`` (``c >= 0``).
        bounds: optional ``(lo, hi)`` the adversarial value is clipped to.
        name: for messages and ``last`` records.
    """

    tensor: torch.Tensor
    delta_max: float
    c: float
    delta_min: float = 0.0
    bounds: tuple[float, float] | None = None
    name: str = ""

    def __post_init__(self):
        fn = f"Knob({self.name or 'unnamed'})"
        t = self.tensor
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(
                f"{fn}: tensor must be a one-element floating tensor that the forward reads, got "
                f"{t if not isinstance(t, torch.Tensor) else f'{t.dtype} tensor of shape {tuple(t.shape)}'!r}"
            )
        self.delta_max = real("delta_max", self.delta_max, fn, positive=True)
        self.delta_min = real("delta_min", self.delta_min, fn, nonneg=True)
        if self.delta_min >= self.delta_max:
            raise ValueError(
                f"{fn}: delta_min must be < delta_max, got delta_min={self.delta_min!r}, "
                f"delta_max={self.delta_max!r}"
            )
        self.c = real("c", self.c, fn, nonneg=True)
        if self.bounds is not None:
            try:
                lo, hi = self.bounds
            except (TypeError, ValueError):
                raise ValueError(f"{fn}: bounds must be a pair (lo, hi), got {self.bounds!r}") from None
            lo, hi = real("bounds[0]", lo, fn), real("bounds[1]", hi, fn)
            if lo > hi:
                raise ValueError(f"{fn}: bounds must have lo <= hi, got {self.bounds!r}")
            self.bounds = (lo, hi)


class ModelFreeAscent:
    """Finite-difference adversarial step for :class:`Knob` parameters, inside a SAM step.

    What it estimates: for each probed knob, the slope of the minibatch loss along the knob,
    ``g = (L(theta0 + delta) - L(theta0)) / delta`` with a random ``delta ~ U(delta_min,
    delta_max]``, on the same batch and the same weights (the probe runs without gradient and
    with BatchNorm's running statistics frozen). For a loss twice differentiable in theta,
    ``g = L'(theta0) + (delta / 2) L''(xi)`` for some ``xi`` in ``[theta0, theta0 + delta]``: the
    error is at most ``delta_max / 2 * max |L''|``, a bias towards the secant that is not random
    given delta; the randomness of delta makes ``g`` a random secant slope over
    ``[theta0, theta0 + delta_max]``. Floating-point rounding of the two losses adds about
    ``eps * |L| / delta`` (``eps`` ~ 1e-7 in float32), negligible unless delta is tiny. If the
    loss is *not* smooth in theta (nearest-neighbour resampling makes it piecewise constant),
    ``g`` is 0 whenever both evaluations fall on the same step and ``jump / delta`` otherwise,
    so its spread grows like ``1 / delta`` as ``delta -> 0``: set ``delta_min > 0`` or use a
    smooth resampling there. ``theta_adv = theta0 + delta + c * g`` (clipped to ``bounds``) is
    where the second pass evaluates the loss; the knob is reset to ``theta0`` afterwards.

    Cost: one extra no-grad forward per probed knob and step. ``cycle=True`` (default) probes
    one knob per step, in turn, as the paper's combined run; ``cycle=False`` probes every knob
    each step (one forward each) and moves them all.

    No host synchronisation: delta is drawn on the host from this object's CPU generator
    (``seed``), and ``g`` and ``theta_adv`` stay device tensors. ``last`` holds the latest
    ``{name: (delta, g, theta_adv)}`` (tensors) for logging.
    """

    def __init__(self, knobs: Sequence[Knob] | Knob, *, cycle: bool = True, seed: int = 0):
        if isinstance(knobs, Knob):
            knobs = [knobs]
        knobs = list(knobs)
        if not knobs or not all(isinstance(k, Knob) for k in knobs):
            raise ValueError(f"ModelFreeAscent: knobs must be a non-empty list of Knob, got {knobs!r}")
        for i, k in enumerate(knobs):
            k.name = k.name or f"knob{i}"
        self.knobs = knobs
        self.cycle = _checks.flag(cycle, "cycle", "ModelFreeAscent")
        self.generator = torch.Generator().manual_seed(_checks.integer(seed, "seed", "ModelFreeAscent"))
        self.steps = 0
        self._pending: list[tuple[Knob, torch.Tensor, torch.Tensor]] = []
        self.last: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def _draw(self, k: Knob) -> float:
        u = 1.0 - torch.rand((), generator=self.generator, dtype=torch.float64).item()  # (0, 1]
        return k.delta_min + (k.delta_max - k.delta_min) * u

    @torch.no_grad()
    def probe(self, loss_fn: Callable[[], torch.Tensor], loss0: torch.Tensor, model: nn.Module | None = None) -> None:
        """Estimate the slope of ``loss_fn()`` along the knob(s) of this step and prepare the
        adversarial values. Call after the first forward (``loss0 = loss_fn()`` at theta0);
        ``loss_fn`` is called once per probed knob, without gradient, with BatchNorm running
        statistics of ``model`` (if given) frozen. The knobs are back at theta0 on return."""
        if self._pending:
            raise RuntimeError("ModelFreeAscent.probe() called twice without adversarial()")
        chosen = [self.knobs[self.steps % len(self.knobs)]] if self.cycle else self.knobs
        self.steps += 1
        l0 = loss0.detach()
        bn = frozen_bn_stats(model) if model is not None else contextlib.nullcontext()
        with bn:
            for k in chosen:
                theta0 = k.tensor.detach().clone()
                delta = self._draw(k)
                try:
                    k.tensor.add_(delta)
                    l1 = loss_fn().detach()
                finally:
                    k.tensor.copy_(theta0)
                g = ((l1 - l0) / delta).to(theta0.dtype)
                adv = theta0 + delta + k.c * g
                if k.bounds is not None:
                    adv = adv.clamp(*k.bounds)
                self._pending.append((k, theta0, adv))
                self.last[k.name] = (delta, g, adv)

    @contextlib.contextmanager
    def adversarial(self) -> Iterator[None]:
        """Inside the block the probed knobs sit at their adversarial values; on exit (even on
        an error) they are reset to theta0. Without a preceding :meth:`probe` it does nothing."""
        pending, self._pending = self._pending, []
        try:
            with torch.no_grad():
                for k, _, adv in pending:
                    k.tensor.copy_(adv.reshape(k.tensor.shape))
            yield
        finally:
            with torch.no_grad():
                for k, theta0, _ in pending:
                    k.tensor.copy_(theta0)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
