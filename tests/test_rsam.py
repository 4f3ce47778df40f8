"""R-SAM: the fused filter-wise noise and ascent (rsam_noise_ / rsam_perturb_) on every backend
against float64, and the RSAM optimizer against a plain-PyTorch version of its published rule."""

from __future__ import annotations

import math

import pytest
import torch

from saf_kernels import ops as O
from saf_kernels import reference

from .helpers import KERNEL_PAIRS, ce_closure, skip_unless_available

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}
# Conv and linear weights of odd sizes, 1-D params, a 0-dim one, an empty one, a long unit
# (>= 2048 elements: the CUDA kernel's block-per-unit path) and many short ones.
SHAPES = [(3, 5), (1,), (64,), (7, 7, 3), (0,), (), (129,), (3, 2500), (1000, 3), (4, 3, 3, 3), (8, 1, 1)]


def _skip(backend, device, op="rsam_noise_"):
    skip_unless_available(backend, device, op)


def _make(shapes, dtypes, device):
    params = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]
    return params, grads


def _noise64(params, std, seed, offset):
    """delta from the rule, in float64: std * ||W[j, ...]|| * z (1-D: std * (||p|| + 1e-16) * z),
    z the Philox normals of each element's position (generator checked in tests/test_philox.py)."""
    out, base = [], 0
    for p, s in zip(params, std):
        w = p.detach().double().cpu()
        n = w.numel()
        if w.dim() >= 2:
            scale = s * w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).expand(w.shape[0], n // w.shape[0])
        else:
            scale = (s * (w.norm() + 1e-16)).expand(n)
        pos = base + torch.arange(n, dtype=torch.int64)
        out.append(scale.reshape(-1) * reference.philox_normal(pos, seed, offset))
        base += (n + 3) // 4 * 4
    return out


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "mixed"])
def test_noise_matches_rule(backend, device, mixed):
    _skip(backend, device)
    cycle = [torch.float32, torch.bfloat16, torch.float32, torch.float16] if mixed else [torch.float32]
    dtypes = [cycle[i % len(cycle)] for i in range(len(SHAPES))]
    params, _ = _make(SHAPES, dtypes, device)
    orig = [p.clone() for p in params]
    stash = [torch.empty_like(p) for p in params]
    std = [0.01 * (1 + i % 3) for i in range(len(params))]  # per-tensor std
    expect = _noise64(params, std, 99, 7)
    O.rsam_noise_(params, stash, std, 99, 7, backend=backend)
    for i, (p, o, s, d) in enumerate(zip(params, orig, stash, expect)):
        assert torch.equal(s, o), "the stash holds the weights before the noise"
        got = p.double().cpu().reshape(-1)
        want = o.double().cpu().reshape(-1) + d
        # One rounding of w + delta to the param's dtype, plus float32 normals (a few ulps).
        tol = 2 * ULP[p.dtype] * want.abs() + 1e-5 * d.abs() + 1e-30
        assert ((got - want).abs() <= tol).all(), f"{backend} tensor {i} {p.dtype} {tuple(p.shape)}"


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_distinct_streams_per_tensor(backend, device):
    """Two tensors of the same shape get different draws (the official code's one key for every
    tensor gives them the same standard normals), and so do two steps (seeds)."""
    _skip(backend, device)
    w = torch.randn(4, 50, device=device)
    params = [w.clone(), w.clone()]
    O.rsam_noise_(params, [torch.empty_like(w), torch.empty_like(w)], 0.01, 8, backend=backend)
    z0, z1 = params[0] - w, params[1] - w  # same unit norms: equal iff the normals are equal
    assert (z0 - z1).abs().max() > 1e-3 * z0.abs().max()
    again = [w.clone()]
    O.rsam_noise_(again, [torch.empty_like(w)], 0.01, 9, backend=backend)
    assert (again[0] - w - z0).abs().max() > 1e-3 * z0.abs().max()


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_noise_unit_norms_and_statistics(backend, device):
    """Each output unit's noise has standard deviation std * ||W[j]|| (a statistical check that
    cannot pass with a per-tensor scale or with the wrong axis)."""
    _skip(backend, device)
    w = torch.randn(6, 20000, device=device) * torch.tensor([0.1, 1, 3, 0.5, 2, 10], device=device)[:, None]
    p = [w.clone()]
    O.rsam_noise_(p, [torch.empty_like(w)], 0.001, 3, backend=backend)
    d = (p[0] - w).double()
    ratio = d.std(dim=1) / (0.001 * w.double().norm(dim=1))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.03), ratio


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_perturb_matches_rule(backend, device):
    _skip(backend, device, "rsam_perturb_")
    dtypes = [torch.float32, torch.bfloat16, torch.float64][:1] * len(SHAPES)
    params, grads = _make(SHAPES, dtypes, device)
    stash = [torch.empty_like(p) for p in params]
    O.rsam_noise_(params, stash, 0.01, 5, backend="torch")
    noisy = [p.clone() for p in params]
    rho = [0.05 + 0.01 * (i % 2) for i in range(len(params))]
    norm = O.rsam_perturb_(params, grads, stash, rho, lam=2.0, backend=backend)
    d = [2.0 * g.double() + (n.double() - s.double()) for g, n, s in zip(grads, noisy, stash)]
    nd = math.sqrt(sum(float((x * x).sum()) for x in d))
    assert norm.item() == pytest.approx(nd, rel=1e-5)
    for p, s, x, r in zip(params, stash, d, rho):
        torch.testing.assert_close(p.double(), s.double() + r * x / (nd + 1e-12), rtol=3e-7, atol=1e-7)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_perturb_amp_and_nonfinite(backend, device):
    _skip(backend, device, "rsam_perturb_")
    params, grads = _make([(9,), (30, 100)], [torch.float32] * 2, device)
    stash = [torch.empty_like(p) for p in params]
    O.rsam_noise_(params, stash, 0.01, 5, backend="torch")
    noisy = [p.clone() for p in params]
    a = [p.clone() for p in params]
    n1 = O.rsam_perturb_(a, grads, stash, 0.1, backend=backend)
    b = [p.clone() for p in noisy]
    n2 = O.rsam_perturb_(b, [g * 256 for g in grads], stash, 0.1, grad_scale=torch.tensor(256.0, device=device),
                         backend=backend)
    assert n2.item() == pytest.approx(n1.item(), rel=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7)
    # found_inf, or an inf gradient: back to the clean weights, bit exact.
    c = [p.clone() for p in noisy]
    O.rsam_perturb_(c, grads, stash, 0.1, found_inf=torch.ones((), device=device), backend=backend)
    assert all(torch.equal(x, s) for x, s in zip(c, stash))
    g = [x.clone() for x in grads]
    g[1][3, 7] = math.inf
    c = [p.clone() for p in noisy]
    assert not math.isfinite(O.rsam_perturb_(c, g, stash, 0.1, backend=backend).item())
    assert all(torch.equal(x, s) for x, s in zip(c, stash))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_bad_arguments(backend, device):
    _skip(backend, device)
    p, s = [torch.randn(4, 3, device=device)], [torch.empty(4, 3, device=device)]
    with pytest.raises(ValueError, match=r"std\[0\] must be >= 0, got -0.1"):
        O.rsam_noise_(p, s, -0.1, 0, backend=backend)
    with pytest.raises(ValueError, match="output unit"):
        w = torch.randn(3, 4, device=device).t()  # dim 0 is not the outer dimension in memory
        O.rsam_noise_([w], [torch.empty_like(w)], 0.1, 0, backend=backend)
    with pytest.raises(ValueError, match=r"rho\[0\] must be >= 0, got -1"):
        O.rsam_perturb_(p, p, s, -1, backend=backend)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        O.rsam_perturb_(p, p, s, 0.1, lam=math.nan, backend=backend)


