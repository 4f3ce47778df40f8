"""The model-free (finite-difference) adversarial step: the estimate on functions with known
derivatives is within its stated error, the knobs are reset after the step (also on an error),
cycling, bounds, seeds, and bad step ranges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from saf_kernels import physical as P

D64 = torch.float64


def _knob(value=0.0, **kw):
    return P.Knob(torch.tensor(value, dtype=D64), **{"delta_max": 0.5, "c": 1.0, **kw})


@pytest.mark.parametrize("a,b,theta0", [(3.0, -1.0, 0.7), (-2.0, 0.5, -1.3), (0.0, 2.0, 0.0)])
def test_estimate_on_a_quadratic_is_the_secant_slope(a, b, theta0):
    # f(t) = a t^2 + b t: f' = 2 a t + b, f'' = 2a. The one-sided estimate is exactly the secant
    # slope f'(t0) + a delta, so its error is at most delta_max / 2 * |f''| = a * delta_max.
    k = _knob(theta0, delta_max=0.2, c=0.5)
    fd = P.ModelFreeAscent(k, seed=1)
    f = lambda: a * k.tensor**2 + b * k.tensor  # noqa: E731
    for _ in range(20):
        fd.probe(f, f())
        delta, g, adv = fd.last["knob0"]
        assert 0.0 < delta <= 0.2
        exact = 2 * a * theta0 + b
        assert g.item() == pytest.approx(exact + a * delta, abs=1e-12)
        assert abs(g.item() - exact) <= 0.2 / 2 * abs(2 * a) + 1e-12
        assert adv.item() == pytest.approx(theta0 + delta + 0.5 * g.item(), abs=1e-12)
        with fd.adversarial():
            assert k.tensor.item() == pytest.approx(adv.item(), abs=1e-15)
        assert k.tensor.item() == theta0  # reset exactly


def test_estimate_on_a_smooth_function_within_its_bound():
    # f(t) = sin(3 t): |f''| <= 9, so |g - f'(t0)| <= delta_max / 2 * 9.
    k = _knob(0.4, delta_max=0.05, c=0.0)
    fd = P.ModelFreeAscent(k, seed=2)
    f = lambda: torch.sin(3 * k.tensor)  # noqa: E731
    for _ in range(50):
        fd.probe(f, f())
        err = abs(fd.last["knob0"][1].item() - 3 * math.cos(3 * 0.4))
        assert err <= 0.05 / 2 * 9
        with fd.adversarial():
            assert k.tensor.item() == pytest.approx(0.4 + fd.last["knob0"][0])  # c = 0: theta0 + delta
    assert k.tensor.item() == 0.4


def test_knobs_reset_after_an_error_in_the_second_pass_and_in_the_probe():
    k = _knob(1.0)
    fd = P.ModelFreeAscent([k], seed=0)
    fd.probe(lambda: k.tensor * 2, torch.tensor(2.0, dtype=D64))
    with pytest.raises(RuntimeError, match="boom"):
        with fd.adversarial():
            assert k.tensor.item() != 1.0
            raise RuntimeError("boom")
    assert k.tensor.item() == 1.0

    def bad_forward():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        fd.probe(bad_forward, torch.tensor(0.0))
    assert k.tensor.item() == 1.0


def test_cycle_bounds_seed_and_probe_twice():
    a, b = _knob(0.0, name="a", bounds=(0.0, 0.3)), _knob(1.0, name="b", c=0.0)
    loss = lambda: 10 * a.tensor + b.tensor  # noqa: E731
    fd = P.ModelFreeAscent([a, b], cycle=True, seed=7)
    fd.probe(loss, loss())
    assert set(fd.last) == {"a"} and fd.last["a"][2].item() == 0.3  # 10 * 1 + delta clipped to 0.3
    with pytest.raises(RuntimeError, match="called twice"):
        fd.probe(loss, loss())
    with fd.adversarial():
        assert a.tensor.item() == 0.3 and b.tensor.item() == 1.0
    fd.probe(loss, loss())
    assert set(fd.last) == {"a", "b"} and fd.steps == 2
    with fd.adversarial():
        assert a.tensor.item() == 0.0 and b.tensor.item() > 1.0
    both = P.ModelFreeAscent([a, b], cycle=False, seed=7)
    both.probe(loss, loss())
    with both.adversarial():
        assert a.tensor.item() == 0.3 and b.tensor.item() > 1.0
    assert (a.tensor.item(), b.tensor.item()) == (0.0, 1.0)
    # Same seed, same deltas; state_dict resumes the stream.
    d1 = [P.ModelFreeAscent(_knob(), seed=3) for _ in range(2)]
    for fd_ in d1:
        k = fd_.knobs[0]
        fd_.probe(lambda k=k: k.tensor, torch.tensor(0.0, dtype=D64))
    assert d1[0].last["knob0"][0] == d1[1].last["knob0"][0]
    state = d1[0].state_dict()
    with d1[0].adversarial():
        pass
    d1[0].probe(lambda: d1[0].knobs[0].tensor, torch.tensor(0.0, dtype=D64))
    d1[1].load_state_dict(state)
    with d1[1].adversarial():
        pass
    d1[1].probe(lambda: d1[1].knobs[0].tensor, torch.tensor(0.0, dtype=D64))
    assert d1[0].last["knob0"][0] == d1[1].last["knob0"][0]


def test_probe_leaves_batchnorm_statistics_alone():
    layer = P.FreeSpaceLinear((3, 3), 4, tile=(5, 5), grid=(2, 2))
    net = nn.Sequential(layer, nn.BatchNorm1d(4))
    x = torch.randn(16, 9)
    fd = P.ModelFreeAscent(P.Knob(layer.shift_y, delta_max=1.0, c=0.8))
    loss0 = net(x).square().mean()
    before = net[1].running_mean.clone(), net[1].num_batches_tracked.clone()
    fd.probe(lambda: net(x).square().mean(), loss0, model=net)
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].num_batches_tracked, before[1])
    assert layer.shift_y.item() == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(delta_max=0.0), r"delta_max must be > 0, got 0\.0"),
    (dict(delta_max=math.inf), r"delta_max must be a finite number, got inf"),
    (dict(delta_min=-0.1), r"delta_min must be >= 0, got -0\.1"),
    (dict(delta_min=0.5, delta_max=0.5), r"delta_min must be < delta_max, got delta_min=0\.5, delta_max=0\.5"),
    (dict(c=-1.0), r"c must be >= 0, got -1\.0"),
    (dict(c=math.nan), r"c must be a finite number, got nan"),
    (dict(bounds=(1.0, 0.0)), r"bounds must have lo <= hi, got \(1\.0, 0\.0\)"),
    (dict(bounds=3.0), r"bounds must be a pair \(lo, hi\), got 3\.0"),
])
def test_bad_step_ranges(kw, match):
    with pytest.raises(ValueError, match=match):
        _knob(**kw)


def test_bad_knob_tensor_and_knob_list():
    with pytest.raises(ValueError, match=r"tensor must be a one-element floating tensor.*int64"):
        P.Knob(torch.tensor(1), delta_max=1.0, c=1.0)
    with pytest.raises(ValueError, match=r"tensor must be a one-element floating tensor.*0\.5"):
        P.Knob(0.5, delta_max=1.0, c=1.0)
    with pytest.raises(ValueError, match=r"knobs must be a non-empty list of Knob"):
        P.ModelFreeAscent([])
