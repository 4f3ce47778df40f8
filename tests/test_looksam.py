"""LookSAM: the ops (looksam_gv_, looksam_combine_) on every backend against the formula in
float64, and the optimizer against a plain-PyTorch transcription of its rule over several steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saf_kernels import ops as O
from saf_kernels.ops import _multi_tensor as mt
from saf_kernels.optim import SAM, LookSAM

from .cheap_common import assert_resume_bit_identical, closure
from .helpers import KERNEL_PAIRS, skip_unless_available
from .optim_models import amp_sam_step, assert_same_params, batches, make_model

PAIRS = KERNEL_PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]
SHAPES = [(3, 5), (1,), (7, 7, 3), (129,), (20001,)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _lists(dtype, device, n):
    return [[torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in SHAPES] for _ in range(n)]


def _flat(ts):
    return torch.cat([t.double().cpu().reshape(-1) for t in ts])


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gv_and_combine_match_formula(backend, device, dtype):
    skip_unless_available(backend, device, "looksam_gv_")
    gs, g, gv = _lists(dtype, device, 3)
    gs0, g0 = _flat(gs), _flat(g)
    nrm = torch.zeros((), device=device)
    stats = O.looksam_gv_(gv, nrm, gs, g, backend=backend)
    want = gs0 - (gs0 @ g0) / (g0 @ g0) * g0
    torch.testing.assert_close(_flat(gv), want, **TOL[dtype])
    torch.testing.assert_close(float(nrm), float(_flat(gv).norm()), rtol=1e-4, atol=0)  # of gv as stored
    cos = float(gs0 @ g0 / (gs0.norm() * g0.norm()))
    torch.testing.assert_close(stats.double().cpu(), torch.tensor([cos, float(g0.norm()), float(gs0.norm())],
                                                                  dtype=torch.float64), rtol=1e-4, atol=1e-6)
    # The reuse direction, scaled gradients (AMP) give the same direction times the scale.
    new, = _lists(dtype, device, 1)
    n0 = _flat(new)
    scaled = [(t.double() * 1024).to(dtype) for t in new]
    ng = O.looksam_combine_(new, gv, nrm, 0.7, backend=backend)
    O.looksam_combine_(scaled, gv, nrm, 0.7, backend=backend)
    gv0 = _flat(gv)
    want = n0 + 0.7 * n0.norm() / (float(nrm) + 1e-8) * gv0
    torch.testing.assert_close(_flat(new), want, **TOL[dtype])
    torch.testing.assert_close(_flat(scaled) / 1024, want, **TOL[dtype])
    torch.testing.assert_close(float(ng), float(n0.norm()), rtol=1e-4, atol=0)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_non_finite_leaves_state(backend, device):
    skip_unless_available(backend, device, "looksam_gv_")
    gs, g, gv = _lists(torch.float32, device, 3)
    before = [t.clone() for t in gv]
    nrm = torch.full((), 3.0, device=device)
    gs[0][0] = math.inf  # an AMP overflow in the second pass
    O.looksam_gv_(gv, nrm, gs, g, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(gv, before)) and float(nrm) == 3.0
    # No g_v yet (|g_v| = 0): the reuse step is the plain gradient.
    g2 = [t.clone() for t in g]
    O.looksam_combine_(g2, gv, torch.zeros((), device=device), 0.7, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(g2, g))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_awkward_lists_match_formula(backend, device):
    """float16, bfloat16, float32 and float64 tensors in one list, transposed (dense, not contiguous)
    views, an empty tensor and one across a CPU chunk, against the formula in float64; an empty list
    touches nothing."""
    skip_unless_available(backend, device, "looksam_gv_")
    gen = torch.Generator().manual_seed(15)
    shapes = [(5, 3), (0,), (16385,), (4, 6), (1,)]
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]

    def make():
        out = []
        for s, d in zip(shapes, dtypes):
            t = torch.randn(s[::-1], generator=gen, dtype=torch.float64).to(device=device, dtype=d)
            out.append(t.t() if len(s) == 2 else t)  # transposed views
        return out

    gs, g, gv, new = make(), make(), make(), make()
    gs0, g0, n0 = _flat(gs), _flat(g), _flat(new)
    nrm = torch.zeros((), device=device)
    O.looksam_gv_(gv, nrm, gs, g, backend=backend)
    want = gs0 - (gs0 @ g0) / (g0 @ g0) * g0
    torch.testing.assert_close(_flat(gv), want, rtol=1e-2, atol=1e-2)  # float16 / bfloat16 rounding
    torch.testing.assert_close(float(nrm), float(_flat(gv).norm()), rtol=1e-5, atol=0)
    O.looksam_combine_(new, gv, nrm, 0.7, backend=backend)
    torch.testing.assert_close(_flat(new), n0 + 0.7 * n0.norm() / (float(nrm) + 1e-8) * _flat(gv), rtol=1e-2,
                               atol=1e-2)
    nrm.fill_(2.0)
    assert O.looksam_gv_([], nrm, [], [], backend=backend).tolist() == [0.0, 0.0, 0.0] and float(nrm) == 2.0
    assert float(O.looksam_combine_([], [], nrm, 0.7, backend=backend)) == 0.0


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    skip_unless_available(backend, "cpu", "looksam_gv_")
    gs, g, gv = _lists(torch.float32, "cpu", 3)
    nrm = torch.zeros(())
    torch.library.opcheck(mt.kernels("looksam_gv_")[backend], (gv, nrm, gs, g, 1e-12))
    torch.library.opcheck(mt.kernels("looksam_combine_")[backend], (gs, gv, nrm, 0.7, 1e-8))


def looksam_reference_step(model, base, t, k, rho, alpha, state, x, y):
    """LookSAM's rule in plain PyTorch (float64, global norms)."""
    params = [p for p in model.parameters()]
    base.zero_grad()
    F.cross_entropy(model(x), y).backward()
    live = [p for p in params if p.grad is not None]
    g = [p.grad.clone() for p in live]
    with torch.no_grad():
        if t % k == 0:
            n = sum((a * a).sum() for a in g).sqrt()
            old = [p.clone() for p in live]
            for p, a in zip(live, g):
                p.add_(rho * a / (n + 1e-12))
            base.zero_grad()
            with torch.enable_grad():
                F.cross_entropy(model(x), y).backward()
            gs = [p.grad.clone() for p in live]
            for p, o in zip(live, old):
                p.copy_(o)
            c = sum((a * b).sum() for a, b in zip(g, gs)) / sum((a * a).sum() for a in g)
            state["gv"] = [b - c * a for a, b in zip(g, gs)]
            state["n"] = sum((v * v).sum() for v in state["gv"]).sqrt()
        else:
            ng = sum((a * a).sum() for a in g).sqrt()
            for p, a, v in zip(live, g, state["gv"]):
                p.grad = a + alpha * ng / (state["n"] + 1e-8) * v
    base.step()


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("base_cfg", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                      (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))], ids=["sgd", "adamw"])
def test_looksam_matches_reference(backend, base_cfg):
    skip_unless_available(backend, "cpu", "looksam_gv_")
    base_cls, kw = base_cfg
    model, ref = make_model(), make_model()
    opt = LookSAM(model.parameters(), base_cls, rho=0.1, k=3, alpha=0.7, backend=backend, **kw)
    base = base_cls(ref.parameters(), **kw)
    state = {}
    for t, (x, y) in enumerate(batches(5)):
        cl = closure(opt, model, x, y)
        assert opt.sam_step == (t % 3 == 0)
        opt.step(cl)
        assert len(cl.calls) == (2 if t % 3 == 0 else 1)
        looksam_reference_step(ref, base, t, 3, 0.1, 0.7, state, x, y)
        assert_same_params(model, ref, rtol=1e-9, atol=1e-11, what=f"{backend} step {t}")


