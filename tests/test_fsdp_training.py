"""Training around the optimizers under FSDP2 (``fully_shard``), 2 gloo processes on CPU, float64,
against one process training on the whole batch: MESA with a sharded teacher; SAM with gradient
accumulation and with a GradScaler (an overflow in one rank's shard skips the step on every
rank); a torch.distributed.checkpoint round trip that keeps a schedule's clock; SAF's replicated
TrajectoryBank beside a sharded model; the error of a per-replica (unsynchronised) first pass.

The model and data helpers are tests/test_fsdp.py's (dim 0 of the weights 5, 3 and 1: even,
uneven and an empty shard on rank 1). One spawn runs every case (a spawn costs seconds here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import saf_kernels as sk
from saf_kernels.ops import _multi_tensor as mt
from saf_kernels.optim import SAM

from .helpers import bits, gloo_group, save_rank, spawn_ranks
from .test_fsdp import GLOBAL_BATCH, STEPS, WORLD, _batch, _model, _shard, _train

CLASSES = 3


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # dim 0: 5 (3 + 2 rows), 3 (2 + 1: uneven); the bias of the last layer has 3 too
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()


def _cls_batch(step: int, rank: int | None = None):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    if rank is None:
        return x, y
    half = GLOBAL_BATCH // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


# --- MESA: the EMA teacher sharded like the student ---

MESA_KW = dict(lam=0.8, temperature=2.0, decay=0.5, start_epoch=0)


def _mesa_run(model, mesa, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        x, y = _cls_batch(step, rank)
        loss = mesa(model(x), y, x, epoch=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mesa.update()


def _mesa_fsdp(rank, out_dir):
    import torch.distributed.checkpoint as dcp

    model = _shard(_classifier())
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        sk.MESA(model)
    mesa = sk.MESA(model, teacher=_shard(_classifier(5)), **MESA_KW)  # other weights: replaced by the model's
    _mesa_run(model, mesa, rank)
    assert all(type(p).__name__ == "DTensor" for p in mesa.teacher.parameters())
    # the teacher's sharded state through torch.distributed.checkpoint, into another teacher
    dcp.save(mesa.state_dict(), checkpoint_id=f"{out_dir}/mesa")
    other = sk.MESA(model, teacher=_shard(_classifier(5)), **MESA_KW)  # (the model's weights now)
    state = other.state_dict()
    dcp.load(state, checkpoint_id=f"{out_dir}/mesa")
    other.load_state_dict(state)
    restored = all(torch.equal(bits(a.to_local()), bits(b.to_local()))
                   for a, b in zip(other.teacher.parameters(), mesa.teacher.parameters()))
    return {"mesa:model": [p.full_tensor() for p in model.parameters()],
            "mesa:teacher": [p.full_tensor() for p in mesa.teacher.parameters()], "mesa:restored": restored}


def _mesa_single():
    model = _classifier()
    mesa = sk.MESA(model, **MESA_KW)
    _mesa_run(model, mesa)
    return [p.detach() for p in model.parameters()], [p.detach() for p in mesa.teacher.parameters()]


# --- SAM with gradient accumulation (2 micro-batches per pass) and with a GradScaler ---

SAM_KW = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
MICRO = 2


def _half(x, rank):
    if rank is None:
        return x
    half = GLOBAL_BATCH // WORLD
    return x[rank * half:(rank + 1) * half]


def _accumulate(model, rank):
    """Both passes over MICRO micro-batches; under FSDP2 only the last backward reduce-scatters."""
    opt = SAM(model.parameters(), torch.optim.SGD, **SAM_KW)
    for step in range(STEPS):
        x, y = (_half(t, rank) for t in _batch(step))
        for first in (True, False):
            for k, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
                if rank is not None:
                    model.set_requires_gradient_sync(k == MICRO - 1)
                (nn.functional.mse_loss(model(xm), ym) / MICRO).backward()
            if first:
                opt.first_step(zero_grad=True)
            else:
                opt.second_step(zero_grad=True)
    return [p.full_tensor() if rank is not None else p.detach() for p in model.parameters()]


OVERFLOW_STEP = 1  # its second gradient gets an inf in row 2 of the middle weight (rank 1's shard)


def _scaled(model, rank):
    """SAM through a GradScaler; one step's second gradient overflows in one shard only."""
    opt = SAM(model.parameters(), torch.optim.SGD, **SAM_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(STEPS):
        x, y = (_half(t, rank) for t in _batch(step))
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if step == OVERFLOW_STEP:
            g = model[2].weight.grad
            if rank is None:
                g[2, 0] = float("inf")
            elif rank == 1:  # rank 1 holds row 2 of the 3 rows; rank 0 sees no inf itself
                g.to_local()[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return [p.full_tensor() if rank is not None else p.detach() for p in model.parameters()], scaler.get_scale()


# --- torch.distributed.checkpoint: a schedule's clock (steps_done) survives ---

CKPT_KW = dict(rho=0.1, lr=0.1, momentum=0.9, every=2)  # SAM on steps 1, 3, ...; one pass on 0, 2, ...
CKPT_STEPS, CKPT_AT = 4, 1  # saved after step 0: a lost clock would take step 1 with one pass


def _checkpoint(rank, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _shard(_model())
    opt = SAM(model.parameters(), torch.optim.SGD, **CKPT_KW)
    _train(model, opt, rank, range(CKPT_STEPS))
    uninterrupted = [p.full_tensor() for p in model.parameters()]

    path = f"{out_dir}/ckpt-every"
    model = _shard(_model())
    opt = SAM(model.parameters(), torch.optim.SGD, **CKPT_KW)
    _train(model, opt, rank, range(CKPT_AT))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model = _shard(_model(7))
    opt = SAM(model.parameters(), torch.optim.SGD, **CKPT_KW)
    opt.init_state()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    steps_loaded = opt.steps_done
    assert all("saf_kernels" not in g for g in opt.param_groups)  # the info is taken out of the groups
    _train(model, opt, rank, range(CKPT_AT, CKPT_STEPS))
    same = all(torch.equal(bits(p.full_tensor()), bits(u)) for p, u in zip(model.parameters(), uninterrupted))
    return {"ckpt:steps_loaded": steps_loaded, "ckpt:steps_done": opt.steps_done, "ckpt:bit_identical": same}


# --- a per-replica first pass: refused with the reason ---


def _per_replica_refused():
    model = _shard(_model())
    opt = SAM(model.parameters(), torch.optim.SGD, **SAM_KW)
    x, y = _batch(0)
    model.set_requires_gradient_sync(False)  # how a per-replica first pass would be asked for
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="per-replica .m-sharpness. first pass is not supported under FSDP2"):
        opt.first_step()
    assert not opt.perturbed


# --- SAF's TrajectoryBank (replicated, all-gathered rows) beside a sharded model ---

SAF_EPOCHS = 3


def _saf_run(model, rank):
    """Every epoch is one global batch of all GLOBAL_BATCH samples in a new order; delay 1."""
    saf = sk.SAF(GLOBAL_BATCH, CLASSES, lam=0.5, temperature=2.0, delay=1, start_epoch=1, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(SAF_EPOCHS):
        order = torch.randperm(GLOBAL_BATCH, generator=torch.Generator().manual_seed(epoch))
        x, y = _cls_batch(0)
        ids = _half(order, rank)
        loss = saf(model(x[ids]), y[ids], ids, epoch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.full_tensor() if rank is not None else p.detach() for p in model.parameters()], saf.num_with_target


# --- BatchNorm: per-rank statistics (FSDP2 does not sync them), kept from the first pass only ---


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double()


def _bn_run(net, model, rank):
    """SAM through step(closure) with model= (the second pass inside frozen_bn_stats)."""
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=net, sync_first_pass=True)
    _train(net, opt, rank, range(STEPS))
    bn = model[1]
    return [p.full_tensor() if mt.is_dtensor(p) else p.detach() for p in model.parameters()], \
        [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _batchnorm(rank):
    """FSDP2 and DDP (first pass synchronised, rank 0's buffers not broadcast) do the same
    per-rank BatchNorm math: equal."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _shard(_bn_model())
    fsdp = _bn_run(model, model, rank)
    model = _bn_model()
    ddp = _bn_run(DDP(model, broadcast_buffers=False), model, rank)
    return {"bn:fsdp": fsdp, "bn:ddp": ddp}


# --- the spawn ---


def _worker(rank, port, out_dir):
    with gloo_group(rank, WORLD, port):
        out = {}
        out.update(_mesa_fsdp(rank, out_dir))
        out["accumulate"] = _accumulate(_shard(_model()), rank)
        out["scaled"], out["scale"] = _scaled(_shard(_model()), rank)
        out.update(_checkpoint(rank, out_dir))
        out["saf"], out["saf:with_target"] = _saf_run(_shard(_classifier()), rank)
        out.update(_batchnorm(rank))
        _per_replica_refused()
        save_rank(out_dir, rank, out)


def _close(got, want, what):
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} tensor {i}: {m}")


@pytest.mark.distributed
def test_fsdp2_training(tmp_path):
    ranks = spawn_ranks(_worker, WORLD, tmp_path)
    model, teacher = _mesa_single()
    for rank, out in enumerate(ranks):
        _close(out["mesa:model"], model, f"MESA model, rank {rank}")
        _close(out["mesa:teacher"], teacher, f"MESA teacher, rank {rank}")
        assert out["mesa:restored"], f"rank {rank}: the teacher loaded through DCP differs"
    want = _accumulate(_model(), None)
    for rank, out in enumerate(ranks):
        _close(out["accumulate"], want, f"SAM with accumulation, rank {rank}")
    want, scale = _scaled(_model(), None)
    assert scale == 2.0**9  # one overflow: one back-off
    for rank, out in enumerate(ranks):
        assert out["scale"] == scale, f"rank {rank}: scale {out['scale']}, one process {scale}"
        _close(out["scaled"], want, f"SAM with a GradScaler, rank {rank}")
    for rank, out in enumerate(ranks):
        assert out["ckpt:steps_loaded"] == CKPT_AT and out["ckpt:steps_done"] == CKPT_STEPS, out
        assert out["ckpt:bit_identical"], f"rank {rank}: the resumed run differs from the uninterrupted one"
    for rank, out in enumerate(ranks):
        (fp, fs), (dp, ds) = out["bn:fsdp"], out["bn:ddp"]
        _close(fp, dp, f"BatchNorm model, FSDP2 vs DDP, rank {rank}")
        _close(fs, ds, f"BatchNorm running statistics, FSDP2 vs DDP, rank {rank}")
        assert int(fs[2]) == STEPS  # one update per step: the first pass only
    # each rank normalised with its own half's statistics: the ranks' running means differ
    assert not torch.allclose(ranks[0]["bn:fsdp"][1][0], ranks[1]["bn:fsdp"][1][0])
    want, _ = _saf_run(_classifier(), None)
    for rank, out in enumerate(ranks):
        assert int(out["saf:with_target"]) == GLOBAL_BATCH // WORLD  # every row found its past logits
        _close(out["saf"], want, f"SAF beside FSDP2, rank {rank}")


# --- one process ---


def test_mesa_teacher_argument():
    """``teacher=``: its weights become the model's; the run equals the deep-copy teacher's bit for bit."""
    a, b = _classifier(), _classifier()
    ma = sk.MESA(a, **MESA_KW)
    mb = sk.MESA(b, teacher=_classifier(3), **MESA_KW)
    for p, q in zip(ma.teacher.parameters(), mb.teacher.parameters()):
        assert torch.equal(p, q)
    assert not mb.teacher.training and not any(p.requires_grad for p in mb.teacher.parameters())
    _mesa_run(a, ma)
    _mesa_run(b, mb)
    for p, q in zip(ma.teacher.parameters(), mb.teacher.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module or None, got str"):
        sk.MESA(a, teacher="x")
    with pytest.raises(ValueError, match="teacher is the model itself"):
        sk.MESA(a, teacher=a)
    wide = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, CLASSES)).double()
    with pytest.raises(ValueError, match=r"teacher's 0.weight has shape \[7, 6\] but the model's has \[5, 6\]"):
        sk.MESA(a, teacher=wide)


def test_dcp_keeps_the_policy(tmp_path):
    """torch.distributed.checkpoint (one process, no process group) through get_state_dict /
    set_state_dict keeps steps_done and an AdaptivePolicy's statistics (a tensor), in the groups."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from saf_kernels.optim import AdaptivePolicy

    def make(seed):
        model = _model(seed)
        return model, SAM(model.parameters(), torch.optim.SGD, policy=AdaptivePolicy(), **SAM_KW)

    model, opt = make(0)
    _train(model, opt, None, range(STEPS))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    model2, opt2 = make(7)
    opt2.init_state()
    msd, osd = get_state_dict(model2, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt2.steps_done == STEPS
    want, got = opt.policy.state_dict(), opt2.policy.state_dict()
    assert torch.equal(got["stats"], want["stats"]) and got["decided_for"] == want["decided_for"]
    assert all("saf_kernels" not in g for g in opt2.param_groups)
    _train(model, opt, None, range(STEPS, STEPS + 2))
    _train(model2, opt2, None, range(STEPS, STEPS + 2))
    assert all(torch.equal(bits(p), bits(q)) for p, q in zip(model.parameters(), model2.parameters()))
