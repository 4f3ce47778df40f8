"""Robustness helpers of saf_kernels.physical: sweeps agree with evaluating under the device
context by hand and leave the device as it was, fabrication sweeps draw the same devices for
every model, the Hessian w.r.t. the controls matches a closed form, and bad input (negative
sigma, non-finite drift, empty sweeps, misalignment on a layer without tiles, ...) raises a
ValueError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saf_kernels import physical as P

D64 = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = P.MRRLinear(10, 16), nn.BatchNorm1d(16), P.MRRLinear(16, 3)
        self.fs = P.FreeSpaceLinear((2, 5), 10, tile=(4, 6), grid=(2, 2))

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(self.fs(x)))))


@pytest.fixture
def net_data():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(50, 10, generator=g), torch.randint(0, 3, (50,), generator=g)) for _ in range(3)]
    # Labels the network mostly gets right, so that perturbations have something to destroy.
    data = [(x, net(x).argmax(1).detach()) for x, _ in data]
    for i in range(0, 50, 7):
        data[0][1][i] = (data[0][1][i] + 1) % 3
    return net, data


def _by_hand(net, data):
    correct = sum((net(x).argmax(1) == y).sum().item() for x, y in data)
    return 100.0 * correct / sum(len(y) for _, y in data)


def test_accuracy_and_sweeps_match_by_hand_and_restore(net_data):
    net, data = net_data
    clean = P.accuracy(net, data)
    assert clean == pytest.approx(_by_hand(net, data))
    assert 80 < clean < 100
    drift = P.drift_sweep(net, data, [-1.0, 0.0, 0.5], layers=["fc2"])
    assert list(drift) == [-1.0, 0.0, 0.5] and drift[0.0] == clean
    with P.thermal_drift(net, -1.0, layers=["fc2"]):
        assert drift[-1.0] == pytest.approx(_by_hand(net, data))
    shifts = P.misalignment_sweep(net, data, [0.0, 1.0], kind="shift_y")
    assert shifts[0.0] == clean
    with P.misalignment(net, shift_y=1.0):
        assert shifts[1.0] == pytest.approx(_by_hand(net, data))
    assert all(m.delta_t.item() == 0 and m.offset.abs().sum() == 0 for m in (net.fc1, net.fc2))
    assert net.fs.shift_y.item() == 0.0 and P.accuracy(net, data) == clean
    # train_mode=True normalises with batch statistics and leaves the running statistics alone.
    stats = net.bn.running_mean.clone()
    P.accuracy(net, data, train_mode=True)
    assert torch.equal(net.bn.running_mean, stats) and not net.training


def test_fabrication_sweep_draws_the_same_devices(net_data):
    net, data = net_data
    res = P.fabrication_sweep(net, data, [0.0, 0.05], devices=4, seed=3)
    clean = P.accuracy(net, data)
    assert res[0.0]["accs"] == [clean] * 4 and res[0.0]["std"] == 0.0
    accs = res[0.05]["accs"]
    assert len(accs) == 4 and res[0.05]["mean"] == pytest.approx(sum(accs) / 4)
    assert res[0.05]["min"] == min(accs) and res[0.05]["std"] > 0
    for i, a in enumerate(accs):
        with P.fabrication_variance(net, 0.05, seed=3 + i):
            assert a == pytest.approx(_by_hand(net, data))
    assert P.fabrication_sweep(net, data, [0.05], devices=4, seed=3)[0.05]["accs"] == accs
    only2 = P.fabrication_sweep(net, data, [0.05], devices=2, seed=3, layers=[net.fc2])
    assert net.fc1.offset.abs().sum() == 0 and len(only2[0.05]["accs"]) == 2


def test_control_hessian_matches_the_closed_form():
    # One ring, MSE loss (a L(x) + b - t)^2 with a digital bias b: d2/dx2 = 2 a^2 L'^2 + 2 r a L''.
    torch.manual_seed(0)
    layer = P.MRRLinear(1, 1, dtype=D64)
    with torch.no_grad():
        layer.control.fill_(0.11)
        layer.bias.fill_(0.3)
    a, t = 1.7, torch.tensor([[0.9]], dtype=D64)
    data = [(torch.tensor([[a]], dtype=D64), t)]
    res = P.control_hessian_top_eigenvalue(layer, F.mse_loss, data, iters=5)
    x = torch.tensor(0.11, dtype=D64, requires_grad=True)
    (d1,) = torch.autograd.grad(layer.transfer(x), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1, x)
    r = a * layer.transfer(x).item() + 0.3 - 0.9
    expected = 2 * a**2 * d1.item() ** 2 + 2 * r * a * d2.item()
    assert res.eigenvalue == pytest.approx(expected, rel=1e-10)
    assert layer.bias.requires_grad  # the digital parameters are restored
    with pytest.raises(ValueError, match="no physical layers with trainable controls"):
        P.control_hessian_top_eigenvalue(nn.Linear(1, 1), F.mse_loss, data)


# ---------------------------------------------------------------------------------------------
# Bad input: one table
# ---------------------------------------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _data():
    return [(torch.randn(4, 10), torch.randint(0, 3, (4,)))]


def _enter(cm):
    with cm:
        pass


BAD = [
    ("fabrication_variance:sigma<0", lambda: _enter(P.fabrication_variance(_net(), -0.01)),
     r"fabrication_variance: sigma must be >= 0, got -0\.01"),
    ("fabrication_sweep:sigma<0", lambda: P.fabrication_sweep(_net(), _data(), [0.02, -0.04]),
     r"sigmas\[1\] must be >= 0, got -0\.04"),
    ("sample_offsets:sigma<0", lambda: P.MRRLinear(2, 2).sample_offsets(-1.0), r"sigma must be >= 0, got -1\.0"),
    ("thermal_drift:nan", lambda: _enter(P.thermal_drift(_net(), math.nan)),
     r"thermal_drift: delta_t must be a finite number, got nan"),
    ("drift_sweep:inf", lambda: P.drift_sweep(_net(), _data(), [0.0, math.inf]),
     r"delta_ts\[1\] must be a finite number, got inf"),
    ("set_drift:nan", lambda: P.MRRLinear(2, 2).set_drift(math.nan), r"delta_t must be a finite number, got nan"),
    ("drift_sweep:empty", lambda: P.drift_sweep(_net(), _data(), []), r"drift_sweep: delta_ts is empty"),
    ("fabrication_sweep:empty", lambda: P.fabrication_sweep(_net(), _data(), ()), r"sigmas is empty"),
    ("misalignment_sweep:empty", lambda: P.misalignment_sweep(_net(), _data(), []), r"values is empty"),
    ("sweep:empty", lambda: P.sweep(_net(), _data(), [], lambda v: P.thermal_drift(_net(), v)), r"values is empty"),
    ("drift_sweep:not-a-sequence", lambda: P.drift_sweep(_net(), _data(), 1.0),
     r"delta_ts must be a sequence of numbers, got 1\.0"),
    ("misalignment:layer-without-tiles", lambda: _enter(P.misalignment(_net(), shift_y=1.0, layers=["fc1"])),
     r"layer 'fc1' \(MRRLinear\) has no tiles to misalign; this applies to FreeSpaceLinear layers"),
    ("misalignment_sweep:layer-without-tiles", lambda: P.misalignment_sweep(_net(), _data(), [1.0], layers=["bn"]),
     r"layer 'bn' \(BatchNorm1d\) has no tiles to misalign"),
    ("misalignment:model-without-tiles", lambda: _enter(P.misalignment(P.MRRLinear(2, 2), shift_x=1.0)),
     r"the model has no FreeSpaceLinear layers \(tiles to misalign\)"),
    ("misalignment:nothing", lambda: _enter(P.misalignment(_net())), r"give at least one of rotation"),
    ("misalignment:scale<=0", lambda: _enter(P.misalignment(_net(), scale=0.0)), r"scale must be > 0, got 0\.0"),
    ("misalignment:rotation-nan", lambda: _enter(P.misalignment(_net(), rotation=math.nan)),
     r"rotation must be a finite number, got nan"),
    ("set_misalignment:shift-inf", lambda: P.FreeSpaceLinear((2, 2), 1).set_misalignment(shift_x=math.inf),
     r"shift_x must be a finite number, got inf"),
    ("misalignment_sweep:kind", lambda: P.misalignment_sweep(_net(), _data(), [1.0], kind="tilt"),
     r"kind must be one of .*got 'tilt'"),
    ("thermal_drift:layer-not-mrr", lambda: _enter(P.thermal_drift(_net(), 1.0, layers=["fs"])),
     r"layer 'fs' \(FreeSpaceLinear\) has no rings to drift"),
    ("thermal_drift:unknown-layer", lambda: _enter(P.thermal_drift(_net(), 1.0, layers=["fc9"])),
     r"the model has no layer named 'fc9'"),
    ("thermal_drift:empty-layers", lambda: _enter(P.thermal_drift(_net(), 1.0, layers=[])), r"layers is empty"),
    ("fabrication_sweep:devices=0", lambda: P.fabrication_sweep(_net(), _data(), [0.02], devices=0),
     r"devices must be an int >= 1, got 0"),
    ("accuracy:no-batches", lambda: P.accuracy(_net(), []), r"accuracy: data holds no batches"),
    ("Lorentzian:gamma=0", lambda: P.Lorentzian(gamma=0.0), r"gamma must be > 0, got 0\.0"),
    ("MRRLinear:drift_per_kelvin", lambda: P.MRRLinear(2, 2, drift_per_kelvin=math.nan),
     r"drift_per_kelvin must be a finite number, got nan"),
    ("set_weights:shape", lambda: P.MRRLinear(2, 3).set_weights(torch.zeros(2, 2)),
     r"weight has shape \(2, 2\), the layer's controls \(3, 2\)"),
    ("set_weights:range", lambda: P.MRRLinear(2, 1).set_weights(torch.tensor([[0.5, 1.0]])),
     r"weights must lie in \[-1\.0, 1\.0\)"),
    ("FreeSpaceLinear:tile<kernel", lambda: P.FreeSpaceLinear((28, 28), 4, tile=(20, 30)),
     r"tile \(20, 30\) is smaller than in_shape \(28, 28\)"),
    ("FreeSpaceLinear:interpolation", lambda: P.FreeSpaceLinear((2, 2), 1, interpolation="cubic"),
     r"interpolation must be one of .*got 'cubic'"),
    ("FreeSpaceLinear:grid", lambda: P.FreeSpaceLinear((2, 2), 1, grid=(0, 2)), r"grid must be positive"),
    ("misalign_kernels:shape", lambda: P.misalign_kernels(torch.zeros(4, 4), (4, 4), (1, 1)),
     r"kernels must be \[O, kh, kw\], got shape \(4, 4\)"),
    ("sat_param_groups:digital_rho", lambda: P.sat_param_groups(_net(), digital_rho=-1.0),
     r"digital_rho must be >= 0, got -1\.0"),
]


@pytest.mark.parametrize(("call", "match"), [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_input_is_a_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()