def test_k1_is_sam_exactly():
    model, twin = make_model(), make_model()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=1, lr=0.1, momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in batches(3):
        opt.step(closure(opt, model, x, y))
        sam.step(closure(sam, twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_plain_loop_and_amp():
    """The documented loop (sam_step, first_step, second_step) with a GradScaler equals the
    closure form without one, to float32 rounding."""
    data = batches(4)
    m1, m2 = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    o1 = LookSAM(m1.parameters(), torch.optim.SGD, k=2, lr=0.05, momentum=0.9)
    o2 = LookSAM(m2.parameters(), torch.optim.SGD, k=2, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in data:
        x = x.float()
        o1.step(closure(o1, m1, x, y))
        o2.zero_grad()
        amp_sam_step(o2, m2, scaler, x, y)
    assert_same_params(m1, m2, rtol=1e-4, atol=1e-5, what="amp")


def test_first_step_on_a_reuse_step_is_an_error():
    model = make_model()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    (x, y), = batches(1)
    opt.step(closure(opt, model, x, y))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="check opt.sam_step"):
        opt.first_step()


def test_resume_bit_identical():
    def step(o, m, x, y):
        o.step(closure(o, m, x, y))

    assert_resume_bit_identical(lambda m: LookSAM(m.parameters(), torch.optim.SGD, k=3, lr=0.05, momentum=0.9),
                                make_model, batches(7), 4, step)
