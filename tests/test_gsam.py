"""GSAM: the fused decomposition (gsam_combine_ / gsam_restore_sgd_) on every backend against the
official formula in float64, and the GSAM optimizer and rho scheduler against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

from saf_kernels import ops as O

from .helpers import KERNEL_PAIRS, ce_closure, skip_unless_available

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
SHAPES = [(3, 5), (1,), (64,), (7, 7, 3), (0,), (129,), (20001,), (1000, 3)]


def _skip(backend, device, op="gsam_combine_"):
    skip_unless_available(backend, device, op)


def _make(shapes, dtype, device, n=3):
    return [[torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes] for _ in range(n)]


def official_decompose(g_p, old_g, alpha, eps=1e-12):
    """juntang-zhuang/GSAM gradient_decompose, transcribed, in float64."""
    g_p = [x.double().cpu() for x in g_p]
    old_g = [x.double().cpu() for x in old_g]
    inner_prod = sum(float((o * g).sum()) for o, g in zip(old_g, g_p))
    new_grad_norm = math.sqrt(sum(float((g * g).sum()) for g in g_p))
    old_grad_norm = math.sqrt(sum(float((o * o).sum()) for o in old_g))
    cosine = inner_prod / (new_grad_norm * old_grad_norm + eps)
    out = []
    for g, o in zip(g_p, old_g):
        vertical = o - cosine * old_grad_norm * g / (new_grad_norm + eps)
        out.append(g - alpha * vertical)
    return out, cosine, old_grad_norm, new_grad_norm


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_combine_matches_official_formula(backend, device, dtype):
    _skip(backend, device)
    params, g_p, old = _make(SHAPES, dtype, device)
    stash = [p + 1 for p in params]
    expect, cos, n_old, n_new = official_decompose(g_p, old, 0.3)
    stats = O.gsam_combine_(params, g_p, old, stash, alpha=0.3, backend=backend)
    assert stats.shape == (3,) and stats.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.double().cpu(), torch.tensor([cos, n_old, n_new], dtype=torch.float64), **tol)
    for g, e in zip(g_p, expect):
        torch.testing.assert_close(g.double().cpu(), e, **tol)
    assert all(torch.equal(p, s) for p, s in zip(params, stash)), "restore must be bit exact"


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_combine_mixed_dtypes_amp_and_skip(backend, device):
    _skip(backend, device)
    shapes = [(9,), (3000,), (4, 4)]
    g_p = [torch.randn(s, device=device) for s in shapes]
    old = [torch.randn(s, device=device) for s in shapes]
    g_p[2], old[2] = g_p[2].bfloat16(), old[2].bfloat16()
    params = [torch.randn_like(g) for g in g_p]
    expect, *_ = official_decompose(g_p, old, 0.5)
    # Scaled gradients (two scales) give the unscaled result; no restore here.
    gs = [g * 1024 for g in g_p]
    os_ = [o * 64 for o in old]
    O.gsam_combine_(params, gs, os_, alpha=0.5, restore=False, grad_scale=torch.tensor(1024.0, device=device),
                    old_grad_scale=torch.tensor(64.0, device=device), backend=backend)
    for g, e in zip(gs, expect):
        tol = 1e-5 if g.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.double().cpu(), e, rtol=tol, atol=tol)
    # found_inf: gradients untouched.
    before = [g.clone() for g in g_p]
    O.gsam_combine_(params, g_p, old, alpha=0.5, restore=False, found_inf=torch.ones((), device=device),
                    backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(g_p, before))
    # A non-finite sum without AMP: g = g_p (the decomposition is undefined).
    old[1][5] = math.inf
    O.gsam_combine_(params, g_p, old, alpha=0.5, restore=False, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(g_p, before))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("cfg", [dict(lr=0.1), dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
                                 dict(lr=0.05, momentum=0.8, dampening=0.1, maximize=True)],
                         ids=["plain", "nesterov", "damp-max"])
def test_restore_sgd_matches_combine_then_torch_sgd(backend, device, cfg):
    _skip(backend, device, "gsam_restore_sgd_")
    params, g_p, old = _make([(5,), (3, 7), (20001,)], torch.float32, device)
    clean = [p.clone() for p in params]
    stash = [p.clone() for p in params]
    perturbed = [p + 0.01 for p in params]
    ref = [c.clone().requires_grad_() for c in clean]
    opt = torch.optim.SGD(ref, **cfg, foreach=False)
    mom = cfg.get("momentum", 0.0)
    bufs = [torch.zeros_like(p) for p in params] if mom else []
    p = [x.clone() for x in perturbed]
    for step in range(3):
        expect, *_ = official_decompose(g_p, old, 0.2)
        for r, e in zip(ref, expect):
            r.grad = e.float().to(device)
        opt.step()
        O.gsam_restore_sgd_(p, g_p, old, stash, bufs, lr=cfg["lr"], alpha=0.2, weight_decay=cfg.get("weight_decay", 0),
                            momentum=mom, dampening=cfg.get("dampening", 0.0), nesterov=cfg.get("nesterov", False),
                            maximize=cfg.get("maximize", False), first_run=step == 0, backend=backend)
        for a, r in zip(p, ref):
            torch.testing.assert_close(a, r.detach(), rtol=1e-5, atol=1e-6)
        stash = [x.clone() for x in p]
        p = [x + 0.01 for x in p]
        g_p = [torch.randn_like(x) for x in g_p]
        old = [torch.randn_like(x) for x in old]
    # found_inf: the restore only, buffers untouched.
    b0 = [b.clone() for b in bufs]
    O.gsam_restore_sgd_(p, g_p, old, stash, bufs, lr=0.1, momentum=mom, found_inf=torch.ones((), device=device),
                        backend=backend)
    assert all(torch.equal(a, s) for a, s in zip(p, stash))
    assert all(torch.equal(a, b) for a, b in zip(bufs, b0))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_bad_arguments(backend, device):
    _skip(backend, device)
    p = [torch.randn(4, device=device)]
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        O.gsam_combine_(p, p, p, p, alpha=math.nan, backend=backend)
    with pytest.raises(ValueError, match="restore=True needs one stash tensor per param"):
        O.gsam_combine_(p, p, p, [], backend=backend)
    with pytest.raises(ValueError, match="old_grads has 2 tensors"):
        O.gsam_combine_(p, p, p * 2, p, backend=backend)
    with pytest.raises(ValueError, match="momentum != 0 needs momentum_buffers"):
        O.gsam_restore_sgd_(p, p, p, p, [], lr=0.1, momentum=0.9, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    _skip(backend, "cpu")
    sfx = "_" if backend == "cpu" else "_triton"
    params, g, old = _make([(5,), (3, 4)], torch.float32, "cpu")
    stash = [x.clone() for x in params]
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "gsam_combine" + sfx),
                          (params, g, old, stash, 0.4, 1e-12, 0, True, None, None, None))
    bufs = [torch.zeros_like(x) for x in params]
    torch.library.opcheck(getattr(torch.ops.saf_kernels, "gsam_restore_sgd" + sfx),
                          (params, g, old, stash, bufs, [0.1], [0.0], [0.9], [0.0], [8], 0.4, 1e-12, 0, None, None,
                           None))


# ---------------------------------------------------------------------------------------------
# The GSAM optimizer against a plain-PyTorch version of the official code
# ---------------------------------------------------------------------------------------------

import copy  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from saf_kernels.optim import GSAM, ProportionScheduler  # noqa: E402

from .optim_models import amp_sam_step, assert_same_params, batches, make_model  # noqa: E402

OPT_PAIRS = [pytest.param("cpu", id="cpu"), pytest.param("torch", id="torch"),
             pytest.param("triton", marks=pytest.mark.triton, id="triton")]


def gsam_reference_step(model, base, x, y, rho, alpha, adaptive=False, eps=1e-12):
    """juntang-zhuang/GSAM's step (perturb_weights, gradient_decompose, unperturb, base step)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    live = [p for p in params if p.grad is not None]
    old_g = [p.grad.detach().clone() for p in live]
    norm = math.sqrt(sum(float(((p.detach().abs() if adaptive else 1) * g).pow(2).sum()) for p, g in zip(live, old_g)))
    e_w = [g * rho / (norm + eps) * (p.detach() ** 2 if adaptive else 1) for p, g in zip(live, old_g)]
    with torch.no_grad():
        for p, e in zip(live, e_w):
            p.add_(e)
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    expect, *_ = official_decompose([p.grad for p in live], old_g, alpha, eps)
    with torch.no_grad():
        for p, e, g in zip(live, e_w, expect):
            p.sub_(e)
            p.grad.copy_(g)
    base.step()


