"""SAT on the library's own optimizers: a tiny MRR network trains for a few steps,
deterministically under a seed; one SAT step equals the paper's step (davda54's adaptive SAM on
the controls with a base Adam) computed by hand; ``rho = 0`` is exactly the base optimizer;
the model-free step inside SAT resets the device; parameter groups by role."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saf_kernels import physical as P
from saf_kernels.optim import ASAM, SAM

D64 = torch.float64


class TinyMRR(nn.Module):
    def __init__(self):
        super().__init__()
        # No bias before BatchNorm (its gradient is zero up to rounding, which Adam would amplify).
        self.fc1, self.bn, self.fc2 = P.MRRLinear(12, 8, bias=False), nn.BatchNorm1d(8), P.MRRLinear(8, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _data(n=6, seed=0, dtype=torch.float32):
    """Batches labelled by a fixed random linear teacher (learnable)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(12, 4, generator=g, dtype=dtype)
    xs = [torch.randn(16, 12, generator=g, dtype=dtype) for _ in range(n)]
    return [(x, (x @ teacher).argmax(1)) for x in xs]


def _train_sat(seed, steps=6, rho=0.5, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    net = TinyMRR().to(dtype)
    opt = SAM(net.parameters(), torch.optim.Adam, rho=rho, adaptive=True, lr=0.01, model=net, **kw)
    batches = (_data(6, dtype=dtype) * steps)[:steps]  # 6 batches, repeated
    losses = [P.sat_step(opt, lambda x=x, y=y: F.cross_entropy(net(x), y)) for x, y in batches]
    return net, torch.stack(losses)


def test_sat_trains_a_tiny_mrr_net_deterministically():
    net, losses = _train_sat(0, steps=30)
    assert torch.isfinite(losses).all()
    assert losses[-6:].mean() < 0.8 * losses[:6].mean()  # it learns (6 batches, seen 5 times)
    net2, losses2 = _train_sat(0, steps=30)
    assert torch.equal(losses, losses2)
    for (n1, a), (n2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    net3, _ = _train_sat(1, steps=30)
    assert not torch.equal(net3.fc1.control, net.fc1.control)


def test_rho_zero_is_exactly_the_base_adam():
    net, _ = _train_sat(3, rho=0.0)
    torch.manual_seed(3)
    ref = TinyMRR()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for x, y in _data(6):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    for (n1, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n1


def test_one_sat_step_equals_the_papers_step_by_hand():
    """davda54's SAM(adaptive=True) + Adam on every parameter, the BatchNorm statistics of the
    clean pass only, in float64."""
    torch.manual_seed(5)
    net = TinyMRR().double()
    ref = TinyMRR().double()
    ref.load_state_dict(net.state_dict())
    (x, y), = _data(1, dtype=D64)
    rho = 0.5
    opt = SAM(net.parameters(), torch.optim.Adam, rho=rho, adaptive=True, lr=0.01, model=net)
    P.sat_step(opt, lambda: F.cross_entropy(net(x), y))

    params = list(ref.parameters())
    g1 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    stats = {k: v.clone() for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}
    norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, g1)))
    e = [rho * p.detach() ** 2 * g / (norm + 1e-12) for p, g in zip(params, g1)]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    g2 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    ref.load_state_dict({**ref.state_dict(), **stats})  # statistics of the first pass only
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
    adam = torch.optim.Adam(params, lr=0.01)
    for p, g in zip(params, g2):
        p.grad = g
    adam.step()
    for (n1, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n1)


def test_sat_param_groups_and_controls_only():
    net = TinyMRR()
    groups = P.sat_param_groups(net, digital_rho=0.0)
    assert groups[0]["params"] == [net.fc1.control, net.fc2.control]
    assert {id(p) for p in groups[1]["params"]} == {id(net.fc2.bias), id(net.bn.weight),
                                                    id(net.bn.bias)}
    assert groups[1]["rho"] == 0.0
    opt = ASAM(groups, torch.optim.Adam, rho=0.5, lr=0.01, model=net)
    (x, y), = _data(1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    for n, p in net.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.endswith("control"), n  # only the controls are perturbed
    F.cross_entropy(net(x), y).backward()
    opt.second_step(zero_grad=True)
    with pytest.raises(ValueError, match="no physical layers with trainable controls"):
        P.sat_param_groups(nn.Linear(2, 2))


def _fs_net():
    torch.manual_seed(0)
    return nn.Sequential(P.FreeSpaceLinear((4, 4), 6, tile=(6, 5), grid=(2, 2)), nn.Sigmoid(),
                         P.FreeSpaceLinear((2, 3), 3, tile=(3, 4), grid=(1, 3)))


def test_sat_with_the_model_free_step_resets_the_device_and_is_seeded():
    def run():
        net = _fs_net()
        opt = SAM(net.parameters(), torch.optim.Adam, rho=0.3, lr=1e-2, model=net)
        fd = P.ModelFreeAscent([P.Knob(net[0].shift_y, delta_max=1.0, c=0.8, name="shift"),
                                P.Knob(net[0].scale, delta_max=0.05, c=0.01, bounds=(1.0, 1.1), name="scale")],
                               seed=4)
        g = torch.Generator().manual_seed(1)
        seen = []
        for _ in range(6):
            x, y = torch.rand(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)

            def loss():
                seen.append((net[0].shift_y.item(), net[0].scale.item()))
                return F.cross_entropy(net(x), y)

            P.sat_step(opt, loss, model_free=fd)
            P.constrain_(net)
            assert net[0].shift_y.item() == 0.0 and net[0].scale.item() == 1.0
        return net, seen

    net, seen = run()
    # Per step: clean pass at theta0, the probe, then the adversarial pass; knobs cycle.
    assert seen[0] == (0.0, 1.0) and 0.0 < seen[1][0] <= 1.0 and seen[1][1] == 1.0
    assert seen[2][0] != 0.0 and seen[2][1] == 1.0
    assert seen[4][0] == 0.0 and 1.0 < seen[4][1] <= 1.05 and 1.0 <= seen[5][1] <= 1.1
    assert net[0].control.abs().max() <= 1.0
    net2, seen2 = run()
    assert seen == seen2 and torch.equal(net[0].control, net2[0].control)


def test_sat_step_rejects_a_plain_optimizer():
    net = TinyMRR()
    with pytest.raises(TypeError, match="two-pass optimizer .*got Adam"):
        P.sat_step(torch.optim.Adam(net.parameters()), lambda: net(torch.randn(2, 12)).sum())
