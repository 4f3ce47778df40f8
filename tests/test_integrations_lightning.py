"""PyTorch Lightning: every two-pass optimizer from configure_optimizers under automatic
optimisation (gradient accumulation, bf16-mixed, 16-mixed with a GradScaler, clipping, DDP on 2
gloo processes) equals the plain loop; SAFCallback runs SAF and MESA (sample ids, epochs, EMA
after each optimizer step) and resumes from a checkpoint as if never interrupted."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (pip install lightning; make test "
                                                      "installs it)")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset  # noqa: E402

import saf_kernels as sk  # noqa: E402
from saf_kernels.integrations.lightning import SAFCallback, SharpnessAwareCallback  # noqa: E402

from .integrations_common import (  # noqa: E402
    OPTIMIZERS,
    assert_differ,
    assert_same_state,
    make_data,
    make_net,
    reference_loop,
)

B = 8

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class Lit(pl.LightningModule):
    def __init__(self, opt_name: str, bn: bool = True):
        super().__init__()
        self.net = make_net(bn=bn)
        self.opt_name = opt_name

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return OPTIMIZERS[self.opt_name](self.net.parameters())


def _trainer(callbacks=(), **kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("devices", 1)
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks), **kw)


def _fit(module, x, y, **kw):
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=False)
    _trainer([SharpnessAwareCallback()], **kw).fit(module, loader)
    return module


def _micro(x, y):
    return [(x[s : s + B], y[s : s + B]) for s in range(0, len(x), B)]


# Every optimizer with accumulation; without it SAM in CI, the others behind the slow marker.
CASES = [pytest.param(n, 2, id=f"{n}-accumulate2") for n in OPTIMIZERS] + [
    pytest.param(n, 1, id=f"{n}-k1", marks=() if n == "sam" else pytest.mark.slow) for n in OPTIMIZERS]


@pytest.mark.parametrize(("name", "k"), CASES)
def test_every_optimizer_equals_the_plain_loop(name, k):
    """3 optimizer steps, each over k micro-batches: parameters and BatchNorm statistics equal
    the plain loop's (both passes over every micro-batch; BN statistics from the first pass)."""
    x, y = make_data(3 * k * B)
    lit = _fit(Lit(name), x, y, accumulate_grad_batches=k)
    net = make_net()
    reference_loop(net, OPTIMIZERS[name](net.parameters()), _micro(x, y), k)
    assert_same_state(lit.net, net, what=name)


def test_two_pass_resume_from_a_checkpoint(tmp_path):
    """R-SAM (noise seed and step, SGD momentum) in Lightning's checkpoint: 1 epoch, save, resume
    to 2 epochs equals 2 epochs in one run, bit for bit."""
    x, y = make_data(2 * 2 * B)

    def fit(epochs, ckpt_path=None, save_to=None):
        lit = Lit("rsam")
        trainer = _trainer([SharpnessAwareCallback()], max_epochs=epochs, accumulate_grad_batches=2)
        trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=B), ckpt_path=ckpt_path)
        if save_to is not None:
            trainer.save_checkpoint(save_to)
        return lit

    full = fit(2)
    fit(1, save_to=tmp_path / "one.ckpt")
    resumed = fit(2, ckpt_path=tmp_path / "one.ckpt")
    assert_same_state(resumed.net, full.net, rtol=0, atol=0)


def test_accumulation_without_the_callback_is_not_sam():
    """What the callback fixes: Lightning alone re-runs only the last micro-batch in the second
    pass, so the result differs from SAM with accumulation."""
    x, y = make_data(2 * 2 * B)
    lit = Lit("sam")
    _trainer(accumulate_grad_batches=2).fit(lit, DataLoader(TensorDataset(x, y), batch_size=B))
    net = make_net()
    reference_loop(net, OPTIMIZERS["sam"](net.parameters()), _micro(x, y), 2)
    assert_differ(lit.net, net)


def test_gradient_clipping_on_the_second_gradients():
    x, y = make_data(3 * B)
    lit = _fit(Lit("gsam"), x, y, gradient_clip_val=0.05)
    net = make_net()
    reference_loop(net, OPTIMIZERS["gsam"](net.parameters()), _micro(x, y), 1, clip=0.05)
    assert_same_state(lit.net, net)
    unclipped = make_net()
    reference_loop(unclipped, OPTIMIZERS["gsam"](unclipped.parameters()), _micro(x, y), 1)
    assert_differ(lit.net, unclipped)  # the clip was active


