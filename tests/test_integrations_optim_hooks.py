"""What the trainer integrations need from the optimizers (saf_kernels/optim): begin_step() (R-SAM's
noise before the first micro-batch, idempotent; nothing for the others), the `perturbed`
property, and step() without a closure naming the integrations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from .integrations_common import OPTIMIZERS, make_data, make_net


@pytest.mark.parametrize("name", ["sam", "asam", "esam", "gsam"])
def test_begin_step_is_a_no_op_for_the_others(name):
    net = make_net(bn=False)
    opt = OPTIMIZERS[name](net.parameters())
    before = copy.deepcopy(net.state_dict())
    opt.begin_step()
    opt.begin_step()
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())
    assert not opt.perturbed


def test_rsam_begin_step_noises_once_and_equals_step_closure():
    x, y = make_data(16)
    a, b = make_net(bn=False), make_net(bn=False)
    oa, ob = OPTIMIZERS["rsam"](a.parameters()), OPTIMIZERS["rsam"](b.parameters())
    w0 = [p.detach().clone() for p in a.parameters()]
    oa.begin_step()
    noised = [p.detach().clone() for p in a.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(noised, w0))
    oa.begin_step()  # already noised: nothing
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), noised))
    F.cross_entropy(a(x), y).backward()
    oa.first_step(zero_grad=True)
    assert oa.perturbed
    oa.begin_step()  # perturbed: nothing either
    F.cross_entropy(a(x), y).backward()
    oa.step()
    assert not oa.perturbed

    def closure():
        ob.zero_grad()
        loss = F.cross_entropy(b(x), y)
        loss.backward()
        return loss

    ob.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_perturbed_and_the_error_without_closure():
    x, y = make_data(8)
    net = make_net(bn=False)
    opt = OPTIMIZERS["sam"](net.parameters())
    with pytest.raises(RuntimeError, match="SharpnessAwareCallback.*SharpnessAwareTrainer"):
        opt.step()
    F.cross_entropy(net(x), y).backward()
    assert not opt.perturbed
    opt.first_step(zero_grad=True)
    assert opt.perturbed
    F.cross_entropy(net(x), y).backward()
    opt.second_step()
    assert not opt.perturbed
