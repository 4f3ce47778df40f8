"""The device models of saf_kernels.physical against closed forms: the MRR Lorentzian and its
inverse, drift and fabrication offsets applied where stated, deployment of a weight-trained
network, and the free-space misalignment resampling (identity at zero, exact integer shifts and
quarter turns, bilinear sub-pixel shifts, no gradient to the misalignment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saf_kernels import physical as P

D64 = torch.float64


# ---------------------------------------------------------------------------------------------
# MRR
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("A,x0,gamma", [(1.0, 0.0, 0.15), (0.8, 0.3, 0.05)])
def test_lorentzian_closed_form_and_inverse(A, x0, gamma):
    L = P.Lorentzian(A, x0, gamma)
    x = x0 + torch.rand(1000, dtype=D64) * 2.0  # the branch x >= x0
    u = (x - x0) / gamma
    torch.testing.assert_close(L(x), A - 2 * A / (1 + u**2), rtol=0, atol=1e-15)
    torch.testing.assert_close(L.inverse(L(x)), x, rtol=1e-9, atol=1e-12)
    w = (torch.rand(1000, dtype=D64) * 2 - 1) * A * 0.999
    torch.testing.assert_close(L(L.inverse(w)), w, rtol=0, atol=1e-12)
    # Landmarks: minimum -A at x0, zero at x0 + gamma; the derivative matches autograd.
    assert L(torch.tensor(x0, dtype=D64)).item() == -A
    assert abs(L(torch.tensor(x0 + gamma, dtype=D64)).item()) < 1e-15
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L(xg).sum(), xg)
    torch.testing.assert_close(L.derivative(x), g, rtol=1e-12, atol=1e-12)
    # Steepest at gamma / sqrt(3): |L'| = 3 sqrt(3) A / (4 gamma).
    peak = L.derivative(torch.tensor(x0 + gamma / math.sqrt(3), dtype=D64)).item()
    assert peak == pytest.approx(3 * math.sqrt(3) * A / (4 * gamma), rel=1e-12)


@pytest.mark.parametrize("w", [1.0, -1.0001, math.nan, 2.0])
def test_lorentzian_inverse_rejects_out_of_range(w):
    with pytest.raises(ValueError, match=r"weights must lie in \[-1\.0, 1\.0\)"):
        P.Lorentzian().inverse(torch.tensor([0.0, w]))


def _linear(layer: P.MRRLinear, x: torch.Tensor, x_eff: torch.Tensor) -> torch.Tensor:
    return x @ layer.transfer(x_eff).T + layer.bias


def test_mrr_linear_forward_drift_and_offsets_closed_form():
    torch.manual_seed(1)
    layer = P.MRRLinear(7, 5, dtype=D64)
    x = torch.randn(4, 7, dtype=D64)
    c = layer.control.detach().clone()
    # Controls start at L^-1 of nn.Linear's default init: weights within +-1/sqrt(fan_in).
    assert layer.weight.abs().max() <= 1 / math.sqrt(7) + 1e-12
    torch.testing.assert_close(layer(x), _linear(layer, x, c), rtol=0, atol=1e-13)
    layer.set_drift(-1.5)
    torch.testing.assert_close(layer(x), _linear(layer, x, c + 0.08 * -1.5), rtol=0, atol=1e-13)
    gen = torch.Generator().manual_seed(3)
    layer.sample_offsets(0.04, gen)
    off = 0.04 * torch.randn(c.shape, generator=torch.Generator().manual_seed(3), dtype=D64)
    torch.testing.assert_close(layer.offset, off, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), _linear(layer, x, c + off - 0.12), rtol=0, atol=1e-13)
    # Device state is not part of the trained network's state_dict.
    assert set(layer.state_dict()) == {"control", "bias"}
    # The gradient reaches the controls through L.
    layer.set_drift(0.0)
    layer.offset.zero_()
    (g,) = torch.autograd.grad(layer(x).sum(), layer.control)
    expected = layer.transfer.derivative(c) * x.sum(0)[None, :].expand(5, 7)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_mrr_conv_matches_conv2d_with_mapped_weights():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, dtype=D64)
    with torch.no_grad():
        conv.weight.uniform_(-0.9, 0.9)
    mrr = P.MRRConv2d.from_conv(conv)
    x = torch.randn(2, 3, 9, 7, dtype=D64)
    torch.testing.assert_close(mrr(x), conv(x), rtol=1e-10, atol=1e-10)
    with P.thermal_drift(mrr, 0.5):
        w = mrr.transfer(mrr.transfer.inverse(conv.weight.detach()) + 0.04)
        torch.testing.assert_close(mrr(x), F.conv2d(x, w, conv.bias, 2, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mrr(x), conv(x), rtol=1e-10, atol=1e-10)


class _Net(nn.Module):
    def __init__(self, physical: bool):
        super().__init__()
        lin = P.MRRLinear if physical else nn.Linear
        self.fc1, self.bn, self.fc2, self.fc3 = lin(6, 5), nn.BatchNorm1d(5), lin(5, 4), lin(4, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.bn(self.fc1(x))))))


def test_deploy_weights_reproduces_the_weight_network_and_drift_hits_only_chosen_layers():
    torch.manual_seed(4)
    trained = _Net(False).double()
    with torch.no_grad():
        trained.fc2.weight[0, 0] = 1.5  # clamped to 0.999 on deployment, as the paper's BP
        trained.bn.running_mean.uniform_(-1, 1)
    phys = P.deploy_weights(_Net(True).double(), trained)
    assert phys.fc2.weight[0, 0].item() == pytest.approx(0.999, abs=1e-12)
    with torch.no_grad():
        trained.fc2.weight.clamp_(-0.999, 0.999)
    x = torch.randn(8, 6, dtype=D64)
    trained.eval(), phys.eval()
    torch.testing.assert_close(phys(x), trained(x), rtol=1e-10, atol=1e-10)
    with P.thermal_drift(phys, -1.0, layers=["fc2", "fc3"]) as mods:
        assert mods == [phys.fc2, phys.fc3]
        assert phys.fc1.delta_t.item() == 0.0 and phys.fc2.delta_t.item() == -1.0
        torch.testing.assert_close(phys.fc1.weight, trained.fc1.weight, rtol=1e-10, atol=1e-10)
        expected = phys.fc3.transfer(phys.fc3.transfer.inverse(trained.fc3.weight) - 0.08)
        torch.testing.assert_close(phys.fc3.weight, expected, rtol=1e-10, atol=1e-10)
    assert all(m.delta_t.item() == 0.0 for m in (phys.fc1, phys.fc2, phys.fc3))
    with P.fabrication_variance(phys, 0.08, seed=5, layers=[phys.fc3]):
        assert phys.fc3.offset.abs().sum() > 0 and phys.fc2.offset.abs().sum() == 0
        first = phys.fc3.offset.clone()
    with P.fabrication_variance(phys, 0.08, seed=5, layers=[phys.fc3]):
        assert torch.equal(phys.fc3.offset, first)  # same seed, same device
    assert phys.fc3.offset.abs().sum() == 0


def test_deploy_weights_names_a_missing_layer():
    with pytest.raises(ValueError, match=r"has no 'fc1.weight' for MRR layer 'fc1'"):
        P.deploy_weights(_Net(True), nn.Sequential())


# ---------------------------------------------------------------------------------------------
# Free space
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("out", [1, 12, 13, 30])
def test_misalignment_at_zero_is_the_identity(interpolation, out):
    k = torch.randn(out, 5, 4)
    got = P.misalign_kernels(k, (7, 6), (3, 4), interpolation=interpolation)
    assert torch.equal(got, k)
    layer = P.FreeSpaceLinear((28, 28), 20, interpolation=interpolation)
    assert torch.equal(layer.weight, layer.control)


def _frames(k, tile, grid):
    """Reference layout: kernels [O, kh, kw] into frames [F, H, W] by loops."""
    (o, kh, kw), (th, tw), (gr, gc) = k.shape, tile, grid
    t = gr * gc
    f = -(-o // t)
    frames = torch.zeros(f, gr * th, gc * tw, dtype=k.dtype)
    oy, ox = (th - kh) // 2, (tw - kw) // 2
    for i in range(o):
        fi, ti = divmod(i, t)
        r, c = divmod(ti, gc)
        frames[fi, r * th + oy:r * th + oy + kh, c * tw + ox:c * tw + ox + kw] = k[i]
    return frames


def _windows(frames, o, kh, kw, tile, grid):
    (th, tw), (gr, gc) = tile, grid
    oy, ox = (th - kh) // 2, (tw - kw) // 2
    out = []
    for i in range(o):
        fi, ti = divmod(i, gr * gc)
        r, c = divmod(ti, gc)
        out.append(frames[fi, r * th + oy:r * th + oy + kh, c * tw + ox:c * tw + ox + kw])
    return torch.stack(out)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -2), (3, 2), (-9, 0)])
def test_integer_shift_translates_the_frame(interpolation, dy, dx):
    tile, grid = (7, 6), (2, 3)
    k = torch.randn(8, 5, 4, dtype=D64)
    frames = _frames(k, tile, grid)
    shifted = torch.zeros_like(frames)
    H, W = frames.shape[1:]
    ys = slice(max(dy, 0), H + min(dy, 0))
    xs = slice(max(dx, 0), W + min(dx, 0))
    ys_src = slice(max(-dy, 0), H + min(-dy, 0))
    xs_src = slice(max(-dx, 0), W + min(-dx, 0))
    shifted[:, ys, xs] = frames[:, ys_src, xs_src]
    got = P.misalign_kernels(k, tile, grid, shift_y=float(dy), shift_x=float(dx), interpolation=interpolation)
    torch.testing.assert_close(got, _windows(shifted, 8, 5, 4, tile, grid), rtol=0, atol=1e-12)


def test_half_pixel_shift_bilinear_averages_and_nearest_rounds_half_up():
    tile, grid = (7, 6), (1, 2)
    k = torch.randn(2, 5, 4, dtype=D64)
    frames = _frames(k, tile, grid)
    up = torch.zeros_like(frames)
    up[:, 1:] = frames[:, :-1]  # shifted down by one pixel
    got = P.misalign_kernels(k, tile, grid, shift_y=0.5)
    torch.testing.assert_close(got, _windows((frames + up) / 2, 2, 5, 4, tile, grid), rtol=0, atol=1e-12)
    assert torch.equal(P.misalign_kernels(k, tile, grid, shift_y=0.5, interpolation="nearest"), k)
    got = P.misalign_kernels(k, tile, grid, shift_y=0.6, interpolation="nearest")
    torch.testing.assert_close(got, _windows(up, 2, 5, 4, tile, grid), rtol=0, atol=0)


def test_rotation_quarter_turn_and_scale_about_the_centre():
    # One square frame (one tile): a 90-degree turn is a rot90 of the frame, scale 1 + 0 identity.
    k = torch.randn(1, 6, 6, dtype=D64)
    got = P.misalign_kernels(k, (6, 6), (1, 1), rotation=90.0)
    # Counter-clockwise as displayed (row 0 on top) is torch.rot90 with k=1 on (rows, cols).
    torch.testing.assert_close(got[0], torch.rot90(k[0], 1, (0, 1)), rtol=0, atol=1e-12)
    got = P.misalign_kernels(k, (6, 6), (1, 1), rotation=180.0)
    torch.testing.assert_close(got[0], torch.flip(k[0], (0, 1)), rtol=0, atol=1e-12)
    # Scale 2 about the centre of an odd frame: the centre pixel stays, its neighbours spread out.
    k = torch.randn(1, 5, 5, dtype=D64)
    got = P.misalign_kernels(k, (5, 5), (1, 1), scale=2.0)
    assert got[0, 2, 2] == k[0, 2, 2]
    torch.testing.assert_close(got[0, 2, 0], k[0, 2, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0, 2, 1], (k[0, 2, 1] + k[0, 2, 2]) / 2, rtol=0, atol=1e-12)


def test_free_space_layer_gradient_goes_to_pixels_not_to_the_misalignment():
    torch.manual_seed(6)
    layer = P.FreeSpaceLinear((6, 5), 7, tile=(8, 7), grid=(2, 2)).double()
    layer.set_misalignment(rotation=3.0, shift_y=0.7, shift_x=-0.4, scale=1.05)
    assert not any(t.requires_grad for t in layer.knobs.values())
    x = torch.randn(3, 30, dtype=D64)
    # The misaligned weight is linear in the pixels: gradcheck through the resampling.
    assert torch.autograd.gradcheck(
        lambda c: F.linear(x, P.misalign_kernels(c.reshape(7, 6, 5), (8, 7), (2, 2), **layer.knobs).reshape(7, 30)),
        (layer.control.detach().clone().requires_grad_(True),),
    )
    y = layer(x)
    assert y.shape == (3, 7)
    y.sum().backward()
    assert layer.control.grad is not None and layer.control.grad.abs().sum() > 0
    assert set(layer.state_dict()) == {"control", "bias"}


def test_misalignment_context_restores_and_constrain_clamps():
    net = nn.Sequential(P.FreeSpaceLinear((4, 4), 3), nn.Sigmoid(), P.FreeSpaceLinear((1, 3), 2, tile=(1, 3)))
    with P.misalignment(net, shift_y=1.5, rotation=2.0, layers=["0"]) as mods:
        assert mods == [net[0]]
        assert net[0].shift_y.item() == 1.5 and net[0].rotation.item() == 2.0
        assert net[2].shift_y.item() == 0.0
    assert net[0].shift_y.item() == 0.0 and net[0].rotation.item() == 0.0 and net[0].scale.item() == 1.0
    with torch.no_grad():
        net[0].control.fill_(3.0)
    P.constrain_(net)
    assert net[0].control.max().item() == 1.0