def test_bf16_mixed():
    x, y = make_data(2 * 2 * B)
    lit = _fit(Lit("sam"), x, y, precision="bf16-mixed", accumulate_grad_batches=2)
    net = make_net()
    reference_loop(net, OPTIMIZERS["sam"](net.parameters()), _micro(x, y), 2, autocast=torch.bfloat16)
    assert_same_state(lit.net, net, rtol=1e-5, atol=1e-6)


def _fp16_plugin(init_scale):
    # Lightning turns precision="16-mixed" into bf16 on a CPU; the plugin keeps float16 + GradScaler.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("name", ["sam", "rsam"])
def test_16_mixed_grad_scaler_with_clipping(name):
    x, y = make_data(2 * 2 * B)
    plugin = _fp16_plugin(2.0**10)
    lit = _fit(Lit(name), x, y, plugins=[plugin], accumulate_grad_batches=2, gradient_clip_val=0.5)
    net = make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference_loop(net, OPTIMIZERS[name](net.parameters()), _micro(x, y), 2, clip=0.5, scaler=scaler,
                   autocast=torch.float16)
    assert_same_state(lit.net, net, rtol=1e-5, atol=1e-6)
    assert plugin.scaler.get_scale() == scaler.get_scale()


def test_16_mixed_overflow_skips_the_step_and_backs_off():
    """A scale that overflows float16 gradients: the step is skipped (weights unchanged) and
    the scaler backs off, through the stock GradScaler."""
    x, y = make_data(B)
    plugin = _fp16_plugin(2.0**60)
    lit = Lit("sam", bn=False)
    before = copy.deepcopy(lit.net.state_dict())
    _fit(lit, x, y, plugins=[plugin])
    for name, t in lit.net.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert plugin.scaler.get_scale() == 2.0**59


def test_16_mixed_without_the_callback_says_what_to_do():
    x, y = make_data(B)
    with pytest.raises(RuntimeError, match="SharpnessAwareCallback"):
        _trainer(plugins=[_fp16_plugin(2.0**8)]).fit(Lit("sam"), DataLoader(TensorDataset(x, y), batch_size=B))


def test_esam_with_data_selection_is_refused():
    class LitESAM(Lit):
        def configure_optimizers(self):
            return sk.optim.ESAM(self.net.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1)

    x, y = make_data(B)
    with pytest.raises(ValueError, match="gamma=1"):
        _fit(LitESAM("esam"), x, y)


