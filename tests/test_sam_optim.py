"""saf_kernels.optim.SAM / ASAM in training loops: against reference implementations (the widely
used port's SAM, the official ASAM), rho = 0, exact restore, awkward parameter lists,
checkpoints, GradScaler with inf gradients, gradient accumulation, BatchNorm statistics,
closures, schedulers, fused second steps."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from saf_kernels.optim import ASAM, SAM, frozen_bn_stats

from .helpers import skip_unless_available

BACKENDS = [pytest.param("cpu", marks=[]), pytest.param("triton", marks=pytest.mark.triton), "torch"]


def _skip(backend):
    skip_unless_available(backend, "cpu", "sam_perturb_")


# ---------------------------------------------------------------------------------------------
# Reference implementations, written as their sources do
# ---------------------------------------------------------------------------------------------


class RefSAM(torch.optim.Optimizer):
    """davda54/sam's SAM (global norm, eps 1e-12), restoring with copy_ instead of rebinding."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or "old_p" not in self.state[p]:
                    continue
                p.data.copy_(self.state[p]["old_p"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


class RefASAM:
    """SamsungLabs/ASAM's ASAM (asam.py), as published."""

    def __init__(self, optimizer, model, rho=0.5, eta=0.01):
        self.optimizer, self.model, self.rho, self.eta = optimizer, model, rho, eta
        self.state = {}

    @torch.no_grad()
    def ascent_step(self):
        wgrads = []
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            t_w = self.state.setdefault(p, torch.clone(p).detach())
            if "weight" in n:
                t_w[...] = p[...]
                t_w.abs_().add_(self.eta)
                p.grad.mul_(t_w)
            wgrads.append(torch.norm(p.grad, p=2))
        wgrad_norm = torch.norm(torch.stack(wgrads), p=2) + 1.0e-16
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            t_w = self.state[p]
            if "weight" in n:
                p.grad.mul_(t_w)
            eps = t_w
            eps[...] = p.grad[...]
            eps.mul_(self.rho / wgrad_norm)
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self):
        for p in self.state:
            p.sub_(self.state[p])
        self.optimizer.step()
        self.optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------
# Models and loops
# ---------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self, bn_momentum=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=bn_momentum)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _batches(n, shape=(8, 3, 6, 6), classes=5):
    return [(torch.randn(shape), torch.randint(0, classes, (shape[0],))) for _ in range(n)]


LOSS = nn.CrossEntropyLoss()


def _two_step(opt, model, x, y, second_pass=True):
    LOSS(model(x), y).backward()
    opt.first_step(zero_grad=True)
    ctx = opt.second_pass(model) if second_pass and hasattr(opt, "second_pass") else frozen_bn_stats(model)
    with ctx:
        LOSS(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _assert_params_close(m1, m2, atol=1e-6, rtol=0.0, what=""):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda s, n=n: f"{what} {n}: {s}")


def _assert_params_equal(m1, m2, what=""):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), f"{what} {n}: max diff {(a - b).abs().max().item()}"


# ---------------------------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "adaptive"])
def test_matches_reference_sam(backend, adaptive):
    _skip(backend)
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, backend=backend, **kw)
    ref = RefSAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, **kw)
    for x, y in _batches(5):
        _two_step(opt, model, x, y)
        _two_step(ref, ref_model, x, y)
    _assert_params_close(model, ref_model, atol=1e-6, what=f"{backend} adaptive={adaptive}")


def test_asam_matches_official():
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    weights = {p for n, p in model.named_parameters() if "weight" in n}
    opt = ASAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.5,
        eta=0.01,
        adaptive_filter=lambda p: p in weights,
        perturb_eps=1e-16,
        lr=0.05,
        momentum=0.9,
    )
    base = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    ref = RefASAM(base, ref_model, rho=0.5, eta=0.01)
    for x, y in _batches(4):
        _two_step(opt, model, x, y)
        LOSS(ref_model(x), y).backward()
        ref.ascent_step()
        with frozen_bn_stats(ref_model):
            LOSS(ref_model(x), y).backward()
        ref.descent_step()
    # The official code restores with p -= eps (not bit exact): agreement to rounding.
    _assert_params_close(model, ref_model, atol=2e-6, what="ASAM")


