"""Timing done properly: warm-up, device synchronisation, median of repeats, rotated inputs.

On CUDA each repeat is timed with a pair of CUDA events around ``inner`` calls (so launch gaps
count, as in training); on CPU with ``perf_counter``. Inputs are rotated between calls where the
caller supplies several sets, so that caches do not flatter a kernel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_backends(device: torch.device, op: str) -> list[tuple[str, str | None]]:
    """``(backend, why not)`` for each kernel backend a benchmark of ``op`` on ``device`` lists:
    ``cuda`` and ``cpu`` for their own tensors only, ``triton`` always; ``why not`` is None when it
    is timed (Triton on CPU runs interpreted only: listed, not timed)."""
    from .. import _backend

    out = []
    for b in ("cuda", "triton", "cpu"):
        if b in ("cuda", "cpu") and device.type != b:
            continue
        why = _backend.missing(b, device, op)
        if b == "triton" and why is None and device.type == "cpu":
            why = "Triton runs only interpreted on CPU (not timed)"
        out.append((b, why))
    return out


def interleaved(steps: dict[str, Callable[[int], object]], device: torch.device | str, rounds: int, inner: int,
                start: int) -> dict[str, list[float]]:
    """Seconds per call of each ``step(i)`` (``i`` counts from ``start``), ``rounds`` times:
    each round times ``inner`` calls of every step in turn, so that drift of the machine falls on
    all of them alike."""
    samples: dict[str, list[float]] = {m: [] for m in steps}
    counter = dict.fromkeys(steps, start)
    for _ in range(rounds):
        for m, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                step(counter[m])
                counter[m] += 1
            synchronize(device)
            samples[m].append((time.perf_counter() - t0) / inner)
    return samples


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    inner: int

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "p20_s": self.p20_s, "p80_s": self.p80_s, "repeats": self.repeats,
                "inner": self.inner}


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def time_fn(
    fn: Callable[[int], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 11,
    min_time_s: float = 0.02,
    max_inner: int = 1000,
    budget_s: float | None = None,
) -> Timing:
    """Median seconds per call of ``fn(i)`` (``i`` counts calls; use it to rotate inputs).

    ``inner`` calls per repeat are chosen so that one repeat lasts at least ``min_time_s``.
    ``budget_s`` caps the total time spent (fewer repeats, at least 3).
    """
    device = torch.device(device)
    calls = 0

    def run(n: int) -> float:
        nonlocal calls
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn(calls)
                calls += 1
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            fn(calls)
            calls += 1
        return time.perf_counter() - t0

    for _ in range(warmup):
        fn(calls)
        calls += 1
    synchronize(device)
    one = max(run(1), 1e-7)
    inner = int(min(max_inner, max(1, min_time_s / one)))
    if budget_s is not None:
        repeats = int(max(3, min(repeats, budget_s / max(one * inner, 1e-9))))
    samples = [run(inner) / inner for _ in range(repeats)]
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), repeats, inner)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated on a CUDA device while ``fn`` runs (None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# HBM bandwidth (datasheet) of the GPUs we measure on, for the share-of-floor column.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}


def peak_bandwidth(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw
    return None


def one_pass_step(ctx, model, opt, loss_fn) -> Callable[[int], None]:
    """The timed step of a one-pass method: forward on batch ``i``, backward, ``opt.step()``."""

    def step(i: int) -> None:
        x, y, _ = ctx.batch(i)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