def test_first_pass_loss_is_reported_and_perturbed_is_visible():
    """The step's loss is the first pass's; training_step sees `perturbed` in the second run."""
    seen = []

    class Spy(Lit):
        def training_step(self, batch, batch_idx):
            seen.append(self.optimizers().optimizer.perturbed)
            return super().training_step(batch, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            x, y = batch
            seen.append(("loss", outputs["loss"].item()))

    x, y = make_data(B)
    lit = Spy("sam", bn=False)
    w0 = copy.deepcopy(lit.net)
    _fit(lit, x, y)
    assert seen[:2] == [False, True]
    assert seen[2][1] == pytest.approx(F.cross_entropy(w0(x), y).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes (ddp_spawn), gradient accumulation 2, against a simulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_two_processes_m_sharpness_with_accumulation():
    """Each replica perturbs with its own (accumulated) first gradient, the second gradients are
    averaged across replicas: the SAM paper's m-sharpness, as the plain DDP loop does it."""
    k, steps, world = 2, 2, 2
    x, y = make_data(world * k * steps * B)
    lit = Lit("sam", bn=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=False)
    _trainer([SharpnessAwareCallback()], strategy="ddp_spawn", devices=world, accumulate_grad_batches=k).fit(
        lit, loader)

    # Simulation: Lightning gives each rank a DistributedSampler(shuffle=True, seed=0) for training.
    net = make_net(bn=False)
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    shards = []
    for r in range(world):
        idx = list(DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=r, shuffle=True, seed=0))
        shards.append((x[idx], y[idx]))
    for step in range(steps):
        avg = [torch.zeros_like(p) for p in net.parameters()]
        for xs, ys in shards:
            replica = copy.deepcopy(net)
            opt = OPTIMIZERS["sam"](replica.parameters())
            window = [(xs[s : s + B], ys[s : s + B]) for s in range((step * k) * B, (step + 1) * k * B, B)]
            for xb, yb in window:
                (F.cross_entropy(replica(xb), yb) / k).backward()
            opt.first_step(zero_grad=True)
            for xb, yb in window:
                (F.cross_entropy(replica(xb), yb) / k).backward()
            for a, p in zip(avg, replica.parameters()):
                a.add_(p.grad / world)
        for p, a in zip(net.parameters(), avg):
            p.grad = a
        base.step()
    assert_same_state(lit.net, net, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# SAF and MESA
# ---------------------------------------------------------------------------------------------


class EpochPermutation(Sampler):
    """A shuffle fixed by (seed, epoch): the same order whether or not the run was resumed."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self):
        return self.n


N_SAF = 4 * B


class LitSAF(pl.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.net = make_net()
        self.kind = kind
        if kind == "saf":
            self.saf = sk.SAF(N_SAF, 5, lam=0.5, temperature=2.0, delay=1, start_epoch=1, dtype=torch.float32)
        else:
            self.mesa = sk.MESA(self.net, lam=0.5, temperature=2.0, decay=0.5, start_epoch=1)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        if self.kind == "saf":
            return self.saf(self.net(x), y, ids, self.current_epoch)
        return self.mesa(self.net(x), y, x, self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)


def _saf_data():
    x, y = make_data(N_SAF, seed=5)
    return sk.IndexedDataset(TensorDataset(x, y))


def _saf_fit(lit, epochs, k, ckpt_path=None, save_to=None):
    loader = DataLoader(_saf_data(), batch_size=B, sampler=EpochPermutation(N_SAF))
    trainer = _trainer([SAFCallback()], max_epochs=epochs, accumulate_grad_batches=k)
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return lit


def _saf_reference(kind, epochs, k):
    ref = LitSAF(kind)
    opt = torch.optim.SGD(ref.net.parameters(), lr=0.1, momentum=0.9)
    data, sampler = _saf_data(), EpochPermutation(N_SAF)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(DataLoader(data, batch_size=B, sampler=sampler))
        for s in range(0, len(batches), k):
            for x, y, ids in batches[s : s + k]:
                loss = ref.saf(ref.net(x), y, ids, epoch) if kind == "saf" else ref.mesa(ref.net(x), y, x, epoch)
                (loss / k).backward()
            opt.step()
            opt.zero_grad()
            if kind == "mesa":
                ref.mesa.update()  # once per optimizer step
    return ref


@pytest.mark.parametrize(("kind", "k"), [("saf", 1), ("mesa", 2)])
def test_saf_mesa_callback_equals_the_plain_loop_and_resumes(kind, k, tmp_path):
    epochs = 3
    full = _saf_fit(LitSAF(kind), epochs, k)
    ref = _saf_reference(kind, epochs, k)
    assert_same_state(full.net, ref.net, what=kind)
    if kind == "mesa":
        assert_same_state(full.mesa.teacher, ref.mesa.teacher, what="teacher")
    # Interrupted after epoch 1 (the bank / teacher saved in the checkpoint), resumed to the end.
    ckpt = tmp_path / "half.ckpt"
    _saf_fit(LitSAF(kind), 2, k, save_to=ckpt)
    resumed = _saf_fit(LitSAF(kind), epochs, k, ckpt_path=ckpt)
    assert_same_state(resumed.net, full.net, what=f"{kind} resumed")
    if kind == "saf":
        assert torch.equal(resumed.saf.bank.values, full.saf.bank.values)
        assert torch.equal(resumed.saf.bank.epochs, full.saf.bank.epochs)
    else:
        assert_same_state(resumed.mesa.teacher, full.mesa.teacher, what="teacher resumed")


def test_saf_callback_needs_one_method():
    x, y = make_data(B)
    with pytest.raises(ValueError, match="SAF or MESA"):
        _trainer([SAFCallback()]).fit(Lit("sam"), DataLoader(TensorDataset(x, y), batch_size=B))
    with pytest.raises(TypeError, match="SAF or saf_kernels.MESA"):
        SAFCallback(object())
