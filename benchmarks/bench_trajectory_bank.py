"""The SAF bank's fused step (gather + CE/KL loss + gradient + record, one kernel) against the
unfused sequence on the same device (indexing gather, loss, backward, index_put_ scatter),
eager and compiled. Cases and providers come from saf_kernels.bench.ops, as in
``python -m saf_kernels.bench --ops saf_bank_step``; groups are one shape, so --benchmark-compare
puts the providers side by side."""

from __future__ import annotations

import pytest

from saf_kernels.bench import ops as op_bench

from .conftest import DEVICE, provider_or_skip

CASES = op_bench.bank_cases(DEVICE, quick=False)
PROVIDERS = ["saf_kernels[cpu]", "saf_kernels[cuda]", "saf_kernels[triton]", "eager", "compile"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.label.replace(' ', '-').replace('/', '-')}")
def test_trajectory_bank(timed, case, provider):
    call = provider_or_skip(op_bench.bank_providers(case, DEVICE), provider)
    inputs = op_bench.bank_inputs(case, DEVICE, sets=2)
    timed(op_bench.bank_step_fn(call, inputs), group=f"{case.op} {case.label}")
