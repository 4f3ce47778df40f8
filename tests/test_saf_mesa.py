"""SAF and MESA as training components: the official formula, the epoch convention, checkpoint
resume, the EMA teacher against a float64 reference EMA, and a 2-process DDP run on gloo whose
bank equals the single-process bank."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import saf_kernels as sk
from saf_kernels import reference

from .helpers import KERNEL_PAIRS, gloo_group, save_rank, skip_unless_available, spawn_ranks
from .tolerances import assert_close

ALL_PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]


def _skip(backend, device):
    skip_unless_available(backend, device, "saf_bank_step")


# ---------------------------------------------------------------------------------------------
# SAF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_saf_equals_official_formula_and_epoch_convention(backend, device):
    """With every sample seen every epoch, SAF's loss is the official SAF_train.py loss on the
    logits recorded `delay` epochs earlier, from epoch start_epoch on (0-based, inclusive), and
    plain cross-entropy before."""
    _skip(backend, device)
    N, C, B, delay, start, lam, T = 32, 10, 8, 2, 3, 0.3, 5.0
    saf = sk.SAF(N, C, lam=lam, temperature=T, delay=delay, start_epoch=start, dtype=torch.float32, backend=backend)
    y_all = torch.randint(0, C, (N,), device=device)
    history = {}
    for epoch in range(start + 3):
        perm = torch.randperm(N)
        for s in range(0, N, B):
            idx = perm[s : s + B]
            z = (torch.randn(B, C) * 2).to(device).requires_grad_()
            y = y_all[idx.to(device)]
            loss = saf(z, y, idx.to(device), epoch)
            if epoch >= start:
                past = torch.stack([history[(epoch - delay, int(i))] for i in idx]).to(device)
                expected = reference.saf_official_loss(z.detach(), y, past, lam, T)
                assert int(saf.num_with_target) == B
            else:
                expected = F.cross_entropy(z.detach(), y)
                assert int(saf.num_with_target) == 0
            assert_close(loss, expected, torch.float32, f"{backend} epoch {epoch}")
            # The gradient is the official loss's gradient too.
            (g,) = torch.autograd.grad(loss, z)
            z2 = z.detach().requires_grad_()
            if epoch >= start:
                (g_ref,) = torch.autograd.grad(reference.saf_official_loss(z2, y, past, lam, T), z2)
            else:
                (g_ref,) = torch.autograd.grad(F.cross_entropy(z2, y), z2)
            assert_close(g, g_ref, torch.float32, f"{backend} epoch {epoch} grad")
            for i, row in zip(idx.tolist(), z.detach().cpu()):
                history[(epoch, i)] = row


@pytest.mark.parametrize(("backend", "device"), ALL_PAIRS)
def test_saf_without_labels_is_the_trajectory_term(backend, device):
    _skip(backend, device)
    N, C = 8, 6
    saf = sk.SAF(N, C, lam=0.5, temperature=2.0, delay=1, start_epoch=0, dtype=torch.float32, backend=backend)
    ids = torch.arange(N, device=device)
    past = torch.randn(N, C, device=device)
    assert float(saf(past, None, ids, 0)) == 0.0  # nothing recorded before: no term
    z = torch.randn(N, C, device=device)
    expected = 0.5 * reference.trajectory_kl_loss(z, past, 2.0)
    assert_close(saf(z, None, ids, 1), expected, torch.float32, "KL only")


def _train(backend, epochs, bank_dtype, state=None, start_epoch=0):
    """A small model trained with SAF + SGD(momentum); returns per-step losses and the final state."""
    N, C, D, B = 48, 7, 5, 12
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    data = sk.IndexedDataset(torch.utils.data.TensorDataset(X, Y))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    saf = sk.SAF(N, C, lam=0.3, delay=2, start_epoch=2, dtype=bank_dtype, backend=backend)
    if state is not None:
        buf = io.BytesIO(state)
        ckpt = torch.load(buf, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        saf.load_state_dict(ckpt["saf"])
    losses = []
    for epoch in range(start_epoch, epochs):
        loader = torch.utils.data.DataLoader(data, batch_size=B, shuffle=True,
                                             generator=torch.Generator().manual_seed(100 + epoch))
        for x, y, idx in loader:
            loss = saf(model(x), y, idx, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "saf": saf.state_dict()}, buf)
    return losses, buf.getvalue()


@pytest.mark.parametrize(("backend", "device"), [p for p in ALL_PAIRS if "cuda" not in p.id])
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_checkpoint_resume_gives_the_same_losses(backend, device, bank_dtype):
    _skip(backend, device)
    full, _ = _train(backend, 6, bank_dtype)
    first, state = _train(backend, 3, bank_dtype)
    resumed, _ = _train(backend, 6, bank_dtype, state=state, start_epoch=3)
    assert first + resumed == full  # bit for bit
    # and the trajectory term was active across the cut (epochs 2..5 with delay 2)
    assert len(full) == 6 * 4


def test_indexed_dataset_and_loader():
    base = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10) % 3)
    data = sk.IndexedDataset(base)
    assert len(data) == 10
    x, y, i = data[7]
    assert float(x) == 7.0 and int(y) == 1 and i == 7
    assert sk.IndexedDataset([5, 6])[1] == (6, 1)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)))
    assert batch[2].dtype == torch.int64 and torch.equal(batch[0][:, 0].long(), batch[2])
    with pytest.raises(TypeError, match="map-style dataset"):
        sk.IndexedDataset(iter([1, 2]))


def test_bank_memory_and_repr():
    bank = sk.TrajectoryBank(50_000, 100, delay=3, dtype=torch.bfloat16)
    assert bank.nbytes == 50_000 * (3 * (100 * 2 + 4) + 4) + 64
    assert bank.device is None and "unallocated" in repr(bank)
    imagenet = sk.TrajectoryBank(1_281_167, 1000, delay=3, dtype=torch.bfloat16)
    assert abs(imagenet.nbytes / 1e9 - 7.70) < 0.01
    bank.to("cpu")
    assert bank.values.shape == (50_000, 3, 100) and bank.values.dtype == torch.bfloat16
    assert bool((bank.epochs == -1).all())


def test_load_before_the_first_step_lands_on_the_logits_device():
    a = sk.TrajectoryBank(6, 4, delay=2, dtype=torch.float32)
    a.step(torch.randn(3, 4), None, torch.tensor([0, 2, 5]), 0)
    b = sk.TrajectoryBank(6, 4, delay=2, dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    assert b.device is None  # allocated at the first step, where the logits are
    assert torch.equal(b.state_dict()["values"], a.values)
    b.step(torch.randn(3, 4), None, torch.tensor([1, 3, 4]), 0)
    assert torch.equal(b.epochs[[0, 2, 5], 0], a.epochs[[0, 2, 5], 0])
    assert torch.equal(b.values[[0, 2, 5]], a.values[[0, 2, 5]])


def test_state_dict_checks_shape():
    a = sk.TrajectoryBank(10, 5, delay=2, dtype=torch.float32)
    sd = a.state_dict()  # before the first step
    b = sk.TrajectoryBank(10, 5, delay=2, dtype=torch.float32)
    b.load_state_dict(sd)
    with pytest.raises(ValueError, match="delay is 2 in the checkpoint but 3 here"):
        sk.TrajectoryBank(10, 5, delay=3, dtype=torch.float32).load_state_dict(sd)
    with pytest.raises(ValueError, match="dtype is 'float32' in the checkpoint but 'bfloat16' here"):
        sk.TrajectoryBank(10, 5, delay=2).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# MESA
# ---------------------------------------------------------------------------------------------


def _cnn(C=10):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, C),
    )


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_mesa_ema_matches_reference_after_many_steps(backend):
    torch.manual_seed(0)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = 0.9  # far from 1, so that 40 steps move the average a lot
    mesa = sk.MESA(model, decay=decay, start_epoch=1, backend=backend)
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for step in range(40):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        loss = mesa(model(x), y, x, epoch=step // 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mesa.update()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ref[k] = decay * ref[k] + (1 - decay) * v.double()
            else:
                ref[k] = v.clone()
    for k, v in mesa.teacher.state_dict().items():
        if v.is_floating_point():
            assert_close(v, ref[k], torch.float32, k)
        else:
            assert torch.equal(v, ref[k]), k  # num_batches_tracked is copied
    assert not mesa.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in mesa.teacher.parameters())


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mesa_loss(backend):
    if backend == "triton":
        _skip("triton", "cpu")
    torch.manual_seed(0)
    model = _cnn()
    mesa = sk.MESA(model, lam=0.8, temperature=5.0, start_epoch=2, label_smoothing=0.1, backend=backend)
    calls = []
    mesa.teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        for p in model.parameters():  # the teacher must differ from the student
            p.add_(torch.randn_like(p) * 0.1)
    logits = model(x)
    before = mesa(logits, y, x, epoch=1)
    assert not calls, "the teacher does not run before start_epoch"
    assert_close(before, F.cross_entropy(logits.detach(), y, label_smoothing=0.1), torch.float32, "CE only")
    after = mesa(logits, y, x, epoch=2)
    assert len(calls) == 1
    with torch.no_grad():
        t = mesa.teacher(x)
    expected = reference.saf_loss(logits.detach(), y, t, 0.8, 5.0, 0.1)
    assert_close(after, expected, torch.float32, "MESA loss")
    assert_close(mesa(logits, y, epoch=2, teacher_logits=t), expected, torch.float32, "precomputed teacher")
    after.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in mesa.teacher.parameters())
    with pytest.raises(ValueError, match="give the model's inputs or teacher_logits"):
        mesa(logits, y, epoch=3)


def test_mesa_teacher_autocast():
    torch.manual_seed(0)
    model = _cnn()
    mesa = sk.MESA(model, start_epoch=0, teacher_autocast=torch.bfloat16)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    t = mesa.teacher_logits(x)
    assert t.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(t.float(), mesa.teacher(x), torch.bfloat16, "bf16 teacher")
    loss = mesa(model(x), y, x, epoch=0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="teacher_autocast must be None"):
        sk.MESA(model, teacher_autocast=torch.float64)


def test_mesa_state_dict_and_wrappers():
    model = _cnn()
    mesa = sk.MESA(torch.nn.DataParallel(model), decay=0.5)
    assert mesa.model is model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mesa.update()
    other = sk.MESA(copy.deepcopy(model))
    other.load_state_dict(mesa.state_dict())
    for a, b in zip(other.teacher.state_dict().values(), mesa.teacher.state_dict().values()):
        assert torch.equal(a, b)
    model.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="do not match the teacher's"):
        mesa.refresh()


# ---------------------------------------------------------------------------------------------
# Distributed: 2 processes on gloo, CPU
# ---------------------------------------------------------------------------------------------

DDP_N, DDP_C, DDP_D, DDP_B, DDP_DELAY, DDP_WORLD = 40, 10, 6, 4, 2, 2


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(DDP_N, DDP_D, generator=g), torch.randint(0, DDP_C, (DDP_N,), generator=g),
            torch.randn(DDP_D, DDP_C, generator=g))


def _logits(X, W, idx, epoch):
    # The logits are a function of (sample, epoch), so that any split of the epoch over ranks must
    # end with the same bank.
    return X[idx] @ W + 0.25 * epoch


def _ddp_ranks(rank, backend):
    X, Y, W = _ddp_data()
    data = sk.IndexedDataset(torch.utils.data.TensorDataset(X, Y))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=DDP_WORLD, rank=rank, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=DDP_B, sampler=sampler)
    saf = sk.SAF(DDP_N, DDP_C, delay=DDP_DELAY, start_epoch=DDP_DELAY, backend=backend)
    out = {"steps": [], "banks": []}
    for epoch in range(DDP_DELAY + 2):
        sampler.set_epoch(epoch)
        for _, y, idx in loader:
            z = _logits(X, W, idx, epoch).requires_grad_()
            loss = saf(z, y, idx, epoch)
            loss.backward()
            out["steps"].append((epoch, idx.clone(), y.clone(), z.detach().clone(), loss.detach().clone(),
                                 int(saf.num_with_target)))
        out["banks"].append((saf.bank.values.clone(), saf.bank.epochs.clone()))
    return out


def _ddp_worker(rank, port, out_dir, backend):
    with gloo_group(rank, DDP_WORLD, port):
        save_rank(out_dir, rank, _ddp_ranks(rank, backend))


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ddp_bank_equals_single_process_bank(tmp_path, backend):
    if backend == "cpu":
        _skip("cpu", "cpu")
    world = DDP_WORLD
    ranks = spawn_ranks(_ddp_worker, world, tmp_path, backend)

    # The single-process run over the same epochs (order is irrelevant: the logits depend only on
    # the sample and the epoch).
    X, Y, W = _ddp_data()
    single = sk.SAF(DDP_N, DDP_C, delay=DDP_DELAY, start_epoch=DDP_DELAY, backend=backend, process_group=None)
    for epoch in range(DDP_DELAY + 2):
        perm = torch.randperm(DDP_N)
        for s in range(0, DDP_N, 2 * DDP_B):
            idx = perm[s : s + 2 * DDP_B]
            single(_logits(X, W, idx, epoch), Y[idx], idx, epoch)
        for r in ranks:
            values, tags = r["banks"][epoch]
            assert torch.equal(tags, single.bank.epochs), f"epoch {epoch}: tags differ"
            assert torch.equal(values, single.bank.values), f"epoch {epoch}: values differ"

    # Every sample found its past on whichever rank saw it, and the loss used it.
    for r in ranks:
        assert len(r["steps"]) == (DDP_DELAY + 2) * DDP_N // (world * DDP_B)
        for epoch, idx, y, z, loss, m in r["steps"]:
            if epoch < DDP_DELAY:
                assert m == 0
                continue
            assert m == DDP_B, "a sample's past row is missing on this rank"
            past = _logits(X, W, idx, epoch - DDP_DELAY).to(torch.bfloat16)
            expected = reference.saf_loss(z, y, past, 0.3, 5.0)
            assert_close(loss, expected, torch.float32, f"epoch {epoch} loss")


def test_benchmark_steps_run():
    """The step builders of the training-step benchmark (saf_kernels/bench/saf_steps.py) run and
    train: SAF's trajectory term is on from the first timed step."""
    from saf_kernels.bench import saf_steps

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    batch = (torch.randn(6, 3, 4), torch.randint(0, 5, (6,)))
    steps = saf_steps.make_steps(model, batch, "cpu")
    assert set(steps) == {"sgd", "saf", "mesa"}
    for step in steps.values():
        for i in range(3):
            step(i)
    times = saf_steps.compare(steps, "cpu", rounds=2, inner=1, warmup=1)
    assert set(times) == set(steps) and all(t > 0 for t in times.values())
    ctx = saf_steps._Context(model, batch, "cpu")
    saf_steps.BUILDERS["mesa_bf16_teacher"](ctx)(0)