@pytest.mark.parametrize("backend", OPT_PAIRS)
@pytest.mark.parametrize("base_cfg", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                      (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))], ids=["sgd", "adamw"])
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_gsam_matches_reference(backend, base_cfg, fused):
    _skip(backend, "cpu")
    base_cls, kw = base_cfg
    model, ref = make_model(), make_model()
    sched = ProportionScheduler(max_lr=kw["lr"], min_lr=0.0, max_value=0.1, min_value=0.02)
    opt = GSAM(model.parameters(), base_cls, alpha=0.3, rho_scheduler=sched, fused_step=fused, adaptive=fused,
               backend=backend, **kw)
    base = base_cls(ref.parameters(), **kw)
    for i, (x, y) in enumerate(batches(3)):
        lr = kw["lr"] * (1 - 0.3 * i)
        for g in opt.param_groups + base.param_groups:
            g["lr"] = lr
        opt.step(ce_closure(opt, model, x, y))
        gsam_reference_step(ref, base, x, y, sched(lr, i), 0.3, adaptive=fused)
        tol = dict(rtol=1e-10, atol=1e-12) if not fused else dict(rtol=1e-9, atol=1e-11)
        assert_same_params(model, ref, what=f"{backend} step {i}", **tol)
    stats = opt.last_stats
    assert stats.shape == (3,) and -1 <= stats[0] <= 1