def test_channels_last_units():
    """A channels_last conv weight keeps W[j] contiguous: accepted, same noise per unit norm."""
    _skip("cpu", "cpu")
    w = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    p = [w.clone()]
    O.rsam_noise_(p, [torch.empty_like(w)], 0.01, 4, backend="cpu")
    q = [w.clone()]
    O.rsam_noise_(q, [torch.empty_like(w)], 0.01, 4, backend="torch")
    torch.testing.assert_close(p[0], q[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    _skip(backend, "cpu")
    sfx = "_" if backend == "cpu" else "_triton"
    params, grads = _make([(5,), (3, 4)], [torch.float32, torch.float32], "cpu")
    stash = [p - 0.01 for p in params]  # rsam_perturb_ reads it: never uninitialised memory
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "rsam_noise" + sfx),
                          (params, [torch.empty_like(p) for p in params], [0.01, 0.02], 3, 0))
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "rsam_perturb" + sfx),
                          (params, grads, stash, [0.05], 2.0, 1e-12, None, None))


# ---------------------------------------------------------------------------------------------
# The RSAM optimizer against a plain-PyTorch version of the official rule
# ---------------------------------------------------------------------------------------------

import copy  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from saf_kernels.optim import RSAM, CosineIncrease, ProportionScheduler  # noqa: E402
from saf_kernels.optim._rng import step_key  # noqa: E402

from .optim_models import amp_sam_step, assert_same_params, batches, make_model  # noqa: E402

OPT_PAIRS = [pytest.param("cpu", id="cpu"), pytest.param("torch", id="torch"),
             pytest.param("triton", marks=pytest.mark.triton, id="triton")]


