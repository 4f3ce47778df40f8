"""pytest-benchmark set-up: every timed callable synchronises the device before returning.

Run:      make benchmarks            (or: pytest benchmarks --benchmark-only)
Compare:  pytest benchmarks --benchmark-only --benchmark-autosave   on each commit, then
          pytest-benchmark compare 0001 0002 --group-by=group --sort=name
"""

from __future__ import annotations

import pytest
import torch

from saf_kernels.bench.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def provider_or_skip(providers: dict, provider: str):
    """The callable of ``provider`` from a ``saf_kernels.bench`` providers table; skips the case
    with the table's reason (a string) or because the provider does not run on this device."""
    call = providers.get(provider, f"{provider} does not run on {DEVICE.type}")
    if isinstance(call, str):
        pytest.skip(call)
    return call


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def timed(benchmark):
    """``timed(step, group=..., rounds=...)``: benchmark ``step(i)`` (i rotates inputs), synchronised."""

    def run(step, group: str, rounds: int = 20, warmup: int = 3, iterations: int = 1):
        counter = iter(range(10**9))

        def call():
            step(next(counter))
            synchronize(DEVICE)

        benchmark.group = group
        benchmark.extra_info["device"] = str(DEVICE)
        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=iterations)

    return run
