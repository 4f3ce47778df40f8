"""ESAM, R-SAM and GSAM under DistributedDataParallel: 2 processes on gloo (CPU).

ESAM's DDP rule (the official code): each replica perturbs with its own first gradient
(m-sharpness: no all-reduce in pass 1), selects its own samples, and the second gradients are
averaged by DDP. The ESAM run is checked against that rule computed in one process; R-SAM and
GSAM are checked to keep the replicas identical.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from saf_kernels import reference
from saf_kernels.optim import ESAM, GSAM, RSAM, per_sample_closure
from saf_kernels.optim._rng import step_key

from .helpers import gloo_group, save_rank, spawn_ranks
from .optim_models import batches, esam_reference_step, make_model

WORLD, STEPS, SEED = 2, 2, 5
LOSS = functools.partial(F.cross_entropy, reduction="none")


def _data(rank):
    return batches(STEPS, B=16, seed=100 + rank)


def _train(rank, kind):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model, find_unused_parameters=True)  # Net has a parameter no forward uses
    if kind.startswith("esam"):
        opt = ESAM(ddp.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5, swp=kind.split("-")[1],
                   seed=SEED, lr=0.05, model=ddp, backend="cpu")
        for x, y in _data(rank):
            opt.step(per_sample_closure(ddp, x, y, LOSS))
    else:
        cls = RSAM if kind == "rsam" else GSAM
        opt = cls(ddp.parameters(), torch.optim.SGD, lr=0.05, model=ddp, backend="cpu",
                  **({"seed": SEED} if kind == "rsam" else {}))
        for x, y in _data(rank):

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir, kind):
    with gloo_group(rank, WORLD, port):
        save_rank(out_dir, rank, _train(rank, kind))


def _run(tmp_path, kind):
    return spawn_ranks(_worker, WORLD, tmp_path, kind)


def _esam_second_grads(model, x, y, keep_fn):
    """One replica's ESAM second gradients (dict param -> grad), computed from the rule."""
    esam_reference_step(model, None, x, y, 0.1, 0.5, 0.5, keep_fn)
    return {p: p.grad.clone() for p in model.parameters() if p.grad is not None}


@pytest.mark.distributed
@pytest.mark.parametrize("swp", ["element", "tensor"])
def test_esam_ddp_matches_per_replica_rule(tmp_path, swp):
    pytest.importorskip("torch.distributed")
    _skip_cpu()
    ranks = _run(tmp_path, f"esam-{swp}")
    for a, b in zip(*ranks):
        assert torch.equal(a, b), "replicas diverged"
    import random

    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [_data(r) for r in range(WORLD)]
    rng = random.Random(SEED)
    for step in range(STEPS):
        if swp == "element":
            def keep_fn(live, k=step_key(SEED, step)):  # noqa: B008 (bound per step on purpose)
                return reference.esam_keep_masks(live, [0.5] * len(live), k, 0)
        else:  # every replica draws the same tensors from the same seeded random.Random
            keep = [rng.random() < 0.5 for _ in model.parameters()]
            if not any(keep):
                keep[rng.randrange(len(keep))] = True
            kept = {id(p) for p, k in zip(model.parameters(), keep) if k}

            def keep_fn(live, kept=kept):
                return [torch.full((p.numel(),), id(p) in kept) for p in live]
        grads = [_esam_second_grads(model, *data[r][step], keep_fn) for r in range(WORLD)]
        for p in model.parameters():
            gs = [g[p] for g in grads if p in g]
            p.grad = sum(gs) / WORLD if gs else None
        sgd.step()
    for p, q in zip(model.parameters(), ranks[0]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["rsam", "gsam"])
def test_rsam_gsam_ddp_keep_replicas_identical(tmp_path, kind):
    _skip_cpu()
    ranks = _run(tmp_path, kind)
    start = [p.detach() for p in make_model().parameters()]
    for a, b in zip(*ranks):
        assert torch.equal(a, b), "replicas diverged"
        assert torch.isfinite(a).all()
    assert any(not torch.equal(a, s) for a, s in zip(ranks[0], start))


def _skip_cpu():
    from .helpers import skip_unless_available

    skip_unless_available("cpu", "cpu", "esam_perturb_")