def test_gsam_alpha_zero_is_sam_and_first_grads_are_not_copied():
    from saf_kernels.optim import SAM

    model, twin = make_model(), make_model()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.0, lr=0.1)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in batches(2):
        F.cross_entropy(model(x), y).backward()
        grads = {p: p.grad for p in model.parameters() if p.grad is not None}
        opt.first_step(zero_grad=False)
        assert all(p.grad is None for p in grads)  # taken out of .grad ...
        assert all(opt._old_g[p] is g for p, g in grads.items())  # ... and kept as they are
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sam.step(ce_closure(sam, twin, x, y))
    assert_same_params(model, twin, rtol=1e-12, atol=1e-14, what="alpha=0")


def test_gsam_amp_and_resume():
    data = batches(4)
    m1, m2 = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    o1 = GSAM(m1.parameters(), torch.optim.SGD, alpha=0.2, lr=0.05, momentum=0.9)
    o2 = GSAM(m2.parameters(), torch.optim.SGD, alpha=0.2, lr=0.05, momentum=0.9, fused_step=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in data[:2]:
        x = x.float()
        o1.step(ce_closure(o1, m1, x, y))
        o2.zero_grad()
        amp_sam_step(o2, m2, scaler, x, y)
    assert_same_params(m1, m2, rtol=1e-5, atol=1e-6, what="amp")
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    for x, y in data[2:]:
        o1.step(ce_closure(o1, m1, x.float(), y))
    m3 = make_model(dtype=torch.float32, seed=3)
    o3 = GSAM(m3.parameters(), torch.optim.SGD, alpha=0.2, lr=0.05, momentum=0.9)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    for x, y in data[2:]:
        o3.step(ce_closure(o3, m3, x.float(), y))
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)


def test_gsam_bad_arguments():
    m = make_model()
    with pytest.raises(ValueError, match="rho must be a finite number >= 0, got -0.5"):
        GSAM(m.parameters(), torch.optim.SGD, rho=-0.5, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be a finite number, got inf"):
        GSAM(m.parameters(), torch.optim.SGD, alpha=math.inf, lr=0.1)
    with pytest.raises(TypeError, match="rho_scheduler must be callable"):
        GSAM(m.parameters(), torch.optim.SGD, rho_scheduler=0.1, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be the same for every group"):
        GSAM([{"params": [m.l1.weight], "alpha": 0.1}, {"params": [m.l2.weight]}], torch.optim.SGD, lr=0.1)