def test_asam_default_leaves_1d_unscaled():
    """Default filter: T_w on conv/linear weights only; checked against the formula."""
    model = SmallCNN()
    x, y = _batches(1)[0]
    LOSS(model(x), y).backward()
    params = [p for p in model.parameters()]
    w0 = [p.detach().double().clone() for p in params]
    g = [p.grad.double().clone() for p in params]
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    opt.first_step()
    t = [(w.abs() + 0.01) if w.dim() > 1 else torch.ones_like(w) for w in w0]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    for p, w, ti, gi in zip(params, w0, t, g):
        torch.testing.assert_close(p.double(), w + 0.5 * ti * ti * gi / (norm + 1e-12), atol=1e-6, rtol=1e-6)
    assert opt.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)


@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
        (torch.optim.Adam, dict(lr=1e-2)),
    ],
    ids=["sgd", "adamw", "adam"],
)
def test_rho_zero_is_the_base_optimizer(base, kw):
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), base, rho=0.0, **kw)
    ref = base(ref_model.parameters(), **kw)
    for x, y in _batches(4):
        _two_step(opt, model, x, y)
        LOSS(ref_model(x), y).backward()
        ref.step()
        ref.zero_grad()
    _assert_params_equal(model, ref_model, "rho=0")
    for (n, b1), b2 in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.equal(b1, b2), n


