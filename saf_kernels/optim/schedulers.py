"""Schedules tied to the learning rate, for GSAM's and R-SAM's ``rho`` and R-SAM's noise scale.

No state but the optimizer's own step count and each group's current ``lr`` (whatever LR
scheduler set it): nothing to save separately, no host synchronisation (Python floats).
"""

from __future__ import annotations

import math
import numbers


def _num(name, v, cls):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{cls}: {name} must be a finite number, got {v!r}")
    return float(v)


class ProportionScheduler:
    """``value`` proportional to the learning rate, as GSAM's and R-SAM's rho schedules::

        value = min_value + (max_value - min_value) * (lr - min_lr) / (max_lr - min_lr)

    (GSAM Algorithm 1; R-SAM's code after warm-up), and during the first ``warmup_steps``
    steps ``value = lr / max_lr * max_value`` (R-SAM's code; GSAM has no such branch). The
    optimizer calls it every step with each group's current ``lr``, so attach the LR scheduler
    as usual (to the optimizer or its ``base_optimizer``). Same arguments as the widely used
    ``ProportionScheduler`` (GSAM repository, pytorch_optimizer), without the LR scheduler
    object. Values are clamped to ``[min(min_value, max_value), max(...)]`` (to
    ``[0, max_value]`` during the warm-up).

    Example (GSAM's ResNet setting, Table 4): ``ProportionScheduler(max_lr=1.6, min_lr=0.016,
    max_value=0.04, min_value=0.02)``.
    """

    def __init__(self, max_lr: float, min_lr: float = 0.0, max_value: float = 0.05, min_value: float = 0.05,
                 warmup_steps: int = 0):
        cls = type(self).__name__
        self.max_lr = _num("max_lr", max_lr, cls)
        self.min_lr = _num("min_lr", min_lr, cls)
        self.max_value = _num("max_value", max_value, cls)
        self.min_value = _num("min_value", min_value, cls)
        if self.max_lr <= self.min_lr:
            raise ValueError(f"{cls}: max_lr must be > min_lr, got max_lr={max_lr!r}, min_lr={min_lr!r}")
        if min(self.max_value, self.min_value) < 0:
            raise ValueError(f"{cls}: values must be >= 0, got max_value={max_value!r}, min_value={min_value!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{cls}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps

    def __call__(self, lr: float, step: int) -> float:
        if step < self.warmup_steps:  # R-SAM's warm-up: from 0 with the LR, below min_value
            return min(max(lr / self.max_lr * self.max_value, 0.0), self.max_value)
        v = self.min_value + (self.max_value - self.min_value) * (lr - self.min_lr) / (self.max_lr - self.min_lr)
        lo, hi = min(self.min_value, self.max_value), max(self.min_value, self.max_value)
        return min(max(v, lo), hi)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(max_lr={self.max_lr}, min_lr={self.min_lr}, max_value={self.max_value}, "
                f"min_value={self.min_value}, warmup_steps={self.warmup_steps})")


class CosineIncrease:
    """``value`` rising from ``start`` to ``end`` over ``total_steps`` on a half cosine, then
    constant: R-SAM's noise scale ``std_t = 0.0005 * (1 + 4 * (0.5 - 0.5 cos(pi t / T)))``
    is ``CosineIncrease(5e-4, 2.5e-3, T)``."""

    def __init__(self, start: float, end: float, total_steps: int):
        cls = type(self).__name__
        self.start = _num("start", start, cls)
        self.end = _num("end", end, cls)
        if min(self.start, self.end) < 0:
            raise ValueError(f"{cls}: values must be >= 0, got start={start!r}, end={end!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{cls}: total_steps must be an int >= 1, got {total_steps!r}")
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps) / self.total_steps
        return self.start + (self.end - self.start) * (0.5 - 0.5 * math.cos(math.pi * t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start}, end={self.end}, total_steps={self.total_steps})"
