"""Host time of the Triton multi-tensor launch path: the pointer tables of
``saf_kernels/triton/multi_tensor.py`` for a ResNet-50 parameter list (161 tensors), as
``sam_perturb_`` builds them (weights, gradients, stash; rho and eta per tensor).

On a GPU a SAM pass over ResNet-50 takes ~0.15 ms of memory traffic (performance.md 4.3), so the
host work per call must stay well below that. Rows: a cached call (same tensors and values, what
a training loop sees), a call whose per-tensor values changed (a learning-rate schedule: only the
values are rebuilt and uploaded), and a miss (new addresses: the whole table). Wall-clock time
on the host (``time.perf_counter``), median of repeats; the uploads of a miss are asynchronous
and not waited for.
"""

from __future__ import annotations

import statistics
import time

import torch

from .param_shapes import resnet

TITLE = "Triton launch path: host time per call to build the pointer tables (ResNet-50, 161 tensors)"


def _host_time(fn, repeats: int, inner: int) -> float:
    fn(0)
    samples = []
    calls = 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(calls)
            calls += 1
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def run(device: torch.device, quick: bool) -> list[dict]:
    try:
        from ..triton import multi_tensor as mt
    except ImportError as e:  # Triton not installed
        return [{"kind": "host_overhead", "case": "all", "unavailable": f"{type(e).__name__}: {e}"}]
    shapes = resnet([3, 4, 6, 3], bottleneck=True)
    # Never written: the tables need addresses and sizes, not values.
    params = [torch.empty(s, device=device) for s in shapes]
    grads = [torch.empty(s, device=device) for s in shapes]
    stash = [torch.empty(s, device=device) for s in shapes]
    rho = [0.05]
    eta = [0.0]
    flags = [0]
    repeats, inner = (5, 20) if quick else (11, 100)

    def cached(i):
        mt.build_tables([params, grads, stash], [rho, eta], flags, signature_streams=(0, 2))

    def new_values(i):
        mt.build_tables([params, grads, stash], [[0.05 + i * 1e-9], eta], flags, signature_streams=(0, 2))

    def miss(i):
        mt.TABLES.clear()
        mt.PARAMS.clear()
        mt.build_tables([params, grads, stash], [rho, eta], flags, signature_streams=(0, 2))

    rows = []
    for case, fn in (("cached", cached), ("new per-tensor values", new_values), ("miss (new addresses)", miss)):
        t = _host_time(fn, repeats, inner if case == "cached" else max(1, inner // 10))
        rows.append({"kind": "host_overhead", "case": case, "tensors": len(shapes), "median_s": t})
    mt.TABLES.clear()
    mt.PARAMS.clear()
    return rows


def table(rows: list[dict]) -> str:
    from .report import _fmt_time, _table

    lines = [[r["case"], r.get("unavailable") or _fmt_time(r["median_s"])] for r in rows
             if r.get("kind") == "host_overhead"]
    return _table(["call", "host time"], lines)
