"""Checks of the scalar arguments of the public callables (optimizers and their schedules, the
sharpness measures, SAF / MESA, the benchmark entry points): type, range, finiteness and enum
value, at the call, with a message that names the callable, the argument and the value.

One convention everywhere:

- a number that is wrong in type or value (``"0.1"``, ``nan``, ``-1``, ``True``) raises
  ``ValueError``, as ``torch.optim`` does for its hyperparameters. ``bool`` is never a number
  (``rho=True`` is refused), and an integer argument refuses ``2.5``.
- a flag that is not a ``bool`` (``adaptive="no"``: a truthy string), something that should be
  callable and is not, a dtype or a module of the wrong kind raise ``TypeError``.
- an unknown enum value (``stash_mode="swap"``) raises ``ValueError`` listing the choices.

Every check returns the value in its canonical type (``float``, ``int``, ``bool``), so a caller
stores what it checked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _inside(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


def number(value, name: str, fn: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval from ``lo`` to ``hi`` (closed ends unless
    ``lo_open`` / ``hi_open``; ``None``: unbounded). Returns it as a ``float``."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or not _inside(value, lo, hi, lo_open, hi_open):
        span = _interval(lo, hi, lo_open, hi_open)
        what = f"in{span[3:]}" if lo is not None and hi is not None else f"a finite number{span}"
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return float(value)


def integer(value, name: str, fn: str, *, lo=None, hi=None) -> int:
    """An ``int`` (not a bool, not ``2.5``) in ``[lo, hi]`` (``None``: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _inside(value, lo, hi, False, False):
        raise ValueError(f"{fn}: {name} must be an int{_interval(lo, hi, False, False)}, got {value!r}")
    return int(value)


def flag(value, name: str, fn: str) -> bool:
    """``True`` or ``False``: not a truthy string, not a number."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool (True or False), got {value!r}")
    return value


def one_of(value, name: str, fn: str, choices: Iterable):
    """One of ``choices`` (strings, or other hashable constants)."""
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 else repr(
            choices[0])
        raise ValueError(f"{fn}: {name} must be {listed}, got {value!r}")
    return value


def function(value, name: str, fn: str, what: str = "", *, optional: bool = False) -> Callable | None:
    """A callable (``what`` describes its signature in the message), or None if ``optional``."""
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{fn}: {name} must be callable{what}{' or None' if optional else ''}, got {value!r}")
    return value


def dtype(value, name: str, fn: str, choices=FLOAT_DTYPES, *, optional: bool = False) -> torch.dtype | None:
    """A ``torch.dtype`` among ``choices`` (not a string such as ``"bf16"``), or None if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise TypeError(f"{fn}: {name} must be one of {listed}{' or None' if optional else ''}, got {value!r}")
    return value


def module(value, name: str, fn: str, *, optional: bool = False) -> torch.nn.Module | None:
    """A ``torch.nn.Module``, or None if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.nn.Module):
        raise TypeError(
            f"{fn}: {name} must be a torch.nn.Module{' or None' if optional else ''}, got {type(value).__name__}"
        )
    return value


def backend(value, fn: str) -> str:
    """A backend name of :data:`saf_kernels.BACKENDS` (checked here, at the call; whether it can
    run is decided where the tensors are known)."""
    from ._backend import BACKENDS

    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{fn}: unknown backend {value!r}; expected one of {BACKENDS}")
    return value


def device(value, name: str, fn: str) -> torch.device:
    """A ``torch.device`` or a string naming one (``"cpu"``, ``"cuda:0"``)."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(f"{fn}: {name} must be a torch.device or a device string such as 'cpu', got {value!r}")
