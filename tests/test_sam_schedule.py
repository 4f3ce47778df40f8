"""SAM on a schedule (``every=k``, the AE-SAM adaptive policy) and on a subset of the parameters
(``perturb_filter``), for the two-pass optimizers, against plain-PyTorch oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saf_kernels.optim import ESAM, GSAM, SAM, AdaptivePolicy, norm_layer_filter

from .cheap_common import assert_resume_bit_identical, closure
from .optim_models import assert_same_params, batches, make_model


def _sam(model, **kw):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, **kw)


def test_every_1_is_sam():
    m1, m2 = make_model(), make_model()
    o1, o2 = _sam(m1, every=1), _sam(m2)
    for x, y in batches(3):
        o1.step(closure(o1, m1, x, y))
        o2.step(closure(o2, m2, x, y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SAM, GSAM])
def test_every_k_matches_sam_and_base_steps(cls):
    """SAM on steps t with (t + 1) % 3 == 0 (Composer's interval), the base step on the others:
    the oracle is the same optimizer with every=1 on SAM steps and its base optimizer alone
    on the others."""
    m1, m2 = make_model(), make_model()
    kw = dict(rho=0.1, lr=0.05, momentum=0.9)
    o1 = cls(m1.parameters(), torch.optim.SGD, every=3, **kw)
    o2 = cls(m2.parameters(), torch.optim.SGD, **kw)
    for t, (x, y) in enumerate(batches(7)):
        cl = closure(o1, m1, x, y)
        assert o1.sam_step == ((t + 1) % 3 == 0)
        o1.step(cl)
        assert len(cl.calls) == (2 if (t + 1) % 3 == 0 else 1)
        if (t + 1) % 3 == 0:
            o2.step(closure(o2, m2, x, y))
        else:
            o2.zero_grad()
            F.cross_entropy(m2(x), y).backward()
            o2.base_optimizer.step()
        assert_same_params(m1, m2, rtol=1e-12, atol=1e-14, what=f"step {t}")
    assert o1.steps_done == 7


def test_plain_loop_with_amp_on_a_schedule():
    m = make_model(dtype=torch.float32)
    opt = _sam(m, every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    kinds = []
    for x, y in batches(4):
        x = x.float()
        opt.zero_grad()
        scaler.scale(F.cross_entropy(m(x), y)).backward()
        kinds.append(opt.sam_step)
        if opt.sam_step:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(F.cross_entropy(m(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert kinds == [False, True, False, True] and opt.steps_done == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())


def policy_reference(sq_norms, delta, c_start, c_end, total):
    """AE-SAM's rule in float64 Python: decision for step t+1 from step t's statistics."""
    mu = var = None
    out = [True]
    for t, s in enumerate(sq_norms):
        if mu is None:
            mu, var = s, 0.0
        else:
            mu = delta * mu + (1 - delta) * s
            var = delta * var + (1 - delta) * (s - mu) ** 2
        c = c_start + (c_end - c_start) * min(t / total, 1.0)
        out.append(s >= mu + c * math.sqrt(var))
    return out


def test_adaptive_policy_matches_reference():
    m = make_model()
    pol = AdaptivePolicy(delta=0.8, c_start=-0.5, c_end=0.5, total_steps=6)
    opt = _sam(m, policy=pol)
    norms, taken = [], []
    for x, y in batches(8):
        taken.append(opt.sam_step)
        opt.step(closure(opt, m, x, y, record=norms))
    want = policy_reference([n * n for n in norms], 0.8, -0.5, 0.5, 6)
    assert taken == want[:len(taken)]
    assert True in taken and False in taken  # both kinds of step happened


def test_policy_and_every_resume_bit_identical():
    def step(o, m, x, y):
        o.step(closure(o, m, x, y))

    data = batches(7)
    assert_resume_bit_identical(lambda m: _sam(m, every=3), make_model, data, 4, step)
    assert_resume_bit_identical(lambda m: _sam(m, policy=AdaptivePolicy(total_steps=7)), make_model, data, 3, step)


def test_filter_perturbs_only_the_selected_tensors():
    """SAM-ON: only the normalisation parameters move in the first step; every parameter gets
    the base step with the second gradient; the norm is over the selected tensors only. No ``model`` is given, so
    BatchNorm's statistics move in both passes on both sides."""
    m1, m2 = make_model(bn=True), make_model(bn=True)
    sel = norm_layer_filter(m1)
    assert sel(m1.bn.weight) and sel(m1.bn.bias) and not sel(m1.l1.weight)
    o1 = _sam(m1, perturb_filter=sel)
    base = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(3):
        o1.step(closure(o1, m1, x, y))
        base.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        norm_ps = [m2.bn.weight, m2.bn.bias]
        n = math.sqrt(sum(float((p.grad ** 2).sum()) for p in norm_ps))
        saved = [p.detach().clone() for p in norm_ps]
        with torch.no_grad():
            for p in norm_ps:
                p.add_(0.1 * p.grad / (n + 1e-12))
        base.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        with torch.no_grad():
            for p, s in zip(norm_ps, saved):
                p.copy_(s)
        base.step()
        assert_same_params(m1, m2, rtol=1e-10, atol=1e-12, what="SAM-ON")


def test_filter_on_gsam_and_bad_schedules():
    m = make_model(bn=True)
    opt = GSAM(m.parameters(), torch.optim.SGD, lr=0.05, perturb_filter=lambda p: p.dim() == 1)
    for x, y in batches(2):
        opt.step(closure(opt, m, x, y))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with pytest.raises(ValueError, match="ESAM runs its own step logic"):
        ESAM(m.parameters(), torch.optim.SGD, lr=0.1, every=2)
    with pytest.raises(ValueError, match="either every=2 or a policy"):
        _sam(m, every=2, policy=AdaptivePolicy())
    o = _sam(m, every=2)
    (x, y), = batches(1)
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="check opt.sam_step"):
        o.first_step()
