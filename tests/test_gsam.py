"""GSAM: the fused decomposition (gsam_combine_ / gsam_restore_sgd_) on every backend against the
official formula in float64, and the GSAM optimizer and rho scheduler against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

from saf_kernels import ops as O

from .helpers import KERNEL_PAIRS, skip_unless_available

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
