"""Argument handling shared by the multi-tensor ops (sam.py, ema.py).

The C++ ops check every tensor themselves (csrc/mt_plan.h), so the CPU and CUDA paths pay no
per-tensor Python cost; the Triton and reference paths run :func:`check_streams`, which raises
the same errors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STASH_MODES = {"copy": 0, "delta": 1}


def as_list(x, name: str, fn: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a list or tuple of tensors, got {type(x).__name__}")
    return x if isinstance(x, list) else list(x)


def check_lengths(fn: str, **lists) -> int:
    names = list(lists)
    n = len(lists[names[0]])
    for k in names[1:]:
        if len(lists[k]) != n:
            raise ValueError(f"{fn}: {k} has {len(lists[k])} tensors but {names[0]} has {n}")
    return n


def per_tensor(value, n: int, name: str, fn: str, *, kind=float, nonneg: bool = False) -> list:
    """The per-tensor values of a number (returned as a one-element list: the ops broadcast it)
    or of a sequence of length n, checked; the error names the offending value."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a number or a sequence of numbers, not a tensor")
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: {name} has {len(value)} values for {n} tensors")
        vals = list(value)
    else:
        vals = [value]
    if kind is bool:
        if not all(isinstance(v, (bool, int)) for v in vals):
            i = next(i for i, v in enumerate(vals) if not isinstance(v, (bool, int)))
            raise TypeError(f"{fn}: {name}[{i}] must be a bool, got {vals[i]!r}")
        return [bool(v) for v in vals]
    try:
        out = [float(v) for v in vals]
        ok = not any(isinstance(v, bool) for v in vals) and all(map(math.isfinite, out))
    except (TypeError, ValueError):
        ok = False
    if not ok or (nonneg and out and min(out) < 0):
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{fn}: {name}[{i}] must be a finite number, got {v!r}")
            if nonneg and v < 0:
                raise ValueError(f"{fn}: {name}[{i}] must be >= 0, got {v!r}")
    return out


def full(values: list, n: int) -> list:
    """A per-tensor list at full length (the reference paths zip over it)."""
    return values * n if len(values) == 1 and n != 1 else values


def per_tensor_full(value, n: int, name: str, fn: str, **kw) -> list:
    """:func:`per_tensor` at full length, for ops whose kernels index one value per tensor."""
    return full(per_tensor(value, n, name, fn, **kw), n)


def sgd_options(fn: str, n: int, bufs: list, lr, weight_decay, momentum, dampening, nesterov, maximize,
                first_run) -> tuple[list, ...]:
    """The SGD hyperparameters of the fused restore + SGD ops (sam_restore_sgd_,
    gsam_restore_sgd_), per tensor (:func:`per_tensor`), checked as ``torch.optim.SGD`` checks
    them: lr, weight_decay and momentum >= 0, nesterov only with momentum > 0 and dampening 0,
    and momentum buffers whenever a momentum is non-zero (empty lists need none)."""
    lr_l = per_tensor(lr, n, "lr", fn, nonneg=True)
    wd_l = per_tensor(weight_decay, n, "weight_decay", fn, nonneg=True)
    mom_l = per_tensor(momentum, n, "momentum", fn, nonneg=True)
    damp_l = per_tensor(dampening, n, "dampening", fn)
    nest = per_tensor(nesterov, n, "nesterov", fn, kind=bool)
    maxi = per_tensor(maximize, n, "maximize", fn, kind=bool)
    first = per_tensor(first_run, n, "first_run", fn, kind=bool)
    if any(nest):
        for i, (a, m, d) in enumerate(zip(full(nest, n), full(mom_l, n), full(damp_l, n))):
            if a and (m <= 0 or d != 0):
                raise ValueError(f"{fn}: nesterov[{i}]=True needs momentum > 0 and dampening 0 (as torch.optim.SGD), "
                                 f"got momentum={m!r}, dampening={d!r}")
    if n and not bufs and any(m != 0 for m in mom_l):
        raise ValueError(f"{fn}: momentum != 0 needs momentum_buffers")
    return lr_l, wd_l, mom_l, damp_l, nest, maxi, first


def stash_mode_code(stash_mode: str, fn: str) -> int:
    if stash_mode not in STASH_MODES:
        raise ValueError(
            f"{fn}: stash_mode must be 'copy' (exact restore) or 'delta' (lossy), got {stash_mode!r}"
        )
    return STASH_MODES[stash_mode]


def check_scalar(t, name: str, fn: str, device: torch.device | None) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(
            f"{fn}: {name} must be a one-element floating tensor, got shape {tuple(t.shape)} {t.dtype}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the tensors are on {device}")


def check_streams(
    fn: str,
    streams: Sequence[tuple[str, list[torch.Tensor]]],
    scalar: Sequence[str] = (),
    same_dtype: Sequence[str] = (),
) -> None:
    """Per-tensor checks of the Triton and reference paths (the C++ ops make the same ones)."""
    first_name, first = streams[0]
    dev = first[0].device if first else None
    for name, lst in streams:
        for i, t in enumerate(lst):
            where = f"{fn}: {name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} is {type(t).__name__}, not a tensor")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{where} has dtype {t.dtype}; expected float32, float16, bfloat16 or float64"
                )
            if t.device != dev:
                raise ValueError(f"{where} is on {t.device} but {first_name}[0] is on {dev}")
            if t.is_sparse:
                raise ValueError(f"{where} is sparse; only dense tensors are supported")
            p = first[i]
            if name in scalar:
                if t.numel() != 1:
                    raise ValueError(f"{where} must have one element, got shape {list(t.shape)}")
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"{where} has shape {list(t.shape)} but {first_name}[{i}] has shape {list(p.shape)}"
                )
            if t.numel() > 1 and t.stride() != p.stride():
                raise ValueError(
                    f"{where} has strides {list(t.stride())} but {first_name}[{i}] has strides "
                    f"{list(p.stride())} (the lists must share one memory layout)"
                )
            if t.numel() > 1 and not _dense(t):
                raise ValueError(
                    f"{where} is not dense (strides {list(t.stride())}); pass a contiguous tensor"
                )
            if name in same_dtype and t.dtype != p.dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but {first_name}[{i}] has dtype {p.dtype}")


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    # Non-overlapping and dense in some order of the dimensions.
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True
