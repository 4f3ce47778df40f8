"""SAM under DistributedDataParallel: 2 gloo processes on CPU, against a single-process simulation
of the same steps. First pass under ``opt.first_pass(model)`` (no_sync: each replica perturbs with
its own gradient, the paper's m-sharpness) or with ``sync_first_pass=True``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from saf_kernels.optim import SAM

from .helpers import gloo_group, save_rank, spawn_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 10, generator=g), torch.randint(0, 3, (6,), generator=g)


LOSS = nn.CrossEntropyLoss()


def _train(rank, sync):
    model = nn.parallel.DistributedDataParallel(_model())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, sync_first_pass=sync, **KW)
    for step in range(STEPS):
        x, y = _batch(rank, step)
        with opt.first_pass(model):  # forward and backward inside: DDP decides at forward time
            LOSS(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with opt.second_pass(model):
            LOSS(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.module.parameters()]


def _worker(rank, port, out_dir, sync):
    with gloo_group(rank, WORLD, port):
        save_rank(out_dir, rank, _train(rank, sync))


def _simulate(sync):
    """The same steps in one process: per-replica (or averaged) perturbation, averaged SAM gradient."""
    model = _model()
    base = torch.optim.SGD(model.parameters(), **KW)
    params = list(model.parameters())
    for step in range(STEPS):
        w0 = [p.detach().clone() for p in params]
        first = []
        for r in range(WORLD):
            x, y = _batch(r, step)
            model.zero_grad()
            LOSS(model(x), y).backward()
            first.append([p.grad.clone() for p in params])
        if sync:
            avg = [sum(gs) / WORLD for gs in zip(*first)]
            first = [avg] * WORLD
        second = []
        for r in range(WORLD):
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in first[r]))
            with torch.no_grad():
                for p, w, g in zip(params, w0, first[r]):
                    p.copy_(w + (0.1 * g.double() / (norm + 1e-12)).float())
            x, y = _batch(r, step)
            model.zero_grad()
            LOSS(model(x), y).backward()
            second.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for p, w, gs in zip(params, w0, zip(*second)):
                p.copy_(w)
                p.grad = sum(gs) / WORLD
        base.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("sync", [False, True], ids=["m-sharpness", "synced"])
def test_ddp_two_gloo_processes(tmp_path, sync):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = spawn_ranks(_worker, WORLD, tmp_path, sync)
    for a, b in zip(*ranks):  # the second gradients are synced: every replica holds the same weights
        assert torch.equal(a, b)
    want = _simulate(sync)
    for got, w in zip(ranks[0], want):
        torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-5)
    # The two modes differ (otherwise the test could not tell them apart).
    other = _simulate(not sync)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(want, other))


def test_first_pass_is_a_no_op_without_ddp():
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, **KW)
    ref = copy.deepcopy(model)
    with opt.first_pass(model):
        LOSS(model(torch.randn(4, 10)), torch.randint(0, 3, (4,))).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