@pytest.mark.parametrize("stash_mode", ["copy", "delta"])
def test_restore(stash_mode):
    model = SmallCNN()
    before = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, stash_mode=stash_mode)
    x, y = _batches(1)[0]
    LOSS(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    LOSS(model(x), y).backward()
    opt.second_step()  # lr = 0: the restore only
    if stash_mode == "copy":
        _assert_params_equal(model, before, "restore")
    else:
        _assert_params_close(model, before, atol=1e-6, what="delta restore")


def test_awkward_parameter_list():
    """Many small tensors, one large one of no chunk multiple, and a parameter without gradient."""

    class Awkward(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ParameterList([nn.Parameter(torch.randn(k % 7 + 1)) for k in range(40)])
            self.big = nn.Parameter(torch.randn(70001) * 0.01)
            self.unused = nn.Parameter(torch.randn(5))

        def forward(self, x):
            s = sum(p.sum() * (i + 1) * 0.01 for i, p in enumerate(self.small))
            return (x * self.big[: x.numel()].reshape(x.shape)).sum() ** 2 * 1e-3 + s**2

    model = Awkward()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.01, momentum=0.9)
    ref = RefSAM(ref_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.01, momentum=0.9)
    unused0 = model.unused.detach().clone()
    for _ in range(3):
        x = torch.randn(30, 11)
        for o, m in ((opt, model), (ref, ref_model)):
            m(x).backward()
            o.first_step(zero_grad=True)
            m(x).backward()
            o.second_step(zero_grad=True)
    _assert_params_close(model, ref_model, atol=1e-6, rtol=1e-6, what="awkward")
    assert torch.equal(model.unused, unused0)
    assert "momentum_buffer" not in opt.state[model.unused]


def test_per_group_rho():
    model = SmallCNN()
    ref_model = copy.deepcopy(model)

    def groups(m):
        return [
            {"params": [m.conv1.weight, m.conv2.weight], "rho": 0.1},
            {
                "params": [p for n, p in m.named_parameters() if n not in ("conv1.weight", "conv2.weight")],
                "rho": 0.0,
                "lr": 0.05,
            },
        ]

    opt = SAM(groups(model), torch.optim.SGD, rho=0.05, lr=0.1)
    ref = RefSAM(groups(ref_model), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in _batches(3):
        _two_step(opt, model, x, y)
        _two_step(ref, ref_model, x, y)
    _assert_params_close(model, ref_model, atol=1e-6, what="per-group rho")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base,kw,fused",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), False),
        (torch.optim.AdamW, dict(lr=1e-2), False),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9), True),
        (torch.optim.AdamW, dict(lr=1e-2), True),
        (torch.optim.Adam, dict(lr=1e-2), True),
    ],
    ids=["sgd", "adamw", "sgd-fused", "adamw-fused", "adam-fused"],
)
def test_checkpoint_round_trip(base, kw, fused):
    batches = _batches(4)
    model = SmallCNN()
    opt = SAM(model.parameters(), base, rho=0.05, fused_step=fused, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches[:2]:
        _two_step(opt, model, x, y)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    assert len(opt.state_dict()["state"]) == len(list(model.parameters())), "base optimizer state is saved"
    for x, y in batches[2:]:
        _two_step(opt, model, x, y)
        sched.step()

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = SmallCNN()
    model2.load_state_dict(ck["model"])
    opt2 = SAM(model2.parameters(), base, rho=0.05, fused_step=fused, **kw)
    opt2.load_state_dict(ck["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    for x, y in batches[2:]:
        _two_step(opt2, model2, x, y)
        sched2.step()
    _assert_params_equal(model, model2, "resumed")


# ---------------------------------------------------------------------------------------------
# AMP
# ---------------------------------------------------------------------------------------------


def _amp_step(opt, model, scaler, x, y):
    scaler.scale(LOSS(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with opt.second_pass(model):
        scaler.scale(LOSS(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


AMP_VARIANTS = [
    pytest.param(dict(), id="generic-sgd"),
    pytest.param(dict(fused=True), id="torch-fused-sgd"),
    pytest.param(dict(fused_step=True), id="fused-step"),
]


@pytest.mark.parametrize("variant", AMP_VARIANTS)
def test_grad_scaler_matches_fp32_and_skips_on_inf(variant):
    kw = dict(lr=0.1, momentum=0.9)
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **variant, **kw)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    batches = _batches(3)
    # With a power-of-two scale the unscaling is exact: AMP and fp32 agree.
    for x, y in batches:
        _amp_step(opt, model, scaler, x, y)
        _two_step(ref, ref_model, x, y)
    atol = 0.0 if not variant else 1e-6
    _assert_params_close(model, ref_model, atol=atol, what="AMP")

    # An inf in the first pass: nothing moves, and the scaler backs off.
    x, y = batches[0]
    before = copy.deepcopy(model)
    h = model.conv1.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    scaler.scale(LOSS(model(x), y)).backward()
    h.remove()
    norm = opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert not torch.isfinite(norm)
    _assert_params_equal(model, before, "perturbation after first-pass inf")
    scaler.scale(LOSS(model(x), y)).backward()
    scale0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_params_equal(model, before, "step after first-pass inf")
    assert scaler.get_scale() == scale0 / 2

    # An inf in the second pass: the weights are restored, the step skipped, the scale backs off.
    scaler.scale(LOSS(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    h = model.fc.bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    scaler.scale(LOSS(model(x), y)).backward()
    h.remove()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_params_equal(model, before, "step after second-pass inf")
    assert scaler.get_scale() == scale0 / 4
    # And training goes on.
    _amp_step(opt, model, scaler, x, y)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_grad_scaler_requires_scaler_step():
    model = SmallCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batches(1)[0]
    scaler.scale(LOSS(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(LOSS(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="grad_scaler.step"):
        opt.second_step()


# ---------------------------------------------------------------------------------------------
# Accumulation, BatchNorm, closures, schedulers
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation():
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    mse = nn.MSELoss()
    for _ in range(3):
        x, y = torch.randn(16, 12), torch.randn(16, 4)
        for xi, yi in ((x[:8], y[:8]), (x[8:], y[8:])):  # two micro-batches per pass
            (mse(model(xi), yi) / 2).backward()
        opt.first_step(zero_grad=True)
        for xi, yi in ((x[:8], y[:8]), (x[8:], y[8:])):
            (mse(model(xi), yi) / 2).backward()
        opt.second_step(zero_grad=True)
        mse(ref_model(x), y).backward()
        ref.first_step(zero_grad=True)
        mse(ref_model(x), y).backward()
        ref.second_step(zero_grad=True)
    _assert_params_close(model, ref_model, atol=1e-6, what="accumulation")


@pytest.mark.parametrize("bn_momentum", [0.1, None], ids=["ema", "cumulative"])
def test_bn_stats_from_first_pass_only(bn_momentum):
    model = SmallCNN(bn_momentum)
    probe = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for x, y in _batches(3):
        probe.load_state_dict(model.state_dict())
        probe(x)  # one clean training forward at the pre-step weights
        _two_step(opt, model, x, y)
        for (n, a), b in zip(model.named_buffers(), probe.buffers()):
            assert torch.equal(a, b), f"{n} after a SAM step differs from one clean forward"
    assert model.bn1.num_batches_tracked.item() == 3


def test_closure_matches_two_step():
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in _batches(3):

        def closure(x=x, y=y):
            loss = LOSS(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss.requires_grad is False or loss.grad_fn is not None
        _two_step(ref, ref_model, x, y)
        opt.zero_grad()
    _assert_params_equal(model, ref_model, "closure")
    for (n, a), b in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.equal(a, b), n


def test_lr_scheduler_drives_base_and_warns_nothing():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            model(torch.randn(4, 12)).sum().backward()
            opt.first_step(zero_grad=True)
            model(torch.randn(4, 12)).sum().backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
        (torch.optim.SGD, dict(lr=0.1)),
        (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
        (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99))),
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ],
    ids=["sgd-nesterov", "sgd-plain", "adamw", "adam", "adam-decoupled-wd"],
)
def test_fused_step_matches_default(base, kw):
    # An MLP, not the BN model: a bias feeding BatchNorm has a pure-rounding-noise gradient,
    # which Adam normalises to full steps, so two correct paths would diverge there.
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = SAM(model.parameters(), base, rho=0.05, fused_step=True, **kw)
    ref = SAM(ref_model.parameters(), base, rho=0.05, **kw)
    mse = nn.MSELoss()
    for _ in range(4):
        x, y = torch.randn(16, 12), torch.randn(16, 4)
        for o, m in ((opt, model), (ref, ref_model)):
            mse(m(x), y).backward()
            o.first_step(zero_grad=True)
            mse(m(x), y).backward()
            o.second_step(zero_grad=True)
    _assert_params_close(model, ref_model, atol=2e-6, rtol=1e-5, what="fused step")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        st, rst = opt.state[p], ref.state[q]
        assert set(st) == set(rst)
        for k in st:
            if isinstance(st[k], torch.Tensor):
                torch.testing.assert_close(st[k].float(), rst[k].float(), atol=2e-6, rtol=1e-5)


def test_delta_stash_bf16_trains_like_copy():
    model = SmallCNN()
    ref_model = copy.deepcopy(model)
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, stash_mode="delta", stash_dtype=torch.bfloat16
    )
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in _batches(3):
        _two_step(opt, model, x, y)
        _two_step(ref, ref_model, x, y)
    _assert_params_close(model, ref_model, atol=1e-4, what="bf16 delta stash")
    assert all(s.dtype == torch.bfloat16 for s in opt._stash.values())


def test_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="rho must be a finite number >= 0, got -0.5"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['rho'\] must be a finite number >= 0, got -1"):
        SAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="optimizer class"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="fused_step=True supports"):
        SAM(model.parameters(), torch.optim.RMSprop, fused_step=True, lr=0.1)
    with pytest.raises(ValueError, match="stash_mode"):
        SAM(model.parameters(), torch.optim.SGD, stash_mode="swap", lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="second_step\\(\\) without first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="without a closure"):
        opt.step()
    model(torch.randn(2, 12)).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    opt.step()  # finishes the step (what GradScaler.step does)
    with pytest.raises(TypeError, match="always adaptive"):
        ASAM(model.parameters(), torch.optim.SGD, adaptive=False, lr=0.1)


def test_empty_and_gradless():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    norm = opt.first_step()  # no gradients at all
    assert norm.item() == 0.0
    opt.second_step()


def test_sam_steps_callables_run():
    from saf_kernels.bench.sam_steps import step_callables

    model = SmallCNN()
    before = copy.deepcopy(model)
    x, y = _batches(1)[0]
    steps = step_callables(model, LOSS, (x, y), "cpu", extra=True)
    assert set(steps) == {"sgd", "sam", "asam", "sam+fused_step"}
    for f in steps.values():
        f()
        f()
    _assert_params_equal(model, before, "step_callables must work on copies")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the CUDA and Triton paths in a training loop, and no host syncs
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_matches_reference_and_never_syncs(backend):
    skip_unless_available(backend, "cuda", "sam_perturb_")
    dev = torch.device("cuda")
    model = SmallCNN().to(dev)
    ref_model = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **kw)
    ref = RefSAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    for x, y in _batches(4):
        x, y = x.to(dev), y.to(dev)
        _two_step(opt, model, x, y)
        _two_step(ref, ref_model, x, y)
    _assert_params_close(model, ref_model, atol=1e-5, what=f"cuda {backend}")
    # first_step / second_step enqueue work only: any synchronising call raises here.
    x, y = _batches(1)[0]
    x, y = x.to(dev), y.to(dev)
    LOSS(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_amp_fused_step_is_sync_free(backend):
    skip_unless_available(backend, "cuda", "sam_perturb_")
    dev = torch.device("cuda")
    model = SmallCNN().to(dev)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, fused_step=True, lr=0.1,
              momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    x, y = _batches(1)[0]
    x, y = x.to(dev), y.to(dev)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            scaler.scale(LOSS(model(x), y)).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with torch.autocast("cuda", dtype=torch.float16), opt.second_pass(model):
            scaler.scale(LOSS(model(x), y)).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)  # the second step with grad_scale / found_inf on the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