def rsam_reference_step(model, base, x, y, rho, std, lam, key, eps=1e-12):
    """One step of vit_jax/train.py's R-SAM, in PyTorch, with distinct noise per tensor."""
    params = list(model.parameters())
    delta = reference.rsam_noise(params, [std] * len(params), key, 0)
    clean = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d.view_as(p))
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    live = [(p, c, d) for p, c, d in zip(params, clean, delta) if p.grad is not None]
    ds = [lam * p.grad.reshape(-1).detach() + d for p, _, d in live]
    norm = math.sqrt(sum(float((v * v).sum()) for v in ds))
    with torch.no_grad():
        for p, c in zip(params, clean):
            p.copy_(c)
        for (p, _c, _), v in zip(live, ds):
            p.add_((rho * v / (norm + eps)).view_as(p))
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, c in zip(params, clean):
            p.copy_(c)
    base.step()


@pytest.mark.parametrize("backend", OPT_PAIRS)
def test_rsam_matches_reference(backend):
    _skip(backend, "cpu")
    model, ref = make_model(), make_model()
    sched = ProportionScheduler(max_lr=0.1, min_lr=0.0, max_value=0.2, min_value=0.05)
    opt = RSAM(model.parameters(), torch.optim.SGD, rho_scheduler=sched, noise_std=(5e-4, 2.5e-3), total_steps=4,
               seed=11, backend=backend, lr=0.1, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    std_sched = CosineIncrease(5e-4, 2.5e-3, 4)
    for i, (x, y) in enumerate(batches(4)):
        lr = base.param_groups[0]["lr"]
        opt.step(ce_closure(opt, model, x, y))
        assert opt.last_rho[0] == pytest.approx(sched(lr, i)) and opt.last_std == pytest.approx(std_sched(i))
        rsam_reference_step(ref, base, x, y, sched(lr, i), std_sched(i), 2.0, step_key(11, i))
        lr_sched.step()
        for g in base.param_groups:
            g["lr"] *= 0.5
        # The kernels' float32 normals differ from the float64 oracle's by ~1e-7 of the noise.
        assert_same_params(model, ref, rtol=1e-9, atol=1e-10, what=f"{backend} step {i}")
    assert model.unused.grad is None


def test_rsam_manual_api_amp_and_errors():
    model = make_model(dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = batches(1)[0]
    x = x.float()
    opt = RSAM(model.parameters(), torch.optim.SGD, seed=2, lr=0.1)
    o2 = RSAM(twin.parameters(), torch.optim.SGD, seed=2, lr=0.1)
    with pytest.raises(RuntimeError, match="call noise_step"):
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
    opt.zero_grad()
    opt._perturbed = None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.noise_step()
    amp_sam_step(opt, model, scaler, x, y)
    o2.step(ce_closure(o2, twin, x, y))
    assert_same_params(model, twin, rtol=1e-5, atol=1e-7, what="amp")
    for kw, msg in ((dict(rho=-1.0), "rho must be a finite number >= 0, got -1.0"),
                    (dict(noise_std=(1e-3, 2e-3)), "needs total_steps"), (dict(noise_std=-1.0), "got -1.0"),
                    (dict(lam=math.inf), "lam must be a finite number")):
        with pytest.raises(ValueError, match=msg):
            RSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_rsam_resume_is_exact():
    data = batches(4)
    m1 = make_model()
    o1 = RSAM(m1.parameters(), torch.optim.SGD, seed=4, noise_std=(1e-3, 2e-3), total_steps=4, lr=0.05, momentum=0.9)
    for x, y in data[:2]:
        o1.step(ce_closure(o1, m1, x, y))
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    for x, y in data[2:]:
        o1.step(ce_closure(o1, m1, x, y))
    m2 = make_model(seed=5)
    o2 = RSAM(m2.parameters(), torch.optim.SGD, seed=123, noise_std=(1e-3, 2e-3), total_steps=4, lr=0.05,
              momentum=0.9)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    for x, y in data[2:]:
        o2.step(ce_closure(o2, m2, x, y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_schedulers():
    s = ProportionScheduler(max_lr=1.6, min_lr=0.016, max_value=0.04, min_value=0.02)
    assert s(1.6, 0) == pytest.approx(0.04) and s(0.016, 9) == pytest.approx(0.02)
    assert s(0.808, 3) == pytest.approx(0.03)
    assert s(5.0, 0) == pytest.approx(0.04)  # clamped
    w = ProportionScheduler(max_lr=3e-3, min_lr=3e-5, max_value=2.5, min_value=1.5, warmup_steps=10000)
    assert w(1.5e-3, 10) == pytest.approx(1.25)  # warm-up: lr / lr_max * rho_max
    assert w(3e-5, 20000) == pytest.approx(1.5)
    c = CosineIncrease(5e-4, 2.5e-3, 93834)
    assert c(0) == pytest.approx(5e-4) and c(93834) == pytest.approx(2.5e-3) and c(10**6) == pytest.approx(2.5e-3)
    assert c(46917) == pytest.approx(0.0005 * (1 + 4 * 0.5))
    with pytest.raises(ValueError, match="max_lr must be > min_lr"):
        ProportionScheduler(max_lr=0.1, min_lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        CosineIncrease(0, 1, 0)
