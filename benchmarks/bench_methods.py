"""One training step of each method (forward, loss, backward, optimizer step; both passes for the
SAM family) on the benchmark model, beside plain SGD. Same builders as the methods section of
``python -m saf_kernels.bench``; one group, so --benchmark-compare lines the methods up."""

from __future__ import annotations

import pytest

from saf_kernels.bench import methods

from .conftest import DEVICE

CTX = methods.make_context(DEVICE, quick=False)


@pytest.mark.parametrize("method", methods.METHODS)
def test_training_step(timed, method):
    build = methods.builders().get(method)
    if build is None:
        pytest.skip(f"{method}: not implemented in this version")
    step = build(CTX)
    if isinstance(step, str):
        pytest.skip(step)
    timed(step, group=f"training step ({methods.describe(DEVICE, False)['model']})", rounds=15)
