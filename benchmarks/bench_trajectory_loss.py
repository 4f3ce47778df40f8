"""Fused trajectory loss (saf_loss, trajectory_kl_loss), forward + backward, beside the eager
reference and torch.compile of it. Cases and providers come from saf_kernels.bench.ops, the
same as ``python -m saf_kernels.bench``; groups are (op, case) so that --benchmark-compare puts
the providers of one shape side by side."""

from __future__ import annotations

import pytest

from saf_kernels.bench import ops as op_bench

from .conftest import DEVICE, provider_or_skip

CASES = op_bench.trajectory_cases(DEVICE, quick=False)
# ce+kl[...]: saf_loss_soft's two-pass alternative (F.cross_entropy on probabilities + the fused KL).
PROVIDERS = ["saf_kernels[cpu]", "saf_kernels[cuda]", "saf_kernels[triton]", "ce+kl[cpu]", "ce+kl[cuda]",
             "ce+kl[triton]", "eager", "compile"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.label.replace(' ', '-')}")
def test_trajectory_loss(timed, case, provider):
    call = provider_or_skip(op_bench.trajectory_providers(case, DEVICE), provider)
    inputs = op_bench.trajectory_inputs(case, DEVICE, sets=2)
    timed(op_bench.fwd_bwd_step(call, inputs), group=f"{case.op} {case.label}")
